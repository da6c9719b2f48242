"""The human side of a `genfast compare` report: report.md, grid.png and pareto.png."""

from __future__ import annotations

from pathlib import Path

from ..io import atomic_write_text
from .plots import save_comparison_grid, save_pareto

GRID_COLUMNS = 8


def _fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def _fid_value(row: dict, reference: str):
    return next((f["value"] for f in row["fid"] if f["reference"] == reference), None)


def _columns(report: dict) -> list[tuple[str, callable]]:
    space = report["feature_space"]
    cols = [
        ("variant", lambda r: r["name"]),
        ("speed-up", lambda r: f"{r['speedup']:.2f}x"),
        ("loop speed-up", lambda r: _fmt(r["loop_speedup"], ".2f") + "x"),
        ("call s", lambda r: f"{r['latency']['call_s']:.3f}"),
        ("loop s", lambda r: f"{r['latency']['loop_s']:.3f}"),
        ("full / all denoiser calls", lambda r: f"{r['latency']['full_denoiser_calls']} / {r['latency']['denoiser_calls']}"),
        ("peak MB", lambda r: _fmt(r["latency"]["peak_memory_mb"], ".0f")),
        (f"FID[{space}] vs baseline", lambda r: _fmt(_fid_value(r, "baseline"), ".2f", "-")),
    ]
    if any(_fid_value(r, "real") is not None for r in report["variants"]):
        cols.append((f"FID[{space}] vs real", lambda r: _fmt(_fid_value(r, "real"), ".2f")))
    cols += [
        ("PSNR dB", lambda r: f"{r['faithfulness']['psnr']:.2f}"),
        ("SSIM", lambda r: f"{r['faithfulness']['ssim']:.4f}"),
        ("LPIPS", lambda r: _fmt(r["faithfulness"]["lpips"], ".4f")),
    ]
    # prompt accuracy (text-to-image) or class accuracy (class-conditional): whichever the rows hold
    key = "class_accuracy" if "class_accuracy" in report["variants"][0] else "prompt_accuracy"
    first = report["variants"][0].get(key) or {}
    heads = [h for h in ("class", "shape", "color", "size", "position", "background") if h in first]
    cols += [(f"{h} acc", lambda r, h=h: f"{100 * r[key][h]:.1f}%") for h in heads]
    return cols


def markdown(report: dict) -> str:
    cols = _columns(report)
    lines = [
        f"# genfast compare: {report['pipeline']}",
        "",
        f"`{report['command']}`" if report["command"] else "",
        "",
        (f"- {report['prompts']}; {report['num_images']} images of {report['image_size'][0]}x"
         f"{report['image_size'][1]}, {report['steps']} steps, guidance {report['guidance']}, image i has seed "
         f"{report['seed']} + i"),
        (f"- latency: median of {report['timed_runs']} calls of the first batch ({report['batch_size']} images) "
         f"after a warm-up; loop = first to last denoiser call; {report['device']}, {report['dtype']}, torch "
         f"{report['torch']}, {report['cpu_threads']} CPU threads, {report['processes']} process(es)"),
        (f"- peak memory: {report['variants'][0]['latency']['peak_memory_kind']} during one more call of the "
         f"same batch, after the timed ones and untimed itself"),
        (f"- FID[{report['feature_space']}] on {report['num_images']} images per set (few images make FID noisy "
         f"and biased upwards: compare rows with each other, not with published FIDs)"),
        ("- faithfulness (PSNR capped at 100 dB, SSIM, LPIPS) is to the baseline's image at the same "
         f"{'class label' if 'class_accuracy' in report else 'prompt'} and seed"),
    ]
    kinds = {r["kind"] for r in report["variants"]}
    if kinds & {"chain", "pipeline"}:
        lines.append("- variants: `a(...) + b(...)` applies a, then b, to the baseline pipeline; `pipeline(DIR)` is "
                     "the pipeline saved in DIR, loaded like the baseline and run on the same prompts and seeds")
    if not report["lpips"]["available"]:
        lines.append(f"- LPIPS unavailable: {report['lpips']['note']}")
    if report.get("prompt_accuracy"):
        lines.append("- prompt accuracy: the embedded attribute classifier, over the prompts that name each attribute")
    if report.get("class_accuracy"):
        lines.append("- class accuracy: the embedded attribute classifier; class = shape and colour both right, "
                     "shape and color each alone")
    lines += ["", "| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fn(row) for _, fn in cols) + " |" for row in report["variants"]]
    lines += ["", "![baseline and variants, same prompts and seeds](grid.png)", "",
              "![speed-up against quality](pareto.png)", ""]
    return "\n".join(lines)


def _short(row: dict) -> str:
    """A point label for the plot: a single method's options (what tells a sweep apart), else the name."""
    if row["kind"] != "method" or not row["recipe"][0]["options"]:
        return row["name"]
    options = row["recipe"][0]["options"]
    return ", ".join(f"{k}={'+'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in options.items())


def write_report(report: dict, images: dict, variants: list, prompts: list[str], out: Path) -> None:
    k = min(GRID_COLUMNS, len(prompts))
    rows = {v.name: [im.permute(1, 2, 0).numpy() for im in images[v][:k]] for v in variants}
    save_comparison_grid(rows, prompts[:k], out / "grid.png")
    rows_by_name = {_short(r): r for r in report["variants"]}
    if len(rows_by_name) < len(report["variants"]):  # short labels collide (two methods): use full names
        rows_by_name = {r["name"]: r for r in report["variants"]}
    quality = [{"ylabel": "PSNR to the baseline (dB)", "higher_is_better": True,
                "points": [(n, r["speedup"], r["faithfulness"]["psnr"]) for n, r in rows_by_name.items()
                           if n != "baseline"]}]
    reference = "real" if _fid_value(report["variants"][0], "real") is not None else "baseline"
    quality.append({"ylabel": f"FID[{report['feature_space']}] vs {reference}", "higher_is_better": False,
                    "points": [(n, r["speedup"], _fid_value(r, reference)) for n, r in rows_by_name.items()
                               if _fid_value(r, reference) is not None]})
    save_pareto([p for p in quality if p["points"]], out / "pareto.png",
                title=f"{report['pipeline']}, {report['num_images']} images, {report['steps']} steps")
    atomic_write_text(out / "report.md", markdown(report))
