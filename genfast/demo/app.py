"""The Gradio app of `genfast demo`: one Blocks page, one tab per capability, one queue.

Every tab is a class in its own module (`build()` lays out its components and events, `run()` is
the handler, callable as a plain function). The models are loaded once (`DemoModels`) and shared
by every tab; work on a denoiser borrows a worker pipeline, so the queue's limit for those jobs is
the number of workers.
"""

from __future__ import annotations

import gradio as gr

from .accelerate_tab import AccelerateTab
from .assemble_tab import AssembleTab
from .backbones_tab import BackbonesTab
from .bits_tab import BitsTab
from .common import DemoModels, Jobs
from .compare_tab import CompareTab
from .heads_tab import HeadsTab
from .quantize_tab import QuantizeTab

TABS = (("Accelerate", AccelerateTab), ("Compare", CompareTab), ("Quantize", QuantizeTab),
        ("Assemble", AssembleTab), ("Backbones", BackbonesTab), ("Bits", BitsTab), ("3D heads", HeadsTab))

INTRO = """# genfast demo
The same prompt and seed through the baseline and the faster model, side by side: what each took and
how close the fast one stays. Every number on this page is measured now, on this machine."""

# system fonts only: the default theme would fetch Google's fonts, which an offline machine cannot reach
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])
CSS = "img { image-rendering: pixelated; }"  # genfast-mini's 64x64 images, enlarged: keep pixels sharp


def build_app(models: DemoModels) -> gr.Blocks:
    jobs = Jobs()
    with gr.Blocks(title="genfast demo", analytics_enabled=False) as app:  # offline first: no telemetry
        gr.Markdown(INTRO, elem_id="intro")
        with gr.Tabs():
            for label, tab_class in TABS:
                tab = tab_class(models, jobs)
                with gr.Tab(label, id=tab.TAB, elem_id=f"tab-{tab.TAB}"):
                    tab.build()
    return app.queue(max_size=64)


def launch(models: DemoModels, host: str = "127.0.0.1", port: int | None = 7860, block: bool = True, **kwargs):
    """Serve the app; (app, local URL). block=False returns at once (tests and benches)."""
    app = build_app(models)
    _, url, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, theme=THEME, css=CSS,
                           max_file_size="20mb", quiet=not block, footer_links=["api"], **kwargs)
    return app, url
