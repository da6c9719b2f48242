"""What `genfast.quantize`'s remove() must restore, checked the same way by every quantization test."""

import torch

from genfast.api import handles_on


def snapshot(model):
    """Parameter objects (in order), module classes, and the state dict."""
    return ([(n, p) for n, p in model.named_parameters()], [(n, type(m)) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


def assert_restored(model, snap):
    params, classes, state = snap
    now = list(model.named_parameters())
    assert [n for n, _ in now] == [n for n, _ in params]
    assert all(a is b for (_, a), (_, b) in zip(now, params, strict=True)), "the same Parameter objects"
    assert [(n, type(m)) for n, m in model.named_modules()] == classes
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    now_state = model.state_dict()
    assert now_state.keys() == state.keys()
    assert all(torch.equal(now_state[k], v) and now_state[k].dtype == v.dtype for k, v in state.items())
    assert "quantize" not in handles_on(model)
