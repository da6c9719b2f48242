"""Assemble tab: the teacher, the assembled student and multi-UNet switching (the student runs the
first steps, the teacher the rest) on one prompt and seed; the three images, the latency of each,
the speed-ups, PSNR/SSIM to the teacher, and the UNets' parameter counts.

The student is a UNet folder or a pipeline folder (its unet/), by default the embedded
genfast-mini-assembled when the demo runs genfast-mini. It is loaded once per process and shared by
the workers: multi_unet claims and hooks only the teacher, and the student is loaded in the teacher's
dtype and device, so multi_unet never moves it; inference changes nothing on it, so concurrent jobs
can run it together. The student's own pipeline is the worker's components with the student as UNet:
nothing but the UNet is loaded.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import torch

from .common import (
    DemoModels,
    SameSeed,
    Tab,
    check_generation,
    check_number,
    enlarge,
    fmt_seconds,
    prompt_box,
    sampling_inputs,
    to_pil,
    uint8_pixels,
    user_errors,
    with_denoiser,
)


def default_student(models: DemoModels) -> str:
    """The embedded assembled student on genfast-mini (it is genfast-mini's), else nothing."""
    if not models.is_mini:
        return ""
    from ..models import MINI_ASSEMBLED, asset_path

    try:
        return str(asset_path(MINI_ASSEMBLED))
    except FileNotFoundError:
        return ""


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def load_student(models: DemoModels, folder, pipe) -> torch.nn.Module:
    """The student UNet in `folder`, loaded once per process and checked against the teacher of `pipe` (a worker
    the caller holds: no other job changes it meanwhile); a gr.Error naming the folder when it does not load or
    cannot take the teacher's calls."""
    from ..assembly.student import load_student as load
    from ..methods.multi_unet import check_compatible

    if not isinstance(folder, str) or not folder.strip():
        raise gr.Error("Give the student's folder: a UNet folder (config.json + weights) or a pipeline folder whose "
                       "unet/ is the student, e.g. one written by `genfast distill`.")
    path = Path(folder.strip()).expanduser().resolve()
    if not path.is_dir():
        raise gr.Error(f"Student folder {folder.strip()!r} does not exist: give a UNet folder or a pipeline folder.")
    teacher = getattr(pipe, "unet", None)
    if not isinstance(teacher, torch.nn.Module):
        raise gr.Error(f"The Assemble tab needs a UNet pipeline; the demo runs a {type(pipe).__name__}.")

    def build():
        try:
            student = load(path, torch_dtype=teacher.dtype).to(teacher.device).eval().requires_grad_(False)
        except Exception as err:  # noqa: BLE001 -- a user's folder fails in many ways, each the folder's problem
            raise gr.Error(f"Student folder {str(path)!r} does not load as a UNet: {err}") from None
        try:
            check_compatible(teacher, student, pipe)
        except ValueError as err:
            raise gr.Error(f"Student folder {str(path)!r} does not fit the demo's pipeline: {err}") from None
        return student

    return models.shared(f"assemble:student:{path}", build)


def student_pipeline(pipe, student: torch.nn.Module):
    """The worker's pipeline with the student as its UNet (every other component the worker's own objects)."""
    return with_denoiser(pipe, student)


def check_switch(switch_at, steps: int) -> float:
    """switch_at in (0, 1) that gives the student at least one of `steps` steps (else it has no effect)."""
    from ..methods.multi_unet import student_steps

    switch_at = check_number("Switch at", switch_at, 0.0, 1.0)
    if switch_at in (0.0, 1.0):
        what = "gives the student no step: the teacher alone" if switch_at == 0 else \
            "gives the student every step: the student alone"
        raise gr.Error(f"Switch at {switch_at:g} {what}, which the other columns already show. Choose a value "
                       f"between 0 and 1 (e.g. 0.4: the student runs the first 40% of the steps).")
    if student_steps(steps, switch_at) == 0:
        raise gr.Error(f"Switch at {switch_at:g} with {steps} steps gives the student none of the steps (it runs the "
                       f"first floor({switch_at:g} x {steps}) = 0): raise Switch at to at least {1 / steps:.2f} or "
                       f"take more steps.")
    return switch_at


def numbers_table(n: dict) -> str:
    t, s, m = n["teacher"], n["student"], n["multi_unet"]
    return "\n".join([
        "| | teacher | student | multi-UNet |",
        "|---|---|---|---|",
        f"| latency | {fmt_seconds(t['latency_s'])} | {fmt_seconds(s['latency_s'])} | {fmt_seconds(m['latency_s'])} |",
        f"| speed-up vs teacher | | {s['speedup']:.2f}x | {m['speedup']:.2f}x |",
        f"| PSNR / SSIM to the teacher | | {s['psnr']:.1f} dB / {s['ssim']:.3f} | {m['psnr']:.1f} dB / {m['ssim']:.3f} |",
        (f"| UNet parameters | {t['unet_params'] / 1e6:.2f}M | {s['unet_params'] / 1e6:.2f}M "
         f"({n['param_ratio']:.2f}x) | both |"),
        (f"| denoiser steps run by student / teacher | 0 / {n['steps']} | {n['steps']} / 0 | "
         f"{m['student_steps']} / {m['teacher_steps']} |"),
    ])


class AssembleTab(Tab):
    TAB = "assemble"

    @user_errors
    def run(self, prompt, seed, steps, guidance, switch_at, student, request: gr.Request = None,
            progress=gr.Progress()):  # noqa: B008 -- Gradio injects its tracker there
        """(teacher image, student image, multi-UNet image, numbers markdown, numbers)."""
        from .. import accelerate
        from ..eval.cost import time_call
        from ..eval.faithfulness import faithfulness

        prompt, seed, steps, guidance = check_generation(prompt, seed, steps, guidance)
        switch_at = check_switch(switch_at, steps)
        flag = self.jobs.start(request, self.TAB)
        same = SameSeed(prompt, seed, steps, guidance, flag, progress)

        with self.models.worker() as pipe:
            progress(None, desc="loading the student")
            student_unet = load_student(self.models, student, pipe)
            teacher, teacher_images = time_call(pipe, same.call(pipe, "teacher"))
            small = student_pipeline(pipe, student_unet)
            solo, student_images = time_call(small, same.call(small, "student"))
            handle = accelerate(pipe, "multi_unet", student=student_unet, switch_at=switch_at)
            try:
                multi, multi_images = time_call(pipe, same.call(pipe, "multi-UNet"))
                counts = handle.stats
            finally:
                handle.remove()
            teacher_params = count_params(pipe.unet)
        student_params = count_params(student_unet)
        reference = uint8_pixels(teacher_images)
        numbers = {
            "prompt": prompt, "seed": seed, "steps": steps, "guidance": guidance, "switch_at": switch_at,
            "student_folder": str(Path(student.strip()).expanduser().resolve()),
            "teacher": {"latency_s": teacher.call_s, "unet_params": teacher_params},
            "student": {"latency_s": solo.call_s, "speedup": teacher.call_s / solo.call_s,
                        "unet_params": student_params, **faithfulness(uint8_pixels(student_images), reference)},
            "multi_unet": {"latency_s": multi.call_s, "speedup": teacher.call_s / multi.call_s,
                           "student_steps": counts["student"], "teacher_steps": counts["teacher"],
                           **faithfulness(uint8_pixels(multi_images), reference)},
            "param_ratio": student_params / teacher_params,
        }
        images = [enlarge(to_pil(x[0])) for x in (teacher_images, student_images, multi_images)]
        return *images, numbers_table(numbers), numbers

    def build(self) -> None:
        t = self.TAB
        with gr.Row():
            with gr.Column(scale=1):
                prompt = prompt_box(t)
                student = gr.Textbox(label="Student folder", value=default_student(self.models),
                                     placeholder="a UNet folder, or a pipeline folder whose unet/ is the student",
                                     info="an assembled student of this pipeline's UNet (genfast assemble / distill)",
                                     elem_id=f"{t}-student")
                seed, steps, guidance = sampling_inputs(t)
                switch_at = gr.Slider(0.05, 0.95, value=0.4, step=0.05, label="Switch at (multi-UNet)",
                                      info="the fraction of steps the student runs before the teacher takes over",
                                      elem_id=f"{t}-switch-at")
                run, stop = self.buttons("Run teacher, student and multi-UNet")
            with gr.Column(scale=2):
                with gr.Row():
                    teacher = gr.Image(label="Teacher", elem_id=f"{t}-teacher", format="png", buttons=["download"])
                    small = gr.Image(label="Student", elem_id=f"{t}-student-image", format="png",
                                     buttons=["download"])
                    multi = gr.Image(label="Multi-UNet", elem_id=f"{t}-multi", format="png", buttons=["download"])
                table, raw = self.numbers()
        self.wire(run, stop, [prompt, seed, steps, guidance, switch_at, student], [teacher, small, multi, table, raw])
