"""Model assembly on genfast-mini, every piece against the one before it, in one run; plus the bk-*
presets on the SD-1.5 UNet architecture.

(train) From the genfast-mini teacher, one student architecture (A-SDM's assembly: `--plan`, by
    default the mid block removed and the innermost stage dropped) trained at one budget
    (`--steps` optimizer steps at `--batch`, incubation included) with recipes that each add one
    piece to the one before:
      pruned         the inherited student, no training
      bk-kd          BK-SDM's recipe: task + output KD + feature KD (plain MSE sums)
      +sas           feature KD normalised per layer + the semantic term (evaluator features)
      +incubation    the same, each student unit first incubated inside the frozen teacher
      +gri           the same, GRI attention on the self-attentions
      +condconv      the same, every student resnet conv an ME-CondConv seeded from removed
                     kernels: every piece, the full A-SDM recipe
      random-init    +incubation's architecture and losses from random weights
    Each trained student is a pipeline folder under `--work` (resumable: a finished folder is kept).
(eval) `genfast compare` on every folder and on multi-UNet switching (the full student for the first
    40% of the steps, the teacher after): FID[mini-features] vs real renders, prompt accuracy, PSNR
    to the teacher's images, whole-call and denoising-loop speed-up; plus per student its
    parameters, FLOPs of one UNet call (torch's FlopCounterMode) and UNet latency as a ratio to the
    teacher's (median of interleaved calls, one image with CFG and a batch of 32).
(presets) bk-base / bk-small / bk-tiny on the SD-1.5 UNet architecture (random weights, built on
    the meta device for the counts): parameters beside BK-SDM's published ones, and the CPU latency
    ratio of one UNet call at 32x32 latents (256x256 images).

    python bench/assembly.py [--part train eval presets] [--steps 675] [--batch 64]
        [--incubation-steps 150] [--images 64] [--work .genfast-train/assembly] [--json out.json]
    quick check of the bench itself (not figures):
    python bench/assembly.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from genfast.assembly.plan import AssemblyPlan, param_count, plan_preset
from genfast.assembly.student import build_student, load_student
from genfast.io import atomic_write_text
from genfast.models import load_mini

# the student of every row: what `genfast assemble --preset auto --target-latency 0.7` chose on
# genfast-mini's analysis (mid block and innermost stage gone, no transformers on the down path)
PLAN = AssemblyPlan(layers_per_block=(1, 1), mid_block=False, drop_stages=1, down_attention=(False, False))
CONDCONV = {"condconv_experts": 2}
GRI = {"gri_window": 4}
TEACHER_STEPS = 4500  # genfast-mini's UNet training steps (assets/genfast-mini/training.json)
BK_SDM_BILLIONS = {"bk-base": 0.58, "bk-small": 0.49, "bk-tiny": 0.33}  # arXiv 2305.15798, for SD-1.4's 0.86B


@dataclass(frozen=True)
class Row:
    name: str
    plan: dict = field(default_factory=dict)  # added to PLAN
    distill: dict | None = None  # DistillConfig options; None: no training
    random_init: bool = False


def rows(incubation_steps: int) -> list[Row]:
    bk = {"task": 1.0, "kd_out": 1.0, "kd_feat": 1.0, "feature_norm": False, "sas": 0.0}
    sas = {**bk, "feature_norm": True, "sas": 1.0}
    incubated = {**sas, "incubation_steps": incubation_steps}
    return [
        Row("pruned"),
        Row("bk-kd", {}, bk),
        Row("+sas", {}, sas),
        Row("+incubation", {}, incubated),
        Row("+gri", GRI, incubated),
        Row("+condconv", {**GRI, **CONDCONV}, incubated),  # every piece: the full A-SDM recipe
        Row("random-init", {}, incubated, random_init=True),
    ]


def slug(name: str) -> str:
    return name.strip("+").replace("+", "-")


# ---------------------------------------------------------------- training

def _reinitialise(unet: torch.nn.Module, seed: int) -> None:
    """PyTorch's default initialisation of every layer (what a fresh diffusers model starts from)."""
    from genfast.assembly.condconv import MECondConv

    torch.manual_seed(seed)
    for module in unet.modules():
        if isinstance(module, MECondConv):
            fresh = MECondConv(module.in_channels, module.out_channels, module.kernel_size,
                               num_experts=module.num_experts)
            module.experts.data.copy_(fresh.experts.data)
        if hasattr(module, "reset_parameters") and module is not unet:
            module.reset_parameters()


