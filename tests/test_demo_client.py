"""`genfast demo` served on 127.0.0.1 and driven through gradio_client, as a remote user would."""

import concurrent.futures

import pytest
from demo_helpers import direct, shrink
from gradio_client import Client
from gradio_client.exceptions import AppError

PROMPT = "a blue triangle on a white background"


@pytest.fixture(scope="module")
def reference():
    from genfast.models import load_mini

    pipe = load_mini()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_binds_to_localhost_and_names_every_tab_endpoint(demo_server):
    _, url = demo_server
    assert url.startswith("http://127.0.0.1:")
    api = Client(url, verbose=False).view_api(return_format="dict", print_info=False)
    endpoints = set(api["named_endpoints"])
    for tab in ("accelerate", "compare", "quantize", "assemble", "heads"):
        assert f"/{tab}" in endpoints and f"/cancel_{tab}" in endpoints


def test_accelerate_endpoint_returns_the_images_genfast_makes(demo_server, reference):
    _, url = demo_server
    base, fast, _slider, table, numbers = Client(url, verbose=False).predict(
        PROMPT, 5, 10, 5.0, "feature_inheritance:interval=2", api_name="/accelerate")
    assert (shrink(base) == direct(reference, PROMPT, 5, 10, 5.0)).all()
    assert (shrink(fast) == direct(reference, PROMPT, 5, 10, 5.0, [("feature_inheritance", {"interval": 2})])).all()
    assert numbers["accelerated"]["full_calls"] == 5 and numbers["baseline"]["full_calls"] == 10
    assert f"{numbers['psnr']:.1f} dB" in table


def test_four_concurrent_clients_all_get_their_own_correct_result(demo_server, reference):
    _, url = demo_server
    clients = [Client(url, verbose=False) for _ in range(4)]
    jobs = [c.submit(PROMPT, seed, 12, 5.0, "feature_inheritance:interval=3", api_name="/accelerate")
            for seed, c in enumerate(clients)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda j: j.result(timeout=300), jobs))
    for seed, (base, fast, *_rest, numbers) in enumerate(results):
        assert numbers["seed"] == seed
        assert (shrink(base) == direct(reference, PROMPT, seed, 12, 5.0)).all()
        assert (shrink(fast) == direct(reference, PROMPT, seed, 12, 5.0,
                                       [("feature_inheritance", {"interval": 3})])).all()


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


def test_cancel_endpoint_stops_a_running_job_and_the_next_one_runs(demo_server, reference):
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
    assert (shrink(base) == direct(reference, PROMPT, 2, 6, 5.0)).all()
    with models.worker() as a, models.worker() as b:  # both back in the pool, nothing left on them
        assert not any(p.unet.__dict__.get("_genfast_handles") for p in (a, b))
