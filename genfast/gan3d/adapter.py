"""A personalized adapter folder (written by `genfast personalize`) and loading it onto its base.

The folder: `lora/` (adapter.safetensors + adapter.json, tied to the base's hash; `generator/` instead
for full fine-tuning), `latents.safetensors` (the photos' w's), `cameras.json` (EG3D format) and
`personalize.json` (photos, settings, counts). Reading it runs no code: safetensors and JSON only.
The fitting that writes it lives in `genfast.training.personalize`.
"""

from __future__ import annotations

import json
from pathlib import Path

LORA_DIR = "lora"
GENERATOR_DIR = "generator"  # full fine-tuning: the whole generator instead of an adapter
LATENTS = "latents.safetensors"
CAMERAS = "cameras.json"
SUMMARY = "personalize.json"


def load_personalized(G, adapter: str | Path):
    """Apply an adapter folder written by `personalize` to base G; returns (G, ws, names, cameras).

    An adapter trained on another base is refused (`genfast.gan3d.lora.load_adapter` compares the
    recorded base hash with G's own, always computed from G's weights).
    """
    from safetensors.torch import load_file

    from . import lora
    from .photos import read_cameras

    adapter = Path(adapter)
    if not (adapter / SUMMARY).is_file():
        raise FileNotFoundError(f"{adapter} is not a personalized adapter (no {SUMMARY}); "
                                f"make one with `genfast personalize --photos DIR --out {adapter}`")
    summary = json.loads((adapter / SUMMARY).read_text())
    if summary["config"]["full_finetune"]:
        from .loader import load_converted

        G = load_converted(adapter / GENERATOR_DIR).eval().requires_grad_(False)
    else:
        lora.load_adapter(G, adapter / LORA_DIR)
    names = summary["photos"]
    return G, load_file(str(adapter / LATENTS))["ws"], names, read_cameras(adapter / CAMERAS, names)
