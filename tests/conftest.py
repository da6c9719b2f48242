import os

import pytest
import torch

# Nothing may reach a hub during tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny layers gain nothing from a second thread, and on a shared CPU its spin-waits cost 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mini_reference():
    """genfast-mini loaded plainly, outside the demo: what the demo's images are compared with."""
    from genfast.models import load_mini

    pipe = load_mini()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def demo_server():
    """The whole `genfast demo` app on the embedded models, served on 127.0.0.1 for the session:
    (DemoModels, local URL). The gradio_client and browser tests share it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from genfast.demo.app import launch
    from genfast.demo.common import DemoModels

    models = DemoModels()
    models.warm_up()
    app, url = launch(models, host="127.0.0.1", port=None, block=False)
    yield models, url
    app.close()


@pytest.fixture
def stop_after(monkeypatch):
    """Make the training loop's budget clock run so that a run with max_minutes=1 stops after `steps` steps."""
    from genfast.training import loop as loop_module

    def set_steps(steps):
        clock = iter(range(0, 10**6, 60 // steps + 1))
        monkeypatch.setattr(loop_module, "_now", lambda: float(next(clock)))

    return set_steps
