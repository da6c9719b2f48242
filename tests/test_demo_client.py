"""`genfast demo` served on 127.0.0.1 and driven through gradio_client, as a remote user would."""

import concurrent.futures

import pytest
from demo_helpers import assert_own_image, direct, shrink
from gradio_client import Client
from gradio_client.exceptions import AppError

PROMPT = "a blue triangle on a white background"


def test_binds_to_localhost_and_names_every_tab_endpoint(demo_server):
    _, url = demo_server
    assert url.startswith("http://127.0.0.1:")
    api = Client(url, verbose=False).view_api(return_format="dict", print_info=False)
    endpoints = set(api["named_endpoints"])
    for tab in ("accelerate", "compare", "quantize", "assemble", "backbones", "heads"):
        assert f"/{tab}" in endpoints and f"/cancel_{tab}" in endpoints


def test_accelerate_endpoint_returns_the_images_genfast_makes(demo_server, mini_reference):
    _, url = demo_server
    base, fast, _slider, table, numbers = Client(url, verbose=False).predict(
        PROMPT, 5, 10, 5.0, "feature_inheritance:interval=2", api_name="/accelerate")
    assert (shrink(base) == direct(mini_reference, PROMPT, 5, 10, 5.0)).all()
    assert (shrink(fast) == direct(mini_reference, PROMPT, 5, 10, 5.0, [("feature_inheritance", {"interval": 2})])).all()
    assert numbers["accelerated"]["full_calls"] == 5 and numbers["baseline"]["full_calls"] == 10
    assert f"{numbers['psnr']:.1f} dB" in table


def test_four_concurrent_clients_all_get_their_own_correct_result(demo_server, mini_reference):
    _, url = demo_server
    clients = [Client(url, verbose=False) for _ in range(4)]
    jobs = [c.submit(PROMPT, seed, 12, 5.0, "feature_inheritance:interval=3", api_name="/accelerate")
            for seed, c in enumerate(clients)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda j: j.result(timeout=300), jobs))
    bases = {s: direct(mini_reference, PROMPT, s, 12, 5.0) for s in range(4)}
    fasts = {s: direct(mini_reference, PROMPT, s, 12, 5.0, [("feature_inheritance", {"interval": 3})])
             for s in range(4)}
    for seed, (base, fast, *_rest, numbers) in enumerate(results):
        assert numbers["seed"] == seed
        assert_own_image(shrink(base), seed, bases)
        assert_own_image(shrink(fast), seed, fasts)


@pytest.mark.parametrize("args, message", [
    (("", 0, 25, 5.0, "feature_inheritance"), "Type a prompt"),
    ((PROMPT, 0, 500, 5.0, "feature_inheritance"), "greater than maximum value 100"),  # the slider checks first
    ((PROMPT, 0, 25, 5.0, "warp_drive"), "unknown method"),
])
def test_bad_input_comes_back_as_the_message_not_a_traceback(demo_server, args, message):
    _, url = demo_server
    with pytest.raises(AppError) as err:
        Client(url, verbose=False).predict(*args, api_name="/accelerate")
    assert message in str(err.value) and "Traceback" not in str(err.value)


def test_cancel_endpoint_stops_a_running_job_and_the_next_one_runs(demo_server, mini_reference):
    import time

    models, url = demo_server
    client = Client(url, verbose=False)
    job = client.submit(PROMPT, 0, 100, 5.0, "feature_inheritance", api_name="/accelerate")
    while job.status().code.name not in ("PROCESSING", "PROGRESS", "FINISHED"):
        time.sleep(0.05)
    client.predict(api_name="/cancel_accelerate")
    with pytest.raises(Exception, match="Cancelled"):
        job.result(timeout=120)
    base, *_ = client.predict(PROMPT, 2, 6, 5.0, "feature_inheritance", api_name="/accelerate")
    assert (shrink(base) == direct(mini_reference, PROMPT, 2, 6, 5.0)).all()
    with models.worker() as a, models.worker() as b:  # both back in the pool, nothing left on them
        assert not any(p.unet.__dict__.get("_genfast_handles") for p in (a, b))


