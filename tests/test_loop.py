"""The one training loop (genfast.training.loop): exact resume, budget, lock, run record, safe checkpoints."""

from __future__ import annotations

import pytest
import torch
from planted import assert_planted_pickles_refused

from genfast.training import loop as loop_mod
from genfast.training.checkpoint import CheckpointError, flatten, unflatten
from genfast.training.loop import LoopConfig, TrainLoop, WorkDirLock, WorkDirLocked

STEPS = 6


def _loop(work, steps=STEPS, run_info=None, **cfg):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    cfg = {"checkpoint_every": 2, "grad_accum": 2, "ema_decay": 0.9, "progress": False, **cfg}
    return TrainLoop(work, LoopConfig(steps=steps, **cfg), {"net": net}, opt, sched, ema=("net",),
                     run_info=run_info if run_info is not None else {"recipe": {"lr": 1e-2}})


def _step_fn(loop, stop_at=None):
    def step_fn(step):
        if step == stop_at:
            raise KeyboardInterrupt
        g = torch.Generator().manual_seed(1000 * step + loop.micro)
        x = torch.randn(8, 4, generator=g)
        return loop.models["net"](x).pow(2).mean()  # dropout draws from the global RNG: resumed too
    return step_fn


def _snapshot(loop):
    _, opt = flatten(loop.optimizer.state_dict())
    return {"weights": loop.unwrap("net").state_dict(), "optimizer": opt,
            "ema": dict(enumerate(loop.ema_models["net"].shadow_params)),
            "lr": {"lr": torch.tensor(loop.lr_scheduler.get_last_lr())}}


def _assert_identical(a, b):
    for part in a:
        assert a[part].keys() == b[part].keys(), part
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part} {k}"


@pytest.fixture
def straight(tmp_path):
    with _loop(tmp_path / "straight") as loop:
        assert loop.run(_step_fn(loop)) is True
        return _snapshot(loop)


def test_interrupted_run_resumes_bit_identically(tmp_path, straight):
    work = tmp_path / "work"
    with _loop(work) as loop, pytest.raises(KeyboardInterrupt):
        loop.run(_step_fn(loop, stop_at=3))  # after the step-2 checkpoint
    with _loop(work) as loop:
        assert loop.resume() == 2
        assert loop.run(_step_fn(loop)) is True
        assert loop.step == STEPS
        resumed = _snapshot(loop)
    _assert_identical(straight, resumed)
    assert (work / "checkpoints" / "latest").read_text() == f"step-{STEPS:07d}"


def test_budget_stop_checkpoints_and_resumes(tmp_path, straight, monkeypatch):
    clock = iter(range(0, 10_000, 60))  # one minute passes per reading
    monkeypatch.setattr(loop_mod, "_now", lambda: next(clock))
    work = tmp_path / "work"
    with _loop(work, max_minutes=2.5, checkpoint_every=100) as loop:
        assert loop.run(_step_fn(loop)) is False
        assert loop.step == 3
    assert (work / "checkpoints" / "latest").read_text() == "step-0000003"
    monkeypatch.setattr(loop_mod, "_now", lambda: 0.0)
    with _loop(work, max_minutes=2.5, checkpoint_every=100) as loop:
        assert loop.run(_step_fn(loop)) is True
        _assert_identical(straight, _snapshot(loop))


def test_time_based_checkpoints_come_between_step_based_ones(tmp_path, straight, monkeypatch):
    clock = iter(range(0, 10_000, 60))  # one minute passes per reading
    monkeypatch.setattr(loop_mod, "_now", lambda: next(clock))
    work, saved = tmp_path / "work", []
    with _loop(work, checkpoint_every=100, checkpoint_minutes=1.5) as loop:
        assert loop.run(_step_fn(loop), on_save=saved.append) is True
        _assert_identical(straight, _snapshot(loop))
    # readings: start 0; after step 1 one minute has passed (no save), after step 2 two (save, clock
    # restarts); and so on; the last step is saved as the end of the run, not by the clock
    assert saved == [2, 4, STEPS]


def test_a_locked_work_folder_is_refused(tmp_path):
    work = tmp_path / "work"
    first = _loop(work)
    with pytest.raises(WorkDirLocked, match=str(work)):
        _loop(work)
    first.close()
    with _loop(work):  # released
        pass
    with WorkDirLock(work), pytest.raises(WorkDirLocked):
        _loop(work)
    with WorkDirLock(work) as lock:
        loop = TrainLoop(work, LoopConfig(steps=1, progress=False), {"m": torch.nn.Linear(1, 1)},
                         torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1), lock=lock)
        loop.close()  # a lock handed in stays with its owner
        with pytest.raises(WorkDirLocked):
            WorkDirLock(work)


def test_a_run_with_other_inputs_is_refused_naming_the_key(tmp_path):
    work = tmp_path / "work"
    with _loop(work, run_info={"recipe": {"lr": 1e-2, "batch": 4}, "data_sha256": "ab"}) as loop:
        loop.run(_step_fn(loop))
    with pytest.raises(ValueError, match=r"recipe\.lr") as err:
        _loop(work, run_info={"recipe": {"lr": 2e-2, "batch": 4}, "data_sha256": "ab"})
    assert "batch" not in str(err.value) and "data_sha256" not in str(err.value)
    with pytest.raises(ValueError, match="data_sha256"):
        _loop(work, run_info={"recipe": {"lr": 1e-2, "batch": 4}, "data_sha256": "cd"})
    with _loop(work, run_info={"recipe": {"lr": 1e-2, "batch": 4}, "data_sha256": "ab"}):
        pass  # the same inputs: accepted (and the refused attempts left the lock free)


