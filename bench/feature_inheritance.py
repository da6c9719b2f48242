"""Feature inheritance against DeepCache, side by side in one run.

(a) the SD-1.5 UNet architecture (UNet2DConditionModel's defaults, cross-attention 768) built from
    its config with random weights, 256x256, speed only;
(b) genfast-mini: speed, faithfulness to the unaccelerated images at the same prompts and seeds
    (PSNR, SSIM) and prompt accuracy.

Every variant runs the same prompts, seeds and number of steps; timings are of the denoising
loop (prompt embeddings are computed beforehand, decoding happens afterwards) and speed-ups
are ratios to the baseline measured in this same run. DeepCache (`pip install DeepCache`, a
bench-only dependency: `pip install -e '.[bench]'`) runs with cache_branch_id=0, genfast with
its equivalent, level="layer", branch=0.

    python bench/feature_inheritance.py [--steps 50] [--intervals 3 5] [--sd15-intervals 3] [--part sd15 mini]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
from tqdm.auto import tqdm

import genfast
from genfast.eval.faithfulness import faithfulness
from genfast.eval.prompt_accuracy import eval_prompts, prompt_accuracy
from genfast.models import load_evaluator, load_mini


def deepcache(pipe, interval):
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    helper.enable()
    return helper.disable


def genfast_variant(**options):
    def enable(pipe, interval):
        handle = genfast.accelerate(pipe, "feature_inheritance", level="layer", branch=0, interval=interval,
                                    **options)
        return handle, handle.remove

    return enable


VARIANTS = {
    "deepcache": None,
    "genfast uniform": genfast_variant(schedule="uniform"),
    "genfast nonuniform": genfast_variant(schedule="nonuniform"),
    "genfast calibrated": genfast_variant(schedule="calibrated"),
    # partial steps also reuse attention inside the fresh branch: faster, a little less faithful
    "genfast uniform +attn": genfast_variant(schedule="uniform", branch_units=("attn1", "attn2")),
}


def timed_loop(pipe, call, repeats):
    """Best-of-`repeats` seconds of one pipeline call that returns latents (the denoising loop)."""
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = pipe(**call()).images
        best = min(best, time.perf_counter() - t0)
    return out, best


def run_variants(pipe, call, steps, intervals, repeats, desc, names=tuple(VARIANTS)):
    """{name: (latents, seconds, full steps)} for the baseline and each named variant at every interval."""
    results = {}
    pipe(**{**call(), "num_inference_steps": 3})  # warm-up: first-call allocations are not the loop's cost
    latents, secs = timed_loop(pipe, call, repeats)
    results["baseline"] = (latents, secs, steps)
    jobs = [(name, k) for k in intervals for name in names]
    for name, k in tqdm(jobs, desc=desc):
        full = math.ceil(steps / k)
        label = f"{name} (interval {k})"
        if name == "deepcache":
            disable = deepcache(pipe, k)
            latents, secs = timed_loop(pipe, call, repeats)
            disable()
        else:
            handle, remove = VARIANTS[name](pipe, k)
            handle.prepare(**call())  # the method's own preparation (the calibration call), not timed
            if name == "genfast calibrated":
                full = sum(handle.schedule_for(steps))
            latents, secs = timed_loop(pipe, call, repeats)
            remove()
        results[label] = (latents, secs, full)
    return results


def part_sd15(args):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from genfast.models import ASSETS

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64).eval()  # SD-1.5's architecture
    n_params = sum(p.numel() for p in unet.parameters())
    tok = CLIPTokenizer.from_pretrained(ASSETS / "genfast-mini" / "tokenizer")
    # only the UNet is measured: prompt embeddings are given and latents returned, so the text
    # encoder and the autoencoder (factor 8, as SD's) are small stand-ins that never run in the loop
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=1, max_position_embeddings=32,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id))
    vae = AutoencoderKL(block_out_channels=(4, 4, 4, 4), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(  # SD-1.5's scheduler settings
                                       beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       clip_sample=False, set_alpha_to_one=False, steps_offset=1),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(1, 77, 768, generator=gen), torch.randn(1, 77, 768, generator=gen)

    def call():
        return dict(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=args.steps,
                    guidance_scale=args.sd15_guidance, height=256, width=256, output_type="latent",
                    generator=torch.Generator().manual_seed(0))

    with torch.no_grad():
        # speed only, so one schedule per kind of partial step: at an equal number of full steps the
        # nonuniform and calibrated schedules do the same work as uniform (see part b)
        results = run_variants(pipe, call, args.steps, args.sd15_intervals, args.sd15_repeats, "SD-1.5 arch",
                               names=("deepcache", "genfast uniform", "genfast uniform +attn"))
    base = results["baseline"][1]
    rows = [{"variant": k, "full_steps": f, "loop_s": round(s, 2), "speedup": round(base / s, 2)}
            for k, (_, s, f) in results.items()]
    print(f"\n(a) SD-1.5 UNet architecture ({n_params / 1e6:.0f}M parameters, random weights), 256x256, "
          f"batch 1, guidance {args.sd15_guidance}, {args.steps} DDIM steps, best of {args.sd15_repeats}")
    print(f"  {'variant':<34} {'full steps':>10} {'loop s':>8} {'speed-up':>9}")
    for r in rows:
        print(f"  {r['variant']:<34} {r['full_steps']:>10} {r['loop_s']:>8.2f} {r['speedup']:>8.2f}x")
    return rows


def part_mini(args):
    pipe = load_mini()
    pipe.set_progress_bar_config(disable=True)
    evaluator = load_evaluator()
    prompts = eval_prompts(args.mini_images)
    pos, neg = pipe.encode_prompt(prompts, "cpu", 1, args.guidance > 1.0)

    def call():
        gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        return dict(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=args.steps,
                    guidance_scale=args.guidance, output_type="latent", generator=gens)

    with torch.no_grad():
        results = run_variants(pipe, call, args.steps, args.intervals, args.mini_repeats, "genfast-mini")
        images = {k: decode(pipe, lat) for k, (lat, _, _) in results.items()}
    base_s = results["baseline"][1]
    rows = []
    for k, (_, s, f) in results.items():
        fa = faithfulness(images[k], images["baseline"])
        acc = prompt_accuracy(images[k] * 2 - 1, prompts, evaluator)
        rows.append({"variant": k, "full_steps": f, "loop_s": round(s, 2), "speedup": round(base_s / s, 2),
                     "psnr": round(fa["psnr"], 2), "ssim": round(fa["ssim"], 4),
                     "shape_acc": round(acc["shape"], 3), "color_acc": round(acc["color"], 3)})
    print(f"\n(b) genfast-mini, {len(prompts)} held-out prompts in one batch, guidance {args.guidance}, "
          f"{args.steps} DDIM steps, best of {args.mini_repeats}; PSNR/SSIM against the baseline images "
          f"(PSNR capped at 100 dB)")
    print(f"  {'variant':<34} {'full':>5} {'loop s':>7} {'speed-up':>9} {'PSNR':>7} {'SSIM':>7} {'shape':>6} {'color':>6}")
    for r in rows:
        print(f"  {r['variant']:<34} {r['full_steps']:>5} {r['loop_s']:>7.2f} {r['speedup']:>8.2f}x "
              f"{r['psnr']:>7.2f} {r['ssim']:>7.4f} {100 * r['shape_acc']:>5.1f}% {100 * r['color_acc']:>5.1f}%")
    return rows


def decode(pipe, latents):
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--intervals", type=int, nargs="+", default=[3, 5])
    p.add_argument("--part", nargs="+", choices=["sd15", "mini"], default=["sd15", "mini"])
    p.add_argument("--mini-images", type=int, default=64)
    p.add_argument("--mini-repeats", type=int, default=3)
    p.add_argument("--sd15-repeats", type=int, default=1)
    p.add_argument("--sd15-intervals", type=int, nargs="+", default=[3])
    p.add_argument("--sd15-guidance", type=float, default=1.0,
                   help="1.0: no classifier-free guidance, one UNet pass per step (the CPU takes ~3 s a pass)")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    report = {}
    if "sd15" in args.part:
        report["sd15"] = part_sd15(args)
    if "mini" in args.part:
        report["mini"] = part_mini(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
