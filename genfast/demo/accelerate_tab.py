"""Accelerate tab: one prompt and seed through the baseline and through a method (or a chain of
methods) on the same worker pipeline; both images, the latency of each, the speed-up, PSNR/SSIM of
the fast image to the baseline's, and how many denoiser calls ran in full.

A recipe is written as `genfast compare --method` takes it (genfast.eval.variants), so what the
page runs is what a report measures: `feature_inheritance:interval=3`,
`quantize:weights=int8+feature_inheritance`, ... One variant at a time: a sweep belongs in the
Compare tab.
"""

from __future__ import annotations

import gradio as gr

from .common import (
    DemoModels,
    SameSeed,
    Tab,
    check_generation,
    enlarge,
    fmt_seconds,
    prompt_box,
    sampling_inputs,
    to_pil,
    uint8_pixels,
    user_errors,
)


def example_recipes(models: DemoModels) -> list[str]:
    recipes = ["feature_inheritance", "feature_inheritance:interval=5", "feature_inheritance:schedule=calibrated",
               "feature_inheritance:level=block", "gri_attention", "quantize:weights=int8",
               "quantize:weights=int4:granularity=group:32+feature_inheritance"]
    if models.is_mini:  # the embedded student is genfast-mini's
        from ..models import MINI_ASSEMBLED, asset_path

        try:
            recipes.append(f"multi_unet:student={asset_path(MINI_ASSEMBLED)}:switch_at=0.4")
        except FileNotFoundError:
            pass
    return recipes


def method_help() -> str:
    """Every registered method with its options, from the config dataclasses themselves."""
    from dataclasses import fields

    from ..api import list_methods, method_spec

    lines = ["| method | options | what it does |", "|---|---|---|"]
    for name, summary in list_methods().items():
        options = ", ".join(f.name for f in fields(method_spec(name).config_cls))
        lines.append(f"| `{name}` | {options} | {summary} |")
    return "\n".join(lines)


def parse_recipe(recipe):
    """The one variant a recipe names; a gr.Error for an empty recipe or a sweep."""
    from ..eval.variants import parse_method_spec

    if not isinstance(recipe, str) or not recipe.strip():
        raise gr.Error("Choose a method, e.g. feature_inheritance:interval=3 (the list under 'Methods' has all).")
    variants = parse_method_spec(recipe.strip())  # ValueErrors name the bad method / option / value
    if len(variants) != 1:
        raise gr.Error(f"{recipe!r} is a sweep of {len(variants)} variants; give one value per option here "
                       f"(the Compare tab runs sweeps).")
    return variants[0]


def numbers_table(numbers: dict) -> str:
    b, f = numbers["baseline"], numbers["accelerated"]
    loop = "n/a" if numbers["loop_speedup"] is None else f"{numbers['loop_speedup']:.2f}x"
    return "\n".join([
        "| | baseline | accelerated |",
        "|---|---|---|",
        f"| latency | {fmt_seconds(b['latency_s'])} | {fmt_seconds(f['latency_s'])} |",
        f"| denoiser calls full / all | {b['full_calls']} / {b['calls']} | {f['full_calls']} / {f['calls']} |",
        f"| speed-up (call / denoising loop) | | {numbers['speedup']:.2f}x / {loop} |",
        f"| PSNR / SSIM to the baseline | | {numbers['psnr']:.1f} dB / {numbers['ssim']:.3f} |",
    ])


class AccelerateTab(Tab):
    TAB = "accelerate"

    @user_errors
    def run(self, prompt, seed, steps, guidance, recipe, request: gr.Request = None, progress=gr.Progress()):  # noqa: B008 -- Gradio injects its tracker there
        """(baseline image, accelerated image, (baseline, accelerated) for the slider, numbers markdown, numbers)."""
        from ..api import handles_on
        from ..eval.compare import apply_recipe, remove_recipe
        from ..eval.cost import time_call
        from ..eval.faithfulness import faithfulness
        from ..pipelines import denoiser_of

        prompt, seed, steps, guidance = check_generation(prompt, seed, steps, guidance)
        variant = parse_recipe(recipe)
        flag = self.jobs.start(request, self.TAB)
        same = SameSeed(prompt, seed, steps, guidance, flag, progress)

        with self.models.worker() as pipe:
            on = set(handles_on(denoiser_of(pipe))) & {step.method for step in variant.steps}
            if on:  # a pipeline folder loaded quantized, say: the method cannot go on twice
                raise gr.Error(f"The demo's pipeline already has {', '.join(sorted(on))} on its denoiser (it was "
                               f"loaded that way): take it out of the recipe.")
            base, base_images = time_call(pipe, same.call(pipe, "baseline"))
            progress(None, desc=f"applying {variant.name}")
            # prepare() may run a calibration call (feature inheritance's calibrated schedule): same prompt and seed
            handles = apply_recipe(pipe, variant, same.kwargs("calibrating"))
            try:
                fast, fast_images = time_call(pipe, same.call(pipe, "accelerated"), handles)
            finally:
                remove_recipe(handles)
        faith = faithfulness(uint8_pixels(fast_images), uint8_pixels(base_images))
        numbers = {
            "recipe": variant.name,
            "prompt": prompt, "seed": seed, "steps": steps, "guidance": guidance,
            "baseline": {"latency_s": base.call_s, "loop_s": base.loop_s, "calls": base.denoiser_calls,
                         "full_calls": base.full_denoiser_calls},
            "accelerated": {"latency_s": fast.call_s, "loop_s": fast.loop_s, "calls": fast.denoiser_calls,
                            "full_calls": fast.full_denoiser_calls},
            "speedup": base.call_s / fast.call_s,
            "loop_speedup": base.loop_s / fast.loop_s if fast.loop_s else None,
            **faith,
        }
        a, b = enlarge(to_pil(base_images[0])), enlarge(to_pil(fast_images[0]))
        return a, b, (a, b), numbers_table(numbers), numbers

    def build(self) -> None:
        t = self.TAB
        recipes = example_recipes(self.models)
        with gr.Row():
            with gr.Column(scale=1):
                prompt = prompt_box(t)
                recipe = gr.Dropdown(recipes, value=recipes[0], allow_custom_value=True, elem_id=f"{t}-recipe",
                                     label="Method or chain (as `genfast compare --method` takes it)")
                seed, steps, guidance = sampling_inputs(t)
                run, stop = self.buttons("Run baseline and accelerated")
                with gr.Accordion("Methods and their options", open=False):
                    gr.Markdown(method_help())
            with gr.Column(scale=2):
                with gr.Row():
                    base = gr.Image(label="Baseline", elem_id=f"{t}-baseline", format="png", buttons=["download"])
                    fast = gr.Image(label="Accelerated", elem_id=f"{t}-accelerated", format="png", buttons=["download"])
                slider = gr.ImageSlider(label="Before / after", elem_id=f"{t}-slider", format="png")
                table, raw = self.numbers()
        self.wire(run, stop, [prompt, seed, steps, guidance, recipe], [base, fast, slider, table, raw])