def _share_pool(work: Path) -> None:
    """Every row trains on the same latent pool: copy one another row made (distill checks its key)."""
    from genfast.training.distill import POOL_NAME

    target = work / POOL_NAME
    if target.exists():
        return
    for other in sorted(work.parent.glob(f"*/{POOL_NAME}")):
        work.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(other, target.with_name(".pool.tmp"))
        target.with_name(".pool.tmp").replace(target)
        return


def train_row(row: Row, args, teacher_pipe) -> Path:
    from genfast.training.distill import DistillConfig, run_distill, save_distilled

    out = Path(args.work) / slug(row.name)
    if (out / "model_index.json").is_file():
        print(f"[{row.name}] {out} is there: kept (delete it to train again)")
        return out
    student, _ = build_student(teacher_pipe.unet, replace(PLAN, **row.plan))
    if row.random_init:
        _reinitialise(student, seed=0)
    if row.distill is None:
        from genfast.assembly.student import save_assembled

        save_assembled(type(teacher_pipe)(**{**teacher_pipe.components, "unet": student}), out)
        return out
    options = dict(row.distill)
    incubation = options.get("incubation_steps", 0)
    config = DistillConfig(steps=args.steps - incubation, batch_size=args.batch, lr=args.lr,
                           checkpoint_every=args.checkpoint_every, **options)
    work = Path(args.work) / "runs" / slug(row.name)
    _share_pool(work)
    t0 = time.time()
    student, finished = run_distill(teacher_pipe, student, work, config, progress=not args.quiet)
    if not finished:
        raise SystemExit(f"[{row.name}] stopped before the end: run again to resume")
    save_distilled(teacher_pipe, student, out, config, work_dir=work)
    print(f"[{row.name}] trained {config.total_steps} steps in {(time.time() - t0) / 60:.1f} min -> {out}")
    return out


# ---------------------------------------------------------------- measuring

def _unet_inputs(unet, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    return (torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g),
            torch.full((batch,), 500), torch.randn(batch, 32, c.cross_attention_dim, generator=g))


@torch.no_grad()
def unet_latency(models: dict, batch: int, repeats: int) -> dict[str, float]:
    """Median seconds of one UNet call per model, the models called in turn so load hits all alike."""
    inputs = _unet_inputs(next(iter(models.values())), batch)
    times = {name: [] for name in models}
    for m in models.values():
        m(*inputs)  # warm-up
    for _ in range(repeats):
        for name, m in models.items():
            t0 = time.perf_counter()
            m(*inputs)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


@torch.no_grad()
def unet_flops(unet) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        unet(*_unet_inputs(unet, 2))
    return counter.get_total_flops()


