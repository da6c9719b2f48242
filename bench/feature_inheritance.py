"""Feature inheritance against DeepCache and diffusers' own caches, side by side in one run.

(a) the SD-1.5 UNet architecture (UNet2DConditionModel's defaults, cross-attention 768) built from
    its config with random weights, 256x256: speed against DeepCache;
(b) genfast-mini: speed, faithfulness to the unaccelerated images at the same prompts and seeds
    (PSNR, SSIM) and prompt accuracy, against DeepCache. Each schedule copies the reused features
    (reuse="copy") and, in the row after, forecasts them from the last two full steps
    (reuse="taylor", order 1) at the same full steps; a summary line per interval gives the PSNR
    forecasting adds (at 50 steps, interval 5 is 10 full denoiser calls);
(c) PixArt-alpha's transformer architecture (PixArtTransformer2DModel with its published config:
    28 blocks, 16 heads x 72, patch 2, T5 captions of 4096 channels, sample size 32 = 256x256)
    built with random weights: genfast (level "block", uniform and calibrated + taylor at the same
    full steps) against diffusers' FirstBlockCache, TaylorSeer and MagCache. Per row: how often a
    block actually ran, the loop's seconds and speed-up, and the relative L2 difference of the final
    latents to the baseline's. With random weights that difference is NOT image quality, only how
    far a method moves the computation; faithfulness on a trained transformer waits for the DiT
    mini, which is not built yet. A diffusers method that fails here gets a row with its exception,
    then a row for each documented setting or the cache context it expects, until one runs.

Every variant runs the same prompts, seeds and number of steps; timings are of the denoising
loop (prompt embeddings are computed beforehand, decoding happens afterwards) and speed-ups
are ratios to the baseline measured in this same run. DeepCache (`pip install DeepCache`, a
bench-only dependency: `pip install -e '.[bench]'`) runs with cache_branch_id=0, genfast with
its equivalent, level="layer", branch=0.

    python bench/feature_inheritance.py [--part sd15 mini transformer] [--steps 50] [--intervals 3 5]
        [--sd15-intervals 3] [--mini-images 64] [--mini-variants NAME ...]
        [--transformer-steps 20] [--transformer-interval 3] [--transformer-repeats 1]
        [--fbc-thresholds 0.05 0.25] [--mag-threshold 0.06] [--json rows.json]
    quick check of the bench itself (not figures):
    python bench/feature_inheritance.py --steps 10 --sd15-intervals 3 --mini-images 4 --mini-repeats 1 \\
        --transformer-steps 8 --transformer-layers 4
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import math
import re
import sys
import time

import torch
from tqdm.auto import tqdm

import genfast
from genfast.eval.faithfulness import faithfulness
from genfast.eval.prompt_accuracy import eval_prompts, prompt_accuracy
from genfast.io import atomic_write_text
from genfast.methods.feature_inheritance import default_span
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


# each forecasting row follows the copying row with the same schedule, so the pairs read side by side
VARIANTS = {
    "deepcache": None,
    "genfast uniform": genfast_variant(schedule="uniform"),
    "genfast uniform taylor": genfast_variant(schedule="uniform", reuse="taylor", order=1),
    "genfast nonuniform": genfast_variant(schedule="nonuniform"),
    "genfast calibrated": genfast_variant(schedule="calibrated"),
    "genfast calibrated taylor": genfast_variant(schedule="calibrated", reuse="taylor", order=1),
    # partial steps also reuse attention inside the fresh branch: faster, a little less faithful
    "genfast uniform +attn": genfast_variant(schedule="uniform", branch_units=("attn1", "attn2")),
}
# the pairs the summary lines of part (b) compare: (copy, forecast)
PAIRS = (("genfast calibrated", "genfast calibrated taylor"), ("genfast uniform", "genfast uniform taylor"))


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
            mask = handle.schedule_for(steps)
            if mask is not None:
                full = sum(mask)
            latents, secs = timed_loop(pipe, call, repeats)
            remove()
        results[label] = (latents, secs, full)
    return results


def _tokenizer():
    from transformers import CLIPTokenizer

    from genfast.models import ASSETS

    return CLIPTokenizer.from_pretrained(ASSETS / "genfast-mini" / "tokenizer")


def _standin_vae():
    """An autoencoder with SD's factor 8 and 4 latent channels that never runs (latents are returned)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(4, 4, 4, 4), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4)


