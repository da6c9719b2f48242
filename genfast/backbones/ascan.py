"""AsCAN (Kag et al., Snap; NeurIPS 2024; arXiv 2411.04967) as two diffusers models.

  * AsCANModel: class-conditional, runs in an unmodified `DiTPipeline` (the contract of
    genfast.pipelines.class_conditional: forward(hidden_states, timestep, class_labels) ->
    Transformer2DModelOutput, learned-sigma output channels, K + 1 label rows, DiTPipeline's null id 1000).
  * AsCANUNet2DConditionModel: text-conditional, with `UNet2DConditionModel`'s call signature and the
    config fields StableDiffusionPipeline reads, so it drops into an unmodified `StableDiffusionPipeline`.

Both are the U-Net of genfast.backbones.ascan_blocks (see its docstring for what is the paper's and
what is genfast's choice): stages of C (FusedMBConv-style convolution) and T (attention) blocks, each
stage's layout a string such as "CT" in the config. The paper's one rule is the asymmetry -- C early,
at high resolution; T late, at low resolution -- and the defaults follow it; per-stage counts and
widths are genfast's, since the paper's tables were not reachable. `genfast.backbones.ascan_config`
gives the named sizes, with the symmetric control of equal parameters.

Conditioning: the time embedding (DiT's 256-d sinusoid, then an MLP to the lowest-resolution width)
plus, in the class model, a label embedding; the text model reads text only through cross-attention.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from .ascan_blocks import AsCANTrunk, check_trunk
from .common import DIT_NULL_CLASS, class_condition, timesteps_for


class AsCANModel(ModelMixin, ConfigMixin, AsCANTrunk):
    """Class-conditional AsCAN denoiser; `forward(hidden_states, timestep, class_labels)` as DiTPipeline calls it.

    Defaults are genfast's "mini" (`ascan_config("mini")`): 16x16x4 latents, 24 classes, asymmetric.

    Args:
        sample_size: the latent side the pipeline samples at (any multiple of 2^(stages-1) runs).
        in_channels / out_channels: latent channels; out = 2 * in predicts epsilon (or v) and the variance.
        num_classes: K; the label table has K + 1 rows, row K the null class (ids K and 1000).
        block_out_channels: the width of each stage, highest resolution first; a downsample follows every
            stage but the last.
        down_layouts: one string of "C" / "T" per stage, the encoder's blocks in order (e.g. "CC", "CT").
        mid_layout: the blocks at the lowest resolution between encoder and decoder.
        up_layouts: the decoder's strings, per stage in the order of block_out_channels; None mirrors the
            encoder (each string reversed).
        num_attention_heads: heads of the T blocks, one int or one per stage.
        expand_ratio: the C blocks' 3x3 conv expansion; mlp_ratio: the T blocks' MLP expansion.
        norm_num_groups: GroupNorm groups of the C blocks and the output norm (must divide every width).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["ConvBlock", "TransformerBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 16,
        in_channels: int = 4,
        out_channels: int = 8,
        num_classes: int = 24,
        block_out_channels: tuple[int, ...] = (32, 64, 144),
        down_layouts: tuple[str, ...] = ("C", "C", "TT"),
        mid_layout: str = "T",
        up_layouts: tuple[str, ...] | None = None,
        num_attention_heads: int | tuple[int, ...] = 4,
        expand_ratio: float = 2.0,
        mlp_ratio: float = 4.0,
        norm_num_groups: int = 8,
    ):
        super().__init__()
        cfg = dict(self.config)
        check_trunk(cfg)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= DIT_NULL_CLASS:
            raise ValueError(f"num_classes must be an int in 1..{DIT_NULL_CLASS} (DiTPipeline sends id "
                             f"{DIT_NULL_CLASS} for the null class); got {num_classes!r}")
        self._build(cfg, num_classes=num_classes)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | None = None,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict noise (and the variance channels) for latents (B, in_channels, H, W).

        timestep: a scalar or (B,); class_labels: (B,) ids, with num_classes or 1000 for the null class.
        Returns Transformer2DModelOutput(sample=(B, out_channels, H, W)), or a 1-tuple.
        """
        sample = self._trunk(hidden_states, class_condition(self, hidden_states, timestep, class_labels))
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)


class AsCANUNet2DConditionModel(ModelMixin, ConfigMixin, AsCANTrunk):
    """Text-conditional AsCAN U-Net with `UNet2DConditionModel`'s call signature (StableDiffusionPipeline's
    denoiser). Its T blocks cross-attend to `encoder_hidden_states` (B, L, cross_attention_dim).

    Defaults are genfast's "t2i-mini" (`ascan_config("t2i-mini")`): 16x16x4 latents, genfast-mini's
    128-d text encoder. The trunk arguments are AsCANModel's; besides them:

    Args:
        cross_attention_dim: width of the text embeddings.
        time_cond_proj_dim: None, or the width of a `timestep_cond` embedding added to the timestep
            features (what LCM-style guidance-distilled pipelines pass; UNet2DConditionModel's field).
    Arguments of UNet2DConditionModel.forward that this model has nothing for (class_labels,
    attention_mask, added_cond_kwargs, ControlNet / T2I-Adapter residuals) are refused when given.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["ConvBlock", "TransformerBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 16,
        in_channels: int = 4,
        out_channels: int = 4,
        cross_attention_dim: int = 128,
        time_cond_proj_dim: int | None = None,
        block_out_channels: tuple[int, ...] = (32, 64, 144),
        down_layouts: tuple[str, ...] = ("CC", "CT", "TT"),
        mid_layout: str = "T",
        up_layouts: tuple[str, ...] | None = None,
        num_attention_heads: int | tuple[int, ...] = 4,
        expand_ratio: float = 2.0,
        mlp_ratio: float = 4.0,
        norm_num_groups: int = 8,
    ):
        super().__init__()
        cfg = dict(self.config)
        check_trunk(cfg)
        for field in ("cross_attention_dim", "time_cond_proj_dim"):
            value = cfg[field]
            if (value is not None or field == "cross_attention_dim") and \
                    (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{field} must be a positive int{' or None' if field != 'cross_attention_dim' else ''}"
                                 f"; got {value!r}")
        self._build(cfg, cross_attention_dim=cross_attention_dim, time_cond_proj_dim=time_cond_proj_dim)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: tuple[torch.Tensor] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        """Predict the denoising target for latents (B, in_channels, H, W) given text (B, L, cross_attention_dim).

        encoder_attention_mask: (B, L), 1 keeps a text token, 0 discards it (as UNet2DConditionModel).
        cross_attention_kwargs go to the attention processors (a LoRA 'scale' is refused: there are no LoRA
        layers). Returns UNet2DConditionOutput(sample=...).
        """
        unsupported = {
            "class_labels": "it has no class embedding (use AsCANModel for class-conditional generation)",
            "attention_mask": "its self-attention attends to every position (pass a text mask as "
                              "encoder_attention_mask)",
            "down_block_additional_residuals": "it has no ControlNet / T2I-Adapter injection points",
            "mid_block_additional_residual": "it has no ControlNet injection points",
            "down_intrablock_additional_residuals": "it has no T2I-Adapter injection points",
        }
        given = {"class_labels": class_labels, "attention_mask": attention_mask,
                 "down_block_additional_residuals": down_block_additional_residuals,
                 "mid_block_additional_residual": mid_block_additional_residual,
                 "down_intrablock_additional_residuals": down_intrablock_additional_residuals}
        for name, value in given.items():
            if value is not None:
                raise ValueError(f"{type(self).__name__} cannot honour {name}: {unsupported[name]}; pass None")
        if added_cond_kwargs:
            raise ValueError(f"{type(self).__name__} cannot honour added_cond_kwargs ({sorted(added_cond_kwargs)}): it "
                             f"has no added conditioning (SDXL time ids, IP-Adapter image embeds); pass None")
        if cross_attention_kwargs and "scale" in cross_attention_kwargs:  # the processors would drop it with a log line
            raise ValueError(f"{type(self).__name__} cannot honour cross_attention_kwargs['scale'] (a LoRA scale): it "
                             f"has no LoRA layers (no peft adapter support); drop 'scale'")
        if timestep_cond is not None and self.config.time_cond_proj_dim is None:
            raise ValueError("timestep_cond was given but this model has time_cond_proj_dim=None: build it with "
                             "time_cond_proj_dim set, or pass timestep_cond=None")
        b, device = sample.shape[0], sample.device
        dim = self.config.cross_attention_dim
        if encoder_hidden_states is None or encoder_hidden_states.ndim != 3 or \
                encoder_hidden_states.shape[0] != b or encoder_hidden_states.shape[2] != dim:
            shape = None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)
            raise ValueError(f"encoder_hidden_states must be ({b}, L, {dim}) (batch, text tokens, "
                             f"cross_attention_dim); got {shape}")
        t = timesteps_for(timestep, b, device)
        emb = self.time_embed(self.time_proj(t).to(self.dtype), timestep_cond)
        mask = None
        if encoder_attention_mask is not None:  # 1 keep / 0 discard -> an additive bias, as UNet2DConditionModel
            mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        out = self._trunk(sample, emb, encoder_hidden_states, mask, cross_attention_kwargs)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)