def evaluate(args, folders: dict[str, Path], teacher_pipe) -> list[dict]:
    from genfast.eval.compare import CompareSettings, run_compare
    from genfast.eval.variants import parse_variants

    switch = folders.get(args.multi_unet_row)
    methods = [f"multi_unet:student={switch}:switch_at=0.4"] if switch is not None else []
    variants = parse_variants(methods, [str(f) for f in folders.values()])
    settings = CompareSettings(num_images=args.images, steps=args.steps_sample, guidance=5.0,
                               batch_size=min(32, args.images), runs=args.runs, out=str(Path(args.out) / "compare"),
                               feature_space="mini-features", command=" ".join(sys.argv))
    report = run_compare(settings, variants)
    by_folder = {str(Path(r["pipeline"]).resolve()): r for r in report["variants"] if r.get("pipeline")}
    students = {name: load_student(folder) for name, folder in folders.items()}
    teacher = teacher_pipe.unet
    models = {"teacher": teacher, **students}
    lat_small = unet_latency(models, 2, args.repeats)
    lat_batch = unet_latency(models, 64, max(3, args.repeats // 4))
    base_params = sum(p.numel() for p in teacher.parameters())
    base_flops = unet_flops(teacher)
    table = []
    for r in report["variants"]:
        name = next((n for n, f in folders.items() if str(Path(f).resolve()) == str(Path(r["pipeline"]).resolve())),
                    None) if r.get("pipeline") else ("teacher" if r["kind"] == "baseline" else "multi-unet 0.4")
        unet = models.get(name)
        info = {}
        if name in folders:
            distill_json = Path(folders[name]) / "distill.json"
            if distill_json.is_file():
                info = json.loads(distill_json.read_text())
        fid_real = next((f["value"] for f in r["fid"] if f["reference"] == "real"), None)
        table.append({
            "row": name,
            "params": sum(p.numel() for p in unet.parameters()) / base_params if unet is not None else None,
            "flops": unet_flops(unet) / base_flops if unet is not None else None,
            "unet_latency_b2": lat_small[name] / lat_small["teacher"] if unet is not None else None,
            "unet_latency_b64": lat_batch[name] / lat_batch["teacher"] if unet is not None else None,
            "loop_speedup": r.get("loop_speedup"),
            "fid_real": fid_real,
            "accuracy": r.get("prompt_accuracy"),
            "psnr": (r.get("faithfulness") or {}).get("psnr") if r["kind"] != "baseline" else None,
            "steps": (info.get("config", {}).get("steps", 0) + info.get("config", {}).get("incubation_steps", 0))
            if info else 0,
        })
    del by_folder
    return table


def markdown(table: list[dict], teacher_steps: int) -> str:
    def f(v, spec):
        return "n/a" if v is None else format(v, spec)

    lines = [("| row | params | FLOPs | UNet latency (1 image + CFG) | UNet latency (batch 64) | loop speed-up | "
              "FID[mini] vs real | shape acc | colour acc | PSNR to teacher | training steps |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in table:
        acc = t["accuracy"] or {}
        steps = t["steps"]
        lines.append(
            f"| {t['row']} | {f(t['params'], '.2f')}x | {f(t['flops'], '.2f')}x | {f(t['unet_latency_b2'], '.2f')}x | "
            f"{f(t['unet_latency_b64'], '.2f')}x | {f(t['loop_speedup'], '.2f')}x | {f(t['fid_real'], '.2f')} | "
            f"{f(acc.get('shape'), '.3f')} | {f(acc.get('color'), '.3f')} | {f(t['psnr'], '.1f')} | "
            f"{steps} ({100 * steps / teacher_steps:.0f}%) |")
    return "\n".join(lines)


def notes(table: list[dict], folders: dict[str, Path], switched: str) -> list[str]:
    """Multi-UNet's measured speed-up beside 1/(0.4 r + 0.6); the spread of the per-layer feature terms."""
    out = []
    rows_ = {t["row"]: t for t in table}
    multi, student = rows_.get("multi-unet 0.4"), rows_.get(switched)
    if multi and student and student["loop_speedup"]:
        r = 1 / student["loop_speedup"]
        out.append(f"multi-UNet 0.4 with {switched}: loop speed-up {multi['loop_speedup']:.2f}x, predicted "
                   f"1/(0.4 r + 0.6) = {1 / (0.4 * r + 0.6):.2f}x for r = {r:.2f} (the student's loop time ratio)")
    for name, folder in folders.items():
        info_path = Path(folder) / "distill.json"
        layers = json.loads(info_path.read_text()).get("feature_layers_first_step") if info_path.is_file() else None
        if not layers:
            continue
        for kind, terms in layers.items():
            values = [v for v in terms.values() if v > 0]
            if len(values) > 1:
                out.append(f"{name}: per-layer feature terms at the first end-to-end step, {kind}: max/min "
                           f"{max(values) / min(values):.1f} over {len(values)} nonzero layers")
    return out


# ---------------------------------------------------------------- presets on SD-1.5's architecture

SD15 = {"block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "cross_attention_dim": 768,
        "attention_head_dim": 8, "sample_size": 64,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3}


def presets(args) -> list[dict]:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():  # the full config as diffusers fills it in, nothing allocated
        teacher_cfg = dict(UNet2DConditionModel.from_config(SD15).config)
    base = param_count(teacher_cfg)
    out = [{"preset": "SD-1.5 UNet", "params_m": base / 1e6, "bk_sdm_b": 0.86}]
    configs = {"teacher": teacher_cfg}
    for name in ("bk-base", "bk-small", "bk-tiny"):
        cfg = plan_preset(name, teacher_cfg).student_config(teacher_cfg)
        configs[name] = cfg
        out.append({"preset": name, "params_m": param_count(cfg) / 1e6, "bk_sdm_b": BK_SDM_BILLIONS[name]})
    if args.sd15_latency:
        torch.manual_seed(0)
        models = {}
        for name, cfg in configs.items():
            cfg = {**cfg, "sample_size": args.sd15_latent}
            models[name] = UNet2DConditionModel.from_config(cfg).eval()
        inputs = (torch.randn(2, 4, args.sd15_latent, args.sd15_latent), torch.full((2,), 500), torch.randn(2, 77, 768))
        times = {n: [] for n in models}
        with torch.no_grad():
            for m in models.values():
                m(*inputs)
            for _ in range(args.sd15_repeats):
                for n, m in models.items():
                    t0 = time.perf_counter()
                    m(*inputs)
                    times[n].append(time.perf_counter() - t0)
        base_t = statistics.median(times["teacher"])
        for row in out:
            key = "teacher" if row["preset"] == "SD-1.5 UNet" else row["preset"]
            row["latency_ratio"] = statistics.median(times[key]) / base_t
    return out


def presets_markdown(rows_: list[dict]) -> str:
    lines = ["| UNet | parameters | BK-SDM's published | difference | CPU latency ratio |", "|---|---:|---:|---:|---:|"]
    for r in rows_:
        diff = r["params_m"] / (1000 * r["bk_sdm_b"]) - 1
        lat = r.get("latency_ratio")
        lines.append(f"| {r['preset']} | {r['params_m']:.1f}M | {r['bk_sdm_b']:.2f}B | {100 * diff:+.1f}% | "
                     f"{'n/a' if lat is None else f'{lat:.2f}x'} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", nargs="+", choices=("train", "eval", "presets"), default=["train", "eval", "presets"])
    p.add_argument("--only", nargs="+", help="train only these rows (names as in the table)")
    p.add_argument("--steps", type=int, default=math.floor(0.15 * TEACHER_STEPS),
                   help="optimizer steps of every trained row, incubation included (default: 15%% of the teacher's)")
    p.add_argument("--incubation-steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--multi-unet-row", default="+incubation", help="the trained row multi-UNet switching uses")
    p.add_argument("--extra-row", action="append", default=[], metavar="NAME=DIR",
                   help="also evaluate this pipeline folder (e.g. assets/genfast-mini-assembled)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--steps-sample", type=int, default=25)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20, help="interleaved UNet calls per model for latency")
    p.add_argument("--sd15-latency", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--sd15-latent", type=int, default=32)
    p.add_argument("--sd15-repeats", type=int, default=3)
    p.add_argument("--work", default=".genfast-train/assembly")
    p.add_argument("--out", default="outputs/bench/assembly")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--quick", action="store_true", help="a check of the bench itself: tiny budgets, no figures")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.incubation_steps, args.batch, args.images, args.runs, args.repeats = 4, 2, 4, 4, 1, 2
        args.checkpoint_every, args.sd15_latency = 2, False
        args.work, args.out = args.work + "-quick", args.out + "-quick"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"command": " ".join(["python", *sys.argv]), "plan": PLAN.to_dict(), "steps": args.steps,
               "batch": args.batch, "incubation_steps": args.incubation_steps}
    teacher_pipe = load_mini()
    teacher_pipe.set_progress_bar_config(disable=True)
    folders = {}
    if "train" in args.part or "eval" in args.part:
        for row in rows(args.incubation_steps):
            if args.only and row.name not in args.only:
                continue
            if "train" in args.part:
                folders[row.name] = train_row(row, args, teacher_pipe)
            elif (Path(args.work) / slug(row.name) / "model_index.json").is_file():
                folders[row.name] = Path(args.work) / slug(row.name)
    for spec in args.extra_row:
        name, _, folder = spec.partition("=")
        if not (Path(folder) / "model_index.json").is_file():
            raise SystemExit(f"--extra-row {spec!r}: give NAME=DIR with a pipeline folder")
        folders[name] = Path(folder)
    if "eval" in args.part:
        table = evaluate(args, folders, teacher_pipe)
        results["table"] = table
        print(markdown(table, TEACHER_STEPS))
        results["notes"] = notes(table, folders, args.multi_unet_row)
        print("\n".join(results["notes"]))
    if "presets" in args.part:
        results["presets"] = presets(args)
        print(presets_markdown(results["presets"]))
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