def part_sd15(args):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64).eval()  # SD-1.5's architecture
    n_params = sum(p.numel() for p in unet.parameters())
    tok = _tokenizer()
    # only the UNet is measured: prompt embeddings are given and latents returned, so the text
    # encoder and the autoencoder (factor 8, as SD's) are small stand-ins that never run in the loop
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=1, max_position_embeddings=32,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id))
    pipe = StableDiffusionPipeline(vae=_standin_vae(), text_encoder=text, tokenizer=tok, unet=unet,
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
        results = run_variants(pipe, call, args.steps, args.intervals, args.mini_repeats, "genfast-mini",
                               names=tuple(args.mini_variants))
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
          f"(PSNR capped at 100 dB); 'taylor' rows forecast the reused features from the last 2 full "
          f"steps (reuse='taylor', order 1), the others copy the last one")
    print(f"  {'variant':<38} {'full':>5} {'loop s':>7} {'speed-up':>9} {'PSNR':>7} {'SSIM':>7} {'shape':>6} {'color':>6}")
    interval = None
    for r in rows:
        k = re.search(r"\(interval (\d+)\)", r["variant"])
        if k and k.group(1) != interval:  # a rule between intervals: each group shares its full steps
            interval = k.group(1)
            print(f"  -- interval {interval} " + "-" * 70)
        print(f"  {r['variant']:<38} {r['full_steps']:>5} {r['loop_s']:>7.2f} {r['speedup']:>8.2f}x "
              f"{r['psnr']:>7.2f} {r['ssim']:>7.4f} {100 * r['shape_acc']:>5.1f}% {100 * r['color_acc']:>5.1f}%")
    print_forecast_summary(rows, args.intervals)
    return rows


def print_forecast_summary(rows, intervals):
    """One line per (copy, forecast) pair and interval: the PSNR that forecasting adds at equal full steps."""
    by = {r["variant"]: r for r in rows}
    lines = []
    for k in intervals:
        for copy, forecast in PAIRS:
            a, b = by.get(f"{copy} (interval {k})"), by.get(f"{forecast} (interval {k})")
            if a is None or b is None:
                continue
            same = "" if a["full_steps"] == b["full_steps"] else \
                f"  [NOT the same full steps: {a['full_steps']} vs {b['full_steps']}]"
            lines.append(f"  {copy.removeprefix('genfast ')}, interval {k}, {b['full_steps']} full steps: "
                         f"copy {a['psnr']:.2f} dB -> taylor {b['psnr']:.2f} dB "
                         f"({b['psnr'] - a['psnr']:+.2f} dB){same}")
        dc = by.get(f"deepcache (interval {k})")
        if dc is not None:
            lines.append(f"  deepcache, interval {k}, {dc['full_steps']} full steps: {dc['psnr']:.2f} dB")
    if lines:
        print("  forecasting vs copying, PSNR to the baseline:")
        print("\n".join(lines))


def decode(pipe, latents):
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1)


# ---------------------------------------------------------------- (c) a transformer pipeline

