"""Peak memory of `genfast personalize`'s phases against the number of photos (embedded prior, CPU).

Each row runs in a fresh Python process, so its peak RSS (``ru_maxrss``) is that phase's alone:
the process loads the embedded prior and the identity network, makes N photos, then runs one phase
as `genfast personalize` runs it, with few steps (the peak is reached in the first step; later
steps free what the previous one held):

- ``cameras``: `fit_cameras` (every photo from each starting yaw: 3 renders per photo);
- ``latents``: `invert` (one render per photo);
- ``train``: adapter training with cameras and latents given, the symmetry term on every step
  (2 more renders per photo).

The photos are random pixels: memory does not depend on what they show. Columns: the process's
RSS after loading (``loaded``), its peak, and the peak above loaded (what the phase added).

    python bench/my3dgen_memory.py [--photos 10 20 40] [--phases cameras latents train]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile

PHASES = ("cameras", "latents", "train")


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def worker(phase: str, n: int) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    from genfast.gan3d.identity import load_identity_encoder
    from genfast.gan3d.video import map_z
    from genfast.models import load_heads_prior
    from genfast.training import personalize as pers

    torch.set_num_threads(2)
    G, _ = load_heads_prior()
    identity = load_identity_encoder()
    g = torch.Generator().manual_seed(0)
    photos = torch.rand(n, 3, G.img_resolution, G.img_resolution, generator=g)
    cfg = pers.PersonalizeConfig(camera_steps=2, invert_steps=2, steps=2, symmetry_every=1)
    with torch.no_grad():
        cams = pers._cameras(torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), n).float()
        ws = map_z(G, torch.randn(n, G.z_dim, generator=g))
    loaded = _rss_mib()
    if phase == "cameras":
        pers.fit_cameras(G, photos * 2 - 1, cfg, progress=False)
    elif phase == "latents":
        pers.invert(G, photos * 2 - 1, cams, cfg, progress=False)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            pers.personalize(G, [f"{i}.png" for i in range(n)], photos, f"{tmp}/adapter", cfg, cameras=cams,
                             identity=identity, progress=False, ws=ws, log=lambda *_: None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"phase": phase, "photos": n, "loaded_mib": round(loaded), "peak_mib": round(peak),
            "added_mib": round(peak - loaded)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--worker", nargs=2, metavar=("PHASE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]))))
        return 0
    rows = []
    print(f"{'phase':<8} {'photos':>6} {'loaded MiB':>10} {'peak MiB':>9} {'added MiB':>9} {'MiB/photo':>9}")
    for phase in args.phases:
        for n in args.photos:
            done = subprocess.run([sys.executable, __file__, "--worker", phase, str(n)], check=True,
                                  capture_output=True, text=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{phase:<8} {n:>6} {row['loaded_mib']:>10} {row['peak_mib']:>9} {row['added_mib']:>9} "
                  f"{row['added_mib'] / n:>9.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
