"""Named LaMamba-Diff and AsCAN sizes, and the parameter / FLOP counts the benchmarks compare.

Only XL is published (`configs/LaMamba-DIff-XL.yaml` + `--num-heads 16` in the official repo):
dims 320/640/1280/1280, depths 2/2/2/2, a 2-block bottleneck, 16 heads, window 8, d_state 1,
ssm_ratio 2, dt_rank ceil(dim / 16), 1000 classes, 32x32x4 latents (256^2 images, SD VAE), learned
sigma. S, B and L are genfast's choices (see `lamamba_config`), as is "mini".
"""

from __future__ import annotations

import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

_XL = dict(
    sample_size=32, in_channels=4, out_channels=8, num_classes=1000, patch_size=1,
    dims=[320, 640, 1280, 1280], depths=[2, 2, 2, 2], bottleneck_depth=2, num_heads=16,
    window_size=8, mlp_ratio=4.0, d_state=1, ssm_ratio=2.0, dt_rank="auto",
)


def _widths(base: int) -> list[int]:
    return [base, 2 * base, 4 * base, 4 * base]


CONFIGS = {
    "XL": _XL,
    # S/B/L: the official layout with the first width (and DiT's head counts) chosen so that
    # the parameter count sits close to DiT-S/B/L's (33M / 130M / 458M), the "comparable
    # parameters" of the paper's comparison.
    "S": {**_XL, "dims": _widths(72), "num_heads": 6},
    "B": {**_XL, "dims": _widths(144), "num_heads": 12},
    "L": {**_XL, "dims": _widths(272), "num_heads": 16},
    # mini: genfast's 64x64 images through genfast-mini's VAE (16x16x4 latents), the 24 shape x
    # colour classes of genfast.data.shapes; small enough to train on a CPU.
    "mini": {
        **_XL, "sample_size": 16, "num_classes": 24, "dims": [32, 64, 64, 64], "num_heads": [2, 4, 4, 4],
    },
}


def lamamba_config(name: str) -> dict:
    """Keyword arguments for `LaMambaDiffModel(**config)` of a named size: "S", "B", "L", "XL", "mini".

    XL is the official configuration. The rest are genfast's choices, documented here because the
    paper's S/B/L widths were not found in any reachable source:

    - S / B / L: the official 4-stage layout (depths 2/2/2/2, 2-block bottleneck, window 8,
      d_state 1, widths w/2w/4w/4w) with w = 72 / 144 / 272 and 6 / 12 / 16 heads, giving about
      33M / 132M / 471M parameters against DiT-S/B/L's 33M / 130M / 458M. (A third-party
      re-implementation, "medgen", used w = 128 / 192 / 256 with 4 / 8 / 16 heads instead; with this
      layout those are about 104M / 235M / 417M: pass your own dims for them.)
    - mini: 16x16x4 latents (64x64 images through genfast-mini's 4x VAE), 24 classes
      (genfast.data.shapes: 4 shapes x 6 colours), widths 32/64/64/64 with 2/4/4/4 heads (16 channels
      per head), the rest as XL (all 22 blocks): about 2.4M parameters and 0.08 GFLOPs per image.
      The width stops growing after stage 2 because the 4x4 stages hold 12 of the 22 blocks: at
      32/64/128/128 they alone would carry 5.7M of 6.7M parameters.
    """
    if name not in CONFIGS:
        raise ValueError(f"unknown LaMamba-Diff size {name!r}; choose one of {', '.join(CONFIGS)}")
    return copy.deepcopy(CONFIGS[name])


# AsCAN (genfast.backbones.ascan): no sizes are published, so every config here is genfast's. Shared by
# the minis: 3 stages at 16x16 / 8x8 / 4x4 latents, 4 heads, GroupNorm of 8 groups, C expansion 2, MLP 4.
_ASCAN_MINI_TRUNK = dict(sample_size=16, in_channels=4, num_attention_heads=4, expand_ratio=2.0, mlp_ratio=4.0,
                         norm_num_groups=8)
ASCAN_CONFIGS = {
    # class-conditional, asymmetric: C blocks at 16x16 and 8x8, T blocks at 4x4 only (attention on 16 tokens)
    "mini": {**_ASCAN_MINI_TRUNK, "out_channels": 8, "num_classes": 24, "block_out_channels": [32, 64, 144],
             "down_layouts": ["C", "C", "TT"], "mid_layout": "T", "up_layouts": None},
    # the control: the same 9 blocks (4 C, 5 T) and stage depths, but every stage holds C and T equally
    # (encoder and decoder together); the 4x4 width is 136 instead of 144 for equal parameters
    "mini-symmetric": {**_ASCAN_MINI_TRUNK, "out_channels": 8, "num_classes": 24, "block_out_channels": [32, 64, 136],
                       "down_layouts": ["C", "T", "CT"], "mid_layout": "T", "up_layouts": ["T", "C", "TC"]},
    # text-to-image for genfast-mini (its VAE's 16x16x4 latents, its 128-d text encoder); T cross-attends
    # to the text at 8x8 and 4x4
    "t2i-mini": {**_ASCAN_MINI_TRUNK, "out_channels": 4, "cross_attention_dim": 128, "time_cond_proj_dim": None,
                 "block_out_channels": [32, 64, 144], "down_layouts": ["CC", "CT", "TT"], "mid_layout": "T",
                 "up_layouts": None},
}
_ASCAN_TEXT = ("t2i-mini",)