def _pixart_pipe(layers):
    """PixArt-alpha at 256x256 from its published config, random weights; text encoder and VAE are stand-ins."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(  # PixArt-XL-2's config; sample_size 32 is its 256x256 variant
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=layers,
        cross_attention_dim=1152, attention_bias=True, sample_size=32, patch_size=2,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=4096,
    ).eval()
    tok = _tokenizer()
    # prompt embeddings are given and latents returned: the T5 encoder (PixArt ships T5-XXL; any
    # tokenizer with the same call does) and the autoencoder never run in the loop
    text = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=16, num_layers=1,
                                   num_heads=1)).eval()
    pipe = PixArtAlphaPipeline(tokenizer=tok, text_encoder=text, vae=_standin_vae(), transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())  # PixArt's DPM-Solver++, order 2
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _RunCounter:
    """Counts how often one transformer block actually computed, through a forward hook on its
    self-attention's query projection: it fires only when the attention really runs, not when a
    cache hook hands back a kept or forecast output in place of the block or the attention. The
    block is the second-to-last, inside every method's span (genfast keeps the first and last
    fresh by default, FirstBlockCache the first)."""

    def __init__(self, transformer):
        self.n = 0
        block = transformer.transformer_blocks[-2]
        self.handle = block.attn1.to_q.register_forward_hook(self._count)

    def _count(self, *_):
        self.n += 1


class _DiffusersCache:
    """One of diffusers' cache hooks attached to the transformer with its functional API.

    PixArt's transformer has no CacheMixin (no enable_cache / disable_cache / cache_context) and its
    pipeline never enters a cache context, so the hooks are attached and removed by hand, by the
    hook names the diffusers module defines; `set_context` gives them the context its pipeline
    would (diffusers' private `_set_cache_context`, what `CacheMixin.cache_context` calls).
    """

    def __init__(self, apply, hook_names, config, set_context=False, hint=""):
        self.apply, self.hook_names, self.config, self.set_context = apply, hook_names, config, set_context
        self.hint = hint

    def attach(self, pipe, call):
        from diffusers.hooks import HookRegistry

        self.transformer = pipe.transformer
        self.registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        config = self.config(pipe, call, self) if callable(self.config) else self.config
        self.apply(self.transformer, config)
        self.registry.invalidate_child_registries_cache()  # diffusers' own enable_cache does the same
        if self.hooked() == 0:
            raise RuntimeError(f"diffusers attached no hook to {type(self.transformer).__name__}, silently: none of "
                               f"its modules matches the method's module patterns, so nothing would be cached"
                               f"{self.hint}")

    def hooked(self) -> int:
        return sum(any(name in m._diffusers_hook.hooks for name in self.hook_names)
                   for m in self.transformer.modules() if hasattr(m, "_diffusers_hook"))

    def before_call(self):
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        # the pipeline's end-of-call reset (maybe_free_model_hooks -> _reset_stateful_cache) needs
        # CacheMixin, which PixArt lacks: without this a call would resume the last one's step count
        self.registry.reset_stateful_hooks()
        if self.set_context:
            _set_cache_context(self.transformer, CacheContext("cond"))

    def remove(self):
        if getattr(self, "registry", None) is None:
            return
        for name in self.hook_names:
            self.registry.remove_hook(name, recurse=True)
        self.registry.invalidate_child_registries_cache()
        left = self.hooked()
        self.registry = None
        if left:
            raise RuntimeError(f"{left} modules still carry a cache hook after removal")


def _magcache_config(threshold):
    """MagCache needs the model's magnitude ratios: one calibrate=True run (no skipping) prints
    them, as diffusers documents; they are read back from that print and passed to the real run."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache
    from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK

    def config(pipe, call, cache):
        steps = call()["num_inference_steps"]
        calib = _DiffusersCache(apply_mag_cache, (_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK),
                                MagCacheConfig(calibrate=True, num_inference_steps=steps))
        printed = io.StringIO()
        try:
            calib.attach(pipe, call)
            calib.before_call()
            with contextlib.redirect_stdout(printed):
                pipe(**call())
        finally:
            calib.remove()
        found = re.search(r"Calibration Complete.*?\n(\[[^\]]*\])", printed.getvalue())
        if found is None:
            raise RuntimeError(f"MagCache's calibration run printed no ratios: {printed.getvalue()[-300:]!r}")
        ratios = ast.literal_eval(found.group(1))  # a list of numbers: literal_eval runs no code
        cache.note = f"ratios {min(ratios):.3f}..{max(ratios):.3f}"
        return MagCacheConfig(threshold=threshold, mag_ratios=ratios, num_inference_steps=steps)

    return config


def transformer_variants(args):
    """[(label, kind, spec)]: kind 'genfast' with accelerate() options, or 'diffusers' with a list of
    _DiffusersCache tries, the first as a user would write it and the next ones only if it fails."""
    from diffusers.hooks import (
        FirstBlockCacheConfig,
        TaylorSeerCacheConfig,
        apply_first_block_cache,
        apply_mag_cache,
        apply_taylorseer_cache,
    )
    from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
    from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK, _TRANSFORMER_BLOCK_IDENTIFIERS

    k = args.transformer_interval

    def fbc(threshold, set_context=False):
        return _DiffusersCache(apply_first_block_cache, (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK),
                               FirstBlockCacheConfig(threshold=threshold), set_context=set_context)

    # taylor factors in float32 like the model (diffusers' default is bfloat16); the second try
    # names PixArt's attention and feed-forward modules (attn1 / attn2 / ff), as TaylorSeer forecasts
    # them, since the default patterns look for modules called "...attn"
    ts_default = TaylorSeerCacheConfig(cache_interval=k, taylor_factors_dtype=torch.float32)
    ts_named = TaylorSeerCacheConfig(cache_interval=k, taylor_factors_dtype=torch.float32,
                                     cache_identifiers=[r"transformer_blocks\.\d+\.(attn1|attn2|ff)"])
    ts = (apply_taylorseer_cache, (_TAYLORSEER_CACHE_HOOK,))
    ts_hint = (f" (the default patterns {', '.join(_TRANSFORMER_BLOCK_IDENTIFIERS[:2])} ... must match whole module "
               f"names; PixArt's attention modules are named attn1 / attn2)")
    mag = (apply_mag_cache, (_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK), _magcache_config(args.mag_threshold))
    # the first threshold as a user would write it first; the others only with the context set
    fbc_rows = [(f"diffusers FirstBlockCache ({t})", "diffusers",
                 ([("", fbc(t))] if i == 0 else []) + [("context set", fbc(t, set_context=True))])
                for i, t in enumerate(args.fbc_thresholds)]
    return [
        (f"genfast uniform (interval {k})", "genfast", dict(schedule="uniform", interval=k)),
        (f"genfast calibrated taylor (interval {k})", "genfast",
         dict(schedule="calibrated", interval=k, reuse="taylor", order=1)),
        *fbc_rows,
        (f"diffusers TaylorSeer (interval {k})", "diffusers",
         [("", _DiffusersCache(*ts, ts_default, hint=ts_hint)), ("attn1/attn2/ff", _DiffusersCache(*ts, ts_named)),
          ("attn1/attn2/ff, context set", _DiffusersCache(*ts, ts_named, set_context=True))]),
        (f"diffusers MagCache ({args.mag_threshold})", "diffusers",
         [("", _DiffusersCache(*mag)), ("context set", _DiffusersCache(*mag, set_context=True))]),
    ]


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:500]}"


