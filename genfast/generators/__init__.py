"""Language-style (discrete-token) generators beside the diffusion ones: a multi-scale residual VQ
tokenizer and a VAR-style next-scale autoregressive transformer (issue 19)."""

from .pipeline import VARPipeline
from .sampling import VARSample, default_sampling, filter_logits, generate, guidance_scales, guided_logits
from .var import VARModel, VAROutput, var_config
from .vq import MultiScaleVQModel, MultiScaleVQOutput, vq_config

__all__ = ["MultiScaleVQModel", "MultiScaleVQOutput", "VARModel", "VAROutput", "VARPipeline", "VARSample",
           "default_sampling", "filter_logits", "generate", "guidance_scales", "guided_logits", "var_config", "vq_config"]