def ascan_config(name: str) -> dict:
    """Keyword arguments of a named AsCAN size; `ascan_class(name)` is the class they are for.

    "mini" and "mini-symmetric" are for `AsCANModel` (class-conditional, DiTPipeline), "t2i-mini" for
    `AsCANUNet2DConditionModel` (StableDiffusionPipeline). All are genfast's (the paper's sizes were not
    reachable), tuned on a 2-core CPU at 1 thread for 16x16x4 latents (64x64 images, genfast-mini's VAE):

    - mini: 24 classes (genfast.data.classes), widths 32 / 64 / 144, layouts "C", "C", "TT", mid "T",
      decoder mirrored: 4 C and 5 T blocks, attention only at 4x4; 2,330,904 parameters (LaMamba mini:
      2,343,606) and 0.045 GFLOPs per image (the 2.23M DiT: 0.087).
    - mini-symmetric: the control for the asymmetry claim, same depth and the same 4 C + 5 T blocks,
      spread so that each stage holds as many C as T: encoder "C", "T", "CT", decoder "T", "C", "TC"
      (a T block at 16x16), mid "T"; widths 32 / 64 / 136 give 2,296,560 parameters (1.5% fewer).
    - t2i-mini: widths 32 / 64 / 144, layouts "CC", "CT", "TT", mid "T", cross-attention to the
      128-d text at 8x8 and 4x4: 3.05M parameters and 0.075 GFLOPs per image, against genfast-mini's
      UNet2DConditionModel's 7.95M and 0.34; sized so its StableDiffusionPipeline folder (fp16, with
      genfast-mini's VAE and text encoder) stays under 10 MB.
    """
    if name not in ASCAN_CONFIGS:
        raise ValueError(f"unknown AsCAN size {name!r}; choose one of {', '.join(ASCAN_CONFIGS)}")
    return copy.deepcopy(ASCAN_CONFIGS[name])


def ascan_class(name: str):
    """The model class a named AsCAN config is for: AsCANModel or AsCANUNet2DConditionModel."""
    from .ascan import AsCANModel, AsCANUNet2DConditionModel

    ascan_config(name)  # the name check, with its error
    return AsCANUNet2DConditionModel if name in _ASCAN_TEXT else AsCANModel


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters (works on a model built on the meta device)."""
    return sum(p.numel() for p in model.parameters())


def build_on_meta(model_cls, **config):
    """A model built on the meta device: shapes only, no memory, no initialisation cost."""
    with torch.device("meta"):
        return model_cls(**config)


def count_flops(model: torch.nn.Module, batch: int = 1, sample_size: int | None = None,
                text_length: int | None = None) -> float:
    """GFLOPs of one forward pass, counting a fused multiply-add as ONE flop (the fvcore
    convention of the LaMamba-Diff and DiT papers).

    torch.utils.flop_counter.FlopCounterMode counts 2 flops per multiply-add, so its total is
    halved. It counts matmuls, convolutions and attention (linear layers, einsums, SDPA), not
    elementwise work: norms, activations, modulation and the selective scan's own recurrence are
    left out (fvcore counts norms and the official code adds 9*B*L*D*N for the scan; with
    d_state 1 both are well under 1% of the total).

    Works on any diffusers class-conditional denoiser with `sample_size` / `in_channels` in its
    config (LaMambaDiffModel, AsCANModel, DiTTransformer2DModel), and on text-conditional ones with
    `cross_attention_dim` (AsCANUNet2DConditionModel, UNet2DConditionModel), which read `text_length`
    text tokens (default 32, genfast-mini's tokenizer length; SD's is 77): a copy is rebuilt on the
    meta device with `sample_size` (latent side; 256^2 images through the SD VAE = 32) and run there,
    so nothing is allocated and the real model is untouched.
    """
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    text = config.get("cross_attention_dim") is not None
    if text_length is not None and not text:
        raise ValueError(f"text_length applies to text-conditional models (with cross_attention_dim); "
                         f"{type(model).__name__} reads no text: drop it")
    if text_length is not None and (isinstance(text_length, bool) or not isinstance(text_length, int)
                                    or text_length < 1):
        raise ValueError(f"text_length must be an int >= 1 (text tokens per prompt) or None for 32; "
                         f"got {text_length!r}")
    if sample_size is not None:
        config["sample_size"] = sample_size
    size, channels = config["sample_size"], config["in_channels"]
    with torch.device("meta"):
        probe = type(model).from_config(config)
        x = torch.empty(batch, channels, size, size)
        t = torch.zeros(batch, dtype=torch.long)
        if text:
            tokens = 32 if text_length is None else text_length
            cond = {"encoder_hidden_states": torch.empty(batch, tokens, config["cross_attention_dim"])}
        else:
            cond = {"class_labels": torch.zeros(batch, dtype=torch.long)}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        probe(x, timestep=t, **cond)
    return counter.get_total_flops() / 2 / 1e9