def test_bf16_mixed_precision_runs_on_cpu(tmp_path):
    dtypes = []
    with _loop(tmp_path / "work", mixed_precision="bf16", cpu=True) as loop:
        loop.unwrap("net")[0].register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))

        def step_fn(step):
            return loop.models["net"](torch.randn(8, 4)).pow(2).mean()

        before = loop.unwrap("net")[0].weight.detach().clone()
        assert loop.run(step_fn) is True
        assert loop.accelerator.mixed_precision == "bf16"
        assert set(dtypes) == {torch.bfloat16}  # the layers ran under autocast
        weight = loop.unwrap("net")[0].weight
        assert weight.dtype == torch.float32 and not torch.equal(weight, before)  # fp32 master weights trained
    with _loop(tmp_path / "other") as loop:  # a later loop in the same process goes back to full precision
        assert loop.accelerator.mixed_precision == "no"


@pytest.mark.parametrize("field,value", [
    ("steps", 0), ("steps", 2.5), ("checkpoint_every", 0), ("grad_accum", 0), ("keep", 0),
    ("max_minutes", 0.0), ("max_minutes", -1.0), ("mixed_precision", "fp8"), ("ema_decay", 1.0),
    ("ema_decay", 0.0), ("ema_power", -1.0), ("max_grad_norm", 0.0),
])
def test_bad_config_values_raise_naming_the_field(field, value):
    kwargs = {"steps": 3, field: value}
    if field == "ema_power":
        kwargs["ema_decay"] = 0.9
    with pytest.raises(ValueError, match=f"LoopConfig.{field}"):
        LoopConfig(**kwargs)


def test_options_without_effect_are_errors(tmp_path):
    with pytest.raises(ValueError, match="ema_power has no effect"):
        LoopConfig(steps=3, ema_power=0.75)
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="ema_decay has no effect"):
        TrainLoop(tmp_path / "a", LoopConfig(steps=1, ema_decay=0.9), {"net": net}, opt)
    with pytest.raises(ValueError, match="without LoopConfig.ema_decay"):
        TrainLoop(tmp_path / "b", LoopConfig(steps=1), {"net": net}, opt, ema=("net",))
    with pytest.raises(ValueError, match="not among the models"):
        TrainLoop(tmp_path / "c", LoopConfig(steps=1, ema_decay=0.9), {"net": net}, opt, ema=("unet",))
    TrainLoop(tmp_path / "a", LoopConfig(steps=1), {"net": net}, opt).close()  # the refusals left no lock behind


def test_tampered_checkpoints_are_refused_and_never_unpickled(tmp_path):
    work = tmp_path / "work"
    with _loop(work, steps=2) as loop:
        loop.run(_step_fn(loop))

    def resume():
        with _loop(work, steps=4) as again:
            again.resume()

    assert_planted_pickles_refused(work / "checkpoints", resume, tmp_path)
    folder = work / "checkpoints" / "step-0000002"
    (folder / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"ema\.safetensors is missing"):
        resume()


def test_flatten_round_trips_nested_state():
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 3)}, 7: {}},
             "param_groups": [{"params": [0, 7], "betas": (0.9, 0.999), "lr": 1e-3, "foreach": None,
                               "amsgrad": False, "name": "x"}],
             "__tensor__": "not a marker", "shared": [torch.zeros(4)] * 2}
    skeleton, tensors = flatten(state)
    import json

    back = unflatten(json.loads(json.dumps(skeleton)), tensors)
    assert back.keys() == state.keys() and back["__tensor__"] == "not a marker"
    assert list(back["state"]) == [0, 7] and torch.equal(back["state"][0]["exp_avg"], torch.ones(2, 3))
    assert back["param_groups"][0]["betas"] == (0.9, 0.999) and back["param_groups"][0]["foreach"] is None
    assert len(back["shared"]) == 2 and all(torch.equal(t, torch.zeros(4)) for t in back["shared"])
    with pytest.raises(TypeError, match="function at /lambda"):
        flatten({"lambda": lambda: 0})


def test_dataloader_batches_resume_where_they_stopped(tmp_path):
    data = torch.utils.data.TensorDataset(torch.arange(10.0)[:, None])  # 4 shuffled batches an epoch

    def run(work, stop_after=None):
        torch.manual_seed(0)
        net = torch.nn.Linear(1, 1)
        dl = torch.utils.data.DataLoader(data, batch_size=3, shuffle=True)
        seen = []
        with TrainLoop(work, LoopConfig(steps=9, checkpoint_every=3, progress=False), {"net": net},
                       torch.optim.SGD(net.parameters(), lr=0.01), dataloader=dl) as loop:
            def step_fn(step):
                if len(seen) == stop_after:
                    raise KeyboardInterrupt
                (x,) = loop.next_batch()
                seen.append(x.flatten().tolist())
                return loop.models["net"](x).pow(2).mean()

            try:
                loop.run(step_fn)
            except KeyboardInterrupt:
                pass
        return seen

    straight = run(tmp_path / "a")
    epochs = [sorted(v for batch in straight[k:k + 4] for v in batch) for k in (0, 4)]
    assert epochs[0] == epochs[1] == [float(i) for i in range(10)]  # an epoch: each item once
    assert straight[:4] != straight[4:8]  # each epoch its own shuffle
    assert run(tmp_path / "b", stop_after=5) == straight[:5]  # the checkpoint at step 3: mid-epoch
    assert run(tmp_path / "b") == straight[3:]
