"""Compare tab: a small `genfast compare` run from the page -- the same code, the same report.

Each run writes a fresh report folder under the demo's temp folder (report.md / .json, grid.png,
pareto.png) and shows its table, its speed/quality plot and its image grid. Progress follows the
comparison's own progress bars; Cancel stops it at the next denoising step.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
from pathlib import Path

import gradio as gr

from .common import (
    MAX_GUIDANCE,
    MAX_STEPS,
    Tab,
    check_int,
    check_number,
    demo_dir,
    user_errors,
)

MAX_IMAGES = 16
DEFAULT_RECIPES = "feature_inheritance:interval=2,3,5\nquantize:weights=int8"


def parse_recipes(text) -> list[str]:
    """One `--method` spec per line (blank lines skipped); a gr.Error when there is none."""
    specs = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not specs:
        raise gr.Error("Give at least one method, one per line, e.g. feature_inheritance:interval=2,3,5")
    return specs


def report_table(report_md: str) -> str:
    """report.md without its title and image links (the page shows the images itself)."""
    keep = [line for line in report_md.splitlines()[1:] if not line.startswith("![")]
    return "\n".join(keep).strip()


class CompareTab(Tab):
    TAB = "compare"

    @user_errors
    def run(self, recipes, num_images, steps, guidance, request: gr.Request = None,
            progress=gr.Progress(track_tqdm=True)):  # noqa: B008 -- Gradio injects its tracker
        """(report table markdown, pareto.png, grid.png, report dict) of one comparison."""
        from ..eval.compare import CompareSettings, run_compare
        from ..eval.variants import parse_variants
        from .common import step_callback

        specs = parse_recipes(recipes)
        num_images = check_int("Images", num_images, 2, MAX_IMAGES)  # FID needs two images per set
        steps = check_int("Steps", steps, 1, MAX_STEPS)
        guidance = check_number("Guidance", guidance, 0.0, MAX_GUIDANCE)
        variants = parse_variants(specs)  # every spec checked before anything runs
        flag = self.jobs.start(request, self.TAB)
        out = Path(tempfile.mkdtemp(prefix="compare-", dir=demo_dir()))
        command = " ".join(["genfast compare", *(f"--method {shlex.quote(s)}" for s in specs),
                            f"--num-images {num_images} --steps {steps} --guidance {guidance:g} --runs 1"])
        settings = CompareSettings(pipeline=self.models.pipeline_path, num_images=num_images, steps=steps,
                                   guidance=guidance, batch_size=num_images, runs=1, out=str(out), command=command,
                                   step_callback=step_callback(flag))
        try:
            report = run_compare(settings, variants)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)  # a failed or cancelled run leaves no half-written report
            raise
        table = report_table((out / "report.md").read_text())
        return table, str(out / "pareto.png"), str(out / "grid.png"), report

    def build(self) -> None:
        t = self.TAB
        with gr.Row():
            with gr.Column(scale=1):
                recipes = gr.Textbox(DEFAULT_RECIPES, lines=4, elem_id=f"{t}-recipes",
                                     label="Methods, one per line (as `genfast compare --method`; a,b,c sweeps)")
                with gr.Row():
                    num_images = gr.Slider(2, MAX_IMAGES, value=4, step=1, label="Images (held-out prompts)",
                                           elem_id=f"{t}-images")
                    steps = gr.Slider(1, MAX_STEPS, value=25, step=1, label="Steps", elem_id=f"{t}-steps")
                    guidance = gr.Slider(0, MAX_GUIDANCE, value=5.0, step=0.5, label="Guidance",
                                         elem_id=f"{t}-guidance")
                run, stop = self.buttons("Compare")
            with gr.Column(scale=2):
                pareto = gr.Image(label="Speed-up against quality", elem_id=f"{t}-pareto", format="png", buttons=["download"])
        table, raw = self.numbers("raw numbers (report.json)")
        grid = gr.Image(label="Baseline and variants, same prompts and seeds", elem_id=f"{t}-grid", format="png")
        # its own limit: a comparison loads its own pipeline and judges, so it takes no worker
        self.wire(run, stop, [recipes, num_images, steps, guidance], [table, pareto, grid, raw],
                  concurrency_id=t, concurrency_limit=1)
