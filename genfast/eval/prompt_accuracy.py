"""Prompt accuracy on genfast-mini: does the generated image show what the prompt names?"""

from __future__ import annotations

import torch

from ..data.shapes import HEADS, CaptionStyle, ShapesDataset, parse_prompt
from .classifier import AttributeClassifier

HELDOUT_SEED = 1  # the training recipes draw from seed 0; everything measured uses seed 1

# Evaluation prompts always name a shape and a colour; the other parts appear half the time.
EVAL_STYLE = CaptionStyle(p_size=0.5, p_color=1.0, p_position=0.5, p_background=0.5)


def eval_prompts(n: int, seed: int = HELDOUT_SEED) -> list[str]:
    ds = ShapesDataset(n, seed=seed, style=EVAL_STYLE)
    return [ds.sample(i)[1] for i in range(n)]


def prompt_accuracy(
    images: torch.Tensor, prompts: list[str], classifier: AttributeClassifier
) -> dict[str, float]:
    """Per attribute, the fraction of images whose classified value equals the one prompted.

    images: (N, 3, H, W) in [-1, 1]. An attribute counts only over the prompts that name it.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image")
    preds = classifier.predict(images)
    hits: dict[str, list[bool]] = {}
    for i, prompt in enumerate(prompts):
        for head, value in parse_prompt(prompt).items():
            hits.setdefault(head, []).append(int(preds[head][i]) == HEADS[head].index(value))
    return {head: sum(v) / len(v) for head, v in hits.items()}
