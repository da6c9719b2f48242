"""Efficient class-conditional denoisers as diffusers models (ModelMixin + ConfigMixin).

LaMambaDiffModel runs in an unmodified diffusers DiTPipeline; lamamba_config(name) gives the
named sizes; count_params / count_flops give the costs the benchmarks compare.
"""

from .configs import CONFIGS, build_on_meta, count_flops, count_params, lamamba_config
from .lamamba import LaMambaDiffModel
from .scan import BACKENDS as SCAN_BACKENDS
from .scan import linear_scan, mamba_ssm_available, selective_scan

__all__ = [
    "CONFIGS",
    "SCAN_BACKENDS",
    "LaMambaDiffModel",
    "build_on_meta",
    "count_flops",
    "count_params",
    "lamamba_config",
    "linear_scan",
    "mamba_ssm_available",
    "selective_scan",
]