def test_quantize_endpoint_returns_what_genfast_quantize_makes(demo_server, mini_reference):
    _, url = demo_server
    (floats, quantized), _table, numbers = Client(url, verbose=False).predict(
        PROMPT, 1, 4, 5.0, "int8", "channel", "none", api_name="/quantize")
    assert (shrink(floats) == direct(mini_reference, PROMPT, 1, 4, 5.0)).all()
    assert (shrink(quantized) == direct(mini_reference, PROMPT, 1, 4, 5.0,
                                        [("quantize", {"weights": "int8", "granularity": "channel"})])).all()
    assert numbers["quantized"]["bits_per_weight"] > 8  # int8 codes plus their per-channel scales


def test_assemble_endpoint_runs_the_teacher_it_is_given(demo_server, mini_reference):
    from genfast.demo.assemble_tab import default_student

    models, url = demo_server
    teacher, *_rest, numbers = Client(url, verbose=False).predict(
        PROMPT, 2, 6, 5.0, 0.5, default_student(models), api_name="/assemble")
    assert (shrink(teacher) == direct(mini_reference, PROMPT, 2, 6, 5.0)).all()
    assert numbers["multi_unet"]["student_steps"] == 3


def test_compare_endpoint_returns_the_report(demo_server):
    _, url = demo_server
    table, _pareto, _grid, report = Client(url, verbose=False).predict(
        "feature_inheritance:interval=2", 2, 6, 5.0, api_name="/compare")
    assert [row["name"] for row in report["variants"]] == ["baseline", "feature_inheritance(interval=2)"]
    assert "feature_inheritance(interval=2)" in table


def test_heads_endpoint_takes_uploads_and_refuses_too_few(demo_server, tmp_path):
    from gradio_client import handle_file

    from genfast.cli import main

    _, url = demo_server
    assert main(["head-photos", "--views", "2", "--size", "64", "--out", str(tmp_path / "two")]) == 0
    photos = [handle_file(str(p)) for p in sorted((tmp_path / "two").glob("*.png"))]
    with pytest.raises(AppError, match="at least 3 photos"):
        Client(url, verbose=False).predict(photos, "none", 1, 1, 1, True, api_name="/heads")


def test_heads_endpoint_personalizes_an_embedded_identity(demo_server):
    from pathlib import Path

    from genfast.demo.heads_tab import IDENTITIES

    _, url = demo_server
    video, strip, adapter, _table, numbers, _crops = Client(url, verbose=False).predict(
        None, IDENTITIES[1], 1, 1, 1, False, api_name="/heads")
    assert numbers["config"]["steps"] == 1 and numbers["config"]["symmetry"] is False
    assert Path(video["video"] if isinstance(video, dict) else video).is_file()
    assert Path(adapter).name == "heads-adapter.zip" and Path(strip).is_file()


def test_backbones_endpoint_returns_each_pipeline_s_image(demo_server, tmp_path, monkeypatch):
    from test_demo_backbones import direct, direct_pipeline, tiny_backbones

    from genfast.demo.backbones_tab import Backbone

    models, url = demo_server
    gone = Backbone("LaMamba-Diff", tmp_path / "none", "genfast train-class --model lamamba-mini --out none --half")
    backbones = tiny_backbones(tmp_path, ("DiT", "AsCAN"))
    monkeypatch.setattr(models, "class_pipelines", [*backbones, gone])
    client = Client(url, verbose=False)
    gallery, table, numbers = client.predict("green star", 3, 4, 4.0, api_name="/backbones")
    assert [row["name"] for row in numbers["models"]] == ["DiT", "AsCAN"] and len(gallery) == 2
    for item, backbone in zip(gallery, backbones, strict=True):
        assert (shrink(item["image"]) == direct(direct_pipeline(backbone.folder), "green star", 3, 4, 4.0)).all()
    assert numbers["missing"][0]["command"] == gone.command and gone.command in table
    with pytest.raises(AppError) as err:
        client.predict("green cat", 3, 4, 4.0, api_name="/backbones")
    assert "green cat" in str(err.value) and "Traceback" not in str(err.value)