def part_transformer(args):
    pipe = _pixart_pipe(args.transformer_layers)
    transformer = pipe.transformer
    n_params = sum(p.numel() for p in transformer.parameters())
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 120, 4096, generator=gen)  # T5's 120 tokens, 4096 channels
    mask = torch.ones(1, 120, dtype=torch.long)
    steps = args.transformer_steps
    counter = _RunCounter(transformer)

    def call():
        return dict(prompt_embeds=embeds, prompt_attention_mask=mask, num_inference_steps=steps,
                    guidance_scale=1.0, height=256, width=256, output_type="latent",
                    generator=torch.Generator().manual_seed(0))

    def timed(before=lambda: None):
        best, out, runs = math.inf, None, None
        for _ in range(args.transformer_repeats):
            before()
            counter.n = 0
            t0 = time.perf_counter()
            out = pipe(**call()).images
            best, runs = min(best, time.perf_counter() - t0), counter.n
        return out, best, runs

    rows, base, base_secs = [], None, None

    def row(label, out=None, secs=None, runs=None, error=None, note=""):
        r = {"variant": label, "block_runs": runs, "loop_s": None if secs is None else round(secs, 2)}
        if error is None:
            r["speedup"] = round(base_secs / secs, 2) if base_secs else 1.0
            r["rel_l2"] = float((out - base).norm() / base.norm()) if base is not None else 0.0
        else:
            r["error"] = error
        if note:
            r["note"] = note
        rows.append(r)
        if error is None:
            tqdm.write(f"  {label}: {secs:.2f} s, {runs} block runs")

    variants = transformer_variants(args)
    with torch.no_grad():
        pipe(**{**call(), "num_inference_steps": 3})  # warm-up: first-call allocations are not the loop's cost
        base, base_secs, runs = timed()
        row("baseline", base, base_secs, runs)
        for label, kind, spec in tqdm(variants, desc="PixArt arch"):
            if kind == "genfast":
                handle = genfast.accelerate(pipe, "feature_inheritance", **spec)
                try:
                    handle.prepare(**call())  # the calibration call, not timed
                    out, secs, runs = timed()
                finally:
                    handle.remove()
                span = handle.config.blocks or (default_span(len(transformer.transformer_blocks)),)
                row(label, out, secs, runs, note=f"level {handle.config.level}, blocks {', '.join(span)}")
                continue
            for how, cache in spec:
                name = f"{label} [{how}]" if how else label
                try:
                    cache.attach(pipe, call)  # MagCache's calibration run happens here, not timed
                    out, secs, runs = timed(cache.before_call)
                except Exception as error:  # noqa: BLE001 -- any failure of diffusers' method is a row, never hidden
                    try:
                        cache.remove()
                    except Exception as cleanup:  # noqa: BLE001 -- re-raised: a half-removed cache spoils later rows
                        raise RuntimeError(f"{name}: its hooks could not be removed ({cleanup})") from error
                    row(name, error=_short(error))
                    continue
                cache.remove()
                row(name, out, secs, runs, note=getattr(cache, "note", ""))
                break
        # everything removed: the pipeline must give the baseline's latents again (relative L2 0)
        out, secs, runs = timed()
        row("baseline again (all removed)", out, secs, runs)
    counter.handle.remove()

    print(f"\n(c) PixArt-alpha transformer architecture ({args.transformer_layers} blocks, "
          f"{n_params / 1e6:.0f}M parameters, RANDOM weights), 256x256, batch 1, guidance 1.0 (one pass a step), "
          f"{steps} DPM-Solver++ steps, best of {args.transformer_repeats}")
    print("  block runs: how often the second-to-last block's self-attention computed in one call (TaylorSeer "
          "forecasts attention\n  and feed-forward outputs, the block's norms still run); rel. L2: |latents - "
          "baseline| / |baseline| -- random\n  weights, so this is NOT image quality, only how far each method "
          "moves the computation;\n  'baseline again' runs after every hook is removed: its rel. L2 must be 0, "
          "its speed-up shows the timing noise")
    w = max(len(r["variant"]) for r in rows)
    print(f"  {'variant':<{w}} {'block runs':>10} {'loop s':>7} {'speed-up':>9} {'rel. L2':>9}")
    for r in rows:
        if "error" in r:
            print(f"  {r['variant']:<{w}} FAILED: {r['error']}")
            continue
        print(f"  {r['variant']:<{w}} {r['block_runs']:>10} {r['loop_s']:>7.2f} {r['speedup']:>8.2f}x "
              f"{r['rel_l2']:>9.2e}" + (f"  ({r['note']})" if r.get("note") else ""))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--intervals", type=int, nargs="+", default=[3, 5])
    p.add_argument("--part", nargs="+", choices=["sd15", "mini", "transformer"],
                   default=["sd15", "mini", "transformer"])
    p.add_argument("--mini-images", type=int, default=64)
    p.add_argument("--mini-repeats", type=int, default=3)
    p.add_argument("--mini-variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   help="which variants part (b) runs beside its baseline (default: all)")
    p.add_argument("--sd15-repeats", type=int, default=1)
    p.add_argument("--sd15-intervals", type=int, nargs="+", default=[3])
    p.add_argument("--sd15-guidance", type=float, default=1.0,
                   help="1.0: no classifier-free guidance, one UNet pass per step (the CPU takes ~3 s a pass)")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--transformer-steps", type=int, default=20, help="part (c): PixArt's default 20 steps")
    p.add_argument("--transformer-interval", type=int, default=3,
                   help="part (c): genfast's interval and TaylorSeer's cache_interval")
    p.add_argument("--transformer-repeats", type=int, default=1)
    p.add_argument("--transformer-layers", type=int, default=28,
                   help="part (c): PixArt has 28 blocks; fewer only for a quick check of the bench itself")
    p.add_argument("--fbc-thresholds", type=float, nargs="+", default=[0.05, 0.25],
                   help="FirstBlockCache's thresholds, one row each: 0.05 is its default, under which it never "
                        "skips on random weights (the first block's residual moves 11-25%% a step there); 0.25 "
                        "skips, to show its speed")
    p.add_argument("--mag-threshold", type=float, default=0.06, help="MagCache's threshold (its default)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    if args.transformer_layers < 3:
        p.error("--transformer-layers must be >= 3 (block runs are counted on the second-to-last block, which "
                "must lie past FirstBlockCache's first block)")
    if args.transformer_steps < 5:
        p.error("--transformer-steps must be >= 5 (genfast runs shorter calls unaccelerated)")
    report = {}
    if "sd15" in args.part:
        report["sd15"] = part_sd15(args)
    if "mini" in args.part:
        report["mini"] = part_mini(args)
    if "transformer" in args.part:
        report["transformer"] = part_transformer(args)
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
