"""QuantConfig: what `genfast.quantize` does, validated when built."""

from __future__ import annotations

from dataclasses import dataclass

from .formats import FORMATS, get_format, parse_granularity

ACTIVATION_FORMATS = ("int8", "fp8_e4m3")
KERNELS = ("auto", "dequantize", "torchao")
# first and last convolutions and the embeddings of time, class, text and position: small, and
# where rounding hurts most. Normalisations are never quantized (only Linear / Conv2d are).
DEFAULT_SKIP = ("conv_in", "conv_out", "time_embedding.*", "time_embed.*", "add_embedding.*",
                "class_embedding.*", "pos_embed.*", "proj_out", "x_embedder.*", "context_embedder",
                "time_text_embed.*", "adaln_single.*", "caption_projection.*", "proj_in",
                # LaMamba-Diff (genfast.backbones): conv stem, and the final layer before proj_out
                "stem", "final_expand.*", "final_cond_proj", "final_adaLN_modulation.*",
                # VARModel (genfast.generators): token-in and logits-out layers (class_embed is an Embedding)
                "word_embed", "head", "head_adaLN.*")


@dataclass
class QuantConfig:
    """Options left as None take their default where they matter; one given where it does nothing is an error.

    weights: int2..int8, fp8_e4m3, fp8_e5m2, fp6_e3m2, fp6_e2m3, fp4_e2m1, fp3_e2m0, fp2_e1m0 (scaled per channel,
    group or tensor), mxfp8 / mxfp6 / mxfp4 (E8M0 scale per 32) or nvfp4 (E4M3 scale per 16 and
    an fp32 tensor scale). granularity (int / fp formats, default "channel"): "channel",
    "tensor" or "group:N". symmetric (int formats, default True): a grid around 0, else min/max
    with a zero point. activations: None, or "int8" / "fp8_e4m3" simulated on the inputs of the
    quantized layers, with scales calibrated per timestep group (`timestep_groups`, default 4)
    and, on UNets, separate scales for the two halves of skip concatenations (`split_skip`,
    default True). kernel: "dequantize" (weights stored packed, decoded on the fly), "torchao"
    (torchao's own kernels for the Linear layers where it has the format), "auto" (torchao's
    kernels on CUDA where they exist, else dequantize).
    """

    weights: str = "int8"
    granularity: str | None = None
    symmetric: bool | None = None
    activations: str | None = None
    timestep_groups: int | None = None
    split_skip: bool | None = None
    skip: tuple[str, ...] = DEFAULT_SKIP  # module names (fnmatch patterns) left in float
    kernel: str = "auto"

    def __post_init__(self):
        if self.weights not in FORMATS:
            raise ValueError(f"weights must be one of {tuple(FORMATS)}, got {self.weights!r}")
        fmt = get_format(self.weights)
        if fmt.block is not None and self.granularity is not None:
            raise ValueError(f"granularity does nothing for {self.weights}: its scales are fixed per {fmt.block} "
                             f"weights; drop it")
        if fmt.block is None:
            self.granularity = "channel" if self.granularity is None else self.granularity
            parse_granularity(self.granularity)
        if self.symmetric is not None and not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be true or false, got {self.symmetric!r}")
        if fmt.family != "int" and self.symmetric is False:
            raise ValueError(f"symmetric=False applies to integer formats only; {self.weights} is symmetric by "
                             f"construction: drop it")
        if fmt.family == "int" and self.symmetric is None:
            self.symmetric = True
        if self.activations is not None and self.activations not in ACTIVATION_FORMATS:
            raise ValueError(f"activations must be None or one of {ACTIVATION_FORMATS}, got {self.activations!r}")
        for name in ("timestep_groups", "split_skip"):
            if getattr(self, name) is not None and self.activations is None:
                raise ValueError(f"{name} applies to quantized activations only; with activations=None it would "
                                 f"do nothing: drop it or set activations")
        if self.activations is not None:
            self.timestep_groups = 4 if self.timestep_groups is None else self.timestep_groups
            self.split_skip = True if self.split_skip is None else self.split_skip
            if isinstance(self.timestep_groups, bool) or not isinstance(self.timestep_groups, int) \
                    or not 1 <= self.timestep_groups <= 1000:
                raise ValueError(f"timestep_groups must be an integer in [1, 1000], got {self.timestep_groups!r}")
            if not isinstance(self.split_skip, bool):
                raise ValueError(f"split_skip must be true or false, got {self.split_skip!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        skip = (self.skip,) if isinstance(self.skip, str) else self.skip
        if not isinstance(skip, (tuple, list)) or not all(isinstance(p, str) for p in skip):
            raise ValueError(f"skip must be module-name patterns (a string or a tuple of strings), got {self.skip!r}")
        self.skip = tuple(skip)

    @property
    def format(self):
        return get_format(self.weights)

    @property
    def bits(self) -> int:
        return self.format.bits
