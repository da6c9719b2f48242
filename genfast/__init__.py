"""genfast: make generative models cheaper to run and to personalize."""

from .api import Handle, accelerate, list_methods
from .assembly import assemble, save_assembled
from .models import load_evaluator, load_mini
from .quant import QuantConfig, quantize
from .quant.saving import load_pipeline, save_quantized

__version__ = "0.1.0"
__all__ = ["Handle", "QuantConfig", "__version__", "accelerate", "assemble", "list_methods", "load_evaluator",
           "load_mini", "load_pipeline", "quantize", "save_assembled", "save_quantized"]
