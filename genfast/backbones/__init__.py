"""Efficient denoisers as diffusers models (ModelMixin + ConfigMixin).

LaMambaDiffModel and AsCANModel run in an unmodified diffusers DiTPipeline, AsCANUNet2DConditionModel
in an unmodified StableDiffusionPipeline; lamamba_config(name) / ascan_config(name) give the named
sizes; count_params / count_flops give the costs the benchmarks compare.
"""

from .ascan import AsCANModel, AsCANUNet2DConditionModel
from .configs import (
    ASCAN_CONFIGS,
    CONFIGS,
    ascan_class,
    ascan_config,
    build_on_meta,
    count_flops,
    count_params,
    lamamba_config,
)
from .lamamba import LaMambaDiffModel
from .scan import BACKENDS as SCAN_BACKENDS
from .scan import linear_scan, mamba_ssm_available, selective_scan

__all__ = [
    "ASCAN_CONFIGS",
    "CONFIGS",
    "SCAN_BACKENDS",
    "AsCANModel",
    "AsCANUNet2DConditionModel",
    "LaMambaDiffModel",
    "ascan_class",
    "ascan_config",
    "build_on_meta",
    "count_flops",
    "count_params",
    "lamamba_config",
    "linear_scan",
    "mamba_ssm_available",
    "selective_scan",
]
