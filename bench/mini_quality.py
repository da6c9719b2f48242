"""How good is genfast-mini, and how good is the evaluator that judges it?

Prints, in one run:
  1. evaluator accuracy per attribute on held-out real shapes images;
  2. prompt accuracy of images generated from held-out prompts (each names a shape and a colour);
  3. FID in the evaluator's feature space (FID[mini-features]) of generated vs held-out real images,
     next to real vs real (two disjoint real sets of the same size) as the floor.

    python bench/mini_quality.py [--num-images 1024] [--steps 25] [--guidance 5.0 7.5]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
from cleanfid.fid import fid_from_feats
from tqdm.auto import tqdm

from genfast.data.shapes import HEADS, render_batch, to_tensor
from genfast.eval.prompt_accuracy import HELDOUT_SEED, eval_prompts, prompt_accuracy
from genfast.models import load_evaluator, load_mini


@torch.no_grad()
def features(classifier, images: torch.Tensor) -> np.ndarray:
    return torch.cat([classifier.embed(x) for x in images.split(256)]).numpy().astype(np.float64)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=1024, help="generated images (>= 256)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, nargs="+", default=[5.0])
    p.add_argument("--classifier-images", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    if args.num_images < 256:
        p.error("--num-images must be >= 256 for figures worth quoting")
    torch.manual_seed(0)
    classifier = load_evaluator()
    pipe = load_mini()
    pipe.set_progress_bar_config(disable=True)
    report: dict = {"num_images": args.num_images, "steps": args.steps}

    # 1. the evaluator on held-out real images
    imgs, _, labels = render_batch(args.classifier_images, HELDOUT_SEED, start=10**6)
    preds = classifier.predict(to_tensor(imgs))
    report["classifier_accuracy"] = {
        h: float((preds[h].numpy() == labels[:, i]).mean()) for i, h in enumerate(HEADS)
    }
    print(f"evaluator accuracy on {args.classifier_images} held-out real images:")
    for h, v in report["classifier_accuracy"].items():
        print(f"  {h:<11} {100 * v:6.2f}%")

    # 3a. the floor: held-out real images of the prompts' scenes vs a disjoint real set
    n = args.num_images
    prompts = eval_prompts(n)
    real_a = features(classifier, to_tensor(render_batch(n, HELDOUT_SEED)[0]))
    real_b = features(classifier, to_tensor(render_batch(n, HELDOUT_SEED, start=n)[0]))
    report["fid_real_vs_real"] = float(fid_from_feats(real_a, real_b))

    # 2 + 3b. generated images
    report["generated"] = {}
    for g in args.guidance:
        out = []
        for i in tqdm(range(0, n, args.batch_size), desc=f"generate (guidance {g})"):
            chunk = prompts[i : i + args.batch_size]
            gens = [torch.Generator().manual_seed(i + j) for j in range(len(chunk))]
            out.append(pipe(chunk, num_inference_steps=args.steps, guidance_scale=g, generator=gens,
                            output_type="pt").images * 2 - 1)
        images = torch.cat(out)
        acc = prompt_accuracy(images, prompts, classifier)
        fid = float(fid_from_feats(features(classifier, images), real_a))
        report["generated"][str(g)] = {"prompt_accuracy": acc, "fid": fid}

    heads = [h for h in HEADS if h in next(iter(report["generated"].values()))["prompt_accuracy"]]
    print(f"\nprompt accuracy of {n} generated images, {args.steps} DDIM steps (held-out prompts):")
    print("  guidance  " + "  ".join(f"{h:>10}" for h in heads) + "   FID[mini-features]")
    for g, r in report["generated"].items():
        cells = "  ".join(f"{100 * r['prompt_accuracy'][h]:9.1f}%" for h in heads)
        print(f"  {float(g):8.1f}  {cells}   {r['fid']:.3f}")
    print(f"  real vs real (floor)  FID[mini-features] {report['fid_real_vs_real']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
