"""VARPipeline: a VAR-style generator behind DiTPipeline's call, so compare and the demo can treat the
language-style and the diffusion-style class-conditional models alike.

`pipe(class_labels, guidance_scale, generator=..., output_type=...)` as DiTPipeline, plus VAR's
top_k / top_p / cfg_schedule. A VAR has no denoising steps: its steps are its scales, fixed by
patch_nums, so num_inference_steps is accepted only as None or that count (an option with no effect
is an error). Labels: genfast.data.classes' names by default ("red circle" ... "purple star"),
recorded in the config so save_pretrained / from_pretrained keep them.

Load a saved folder with `VARPipeline.from_pretrained(folder)` (diffusers' DiffusionPipeline cannot
look up a class it does not ship).
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from ..data.classes import id2label as class_id2label
from .sampling import _check_pair, generate
from .var import VARModel
from .vq import MultiScaleVQModel

__all__ = ["VARPipeline"]


class VARPipeline(DiffusionPipeline):
    """transformer: a VARModel; vqvae: the MultiScaleVQModel whose tokens it was trained on."""

    model_cpu_offload_seq = "transformer->vqvae"

    def __init__(self, transformer: VARModel, vqvae: MultiScaleVQModel, id2label: dict | None = None):
        super().__init__()
        _check_pair(transformer, vqvae)
        self.register_modules(transformer=transformer, vqvae=vqvae)
        id2label = class_id2label() if id2label is None else id2label
        self.labels = {}
        for key, value in id2label.items():
            for name in str(value).split(","):
                self.labels[name.strip()] = int(key)
        self.labels = dict(sorted(self.labels.items()))
        self.register_to_config(id2label={str(k): str(v) for k, v in id2label.items()})

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Class ids of label names: one name or a list."""
        names = [label] if isinstance(label, str) else list(label)
        unknown = [n for n in names if n not in self.labels]
        if unknown:
            raise ValueError(f"unknown labels {unknown}; known: {', '.join(self.labels)}")
        return [self.labels[n] for n in names]

    @torch.no_grad()
    def __call__(self, class_labels, guidance_scale: float = 4.0, generator: torch.Generator | None = None,
                 num_inference_steps: int | None = None, output_type: str = "pil", return_dict: bool = True,
                 top_k: int = 0, top_p: float = 0.0, cfg_schedule: str = "linear"):
        """Images for class ids (an int or a list; 1000 = unconditional), in DiTPipeline's output format:
        output_type "pil" (a list of PIL images), "np" ((B, H, W, 3) floats in [0, 1]) or "pt" ((B, 3, H, W))."""
        scales = len(self.transformer.patch_nums)
        if num_inference_steps is not None and num_inference_steps != scales:
            raise ValueError(f"num_inference_steps has no effect on a VAR: it takes one step per scale ({scales}, set "
                             f"by patch_nums); pass None or {scales}")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        labels = torch.as_tensor([class_labels] if isinstance(class_labels, int) else class_labels)
        images = generate(self.transformer, self.vqvae, labels, guidance_scale=guidance_scale, top_k=top_k,
                          top_p=top_p, generator=generator, cfg_schedule=cfg_schedule).images
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
