"""Quantization of diffusers denoisers: weight formats (`formats.py`), bit-packing (`pack.py`), the
packed layer weight (`layers.py`) and the `genfast.quantize` verb (`quantize.py`)."""

from .config import QuantConfig
from .quantize import quantize

__all__ = ["QuantConfig", "quantize"]
