"""Quantization of diffusers denoisers. Today: integer weight formats, simulated (`fake.py`).

The packed checkpoints, float formats, activations and kernels of issue 14 build on this config.
"""

from .fake import QuantConfig, quantize

__all__ = ["QuantConfig", "quantize"]
