"""genfast: make generative models cheaper to run and to personalize."""

# imported so that DiTPipeline folders of genfast's class-conditional denoisers load after `import genfast`
# (diffusers resolves a custom component's class only from modules already imported)
from . import backbones  # noqa: F401
from .api import Handle, accelerate, list_methods
from .assembly import assemble, save_assembled
from .models import load_evaluator, load_mini
from .pipelines import class_conditional  # noqa: F401  (ClassDiT, for the same reason)
from .quant import QuantConfig, quantize
from .quant.fake_quant import fake_quantize
from .quant.saving import load_pipeline, save_quantized
from .training.qat import QATConfig, qat_distill

__version__ = "0.1.0"
__all__ = ["Handle", "QATConfig", "QuantConfig", "__version__", "accelerate", "assemble", "fake_quantize", "list_methods",
           "load_evaluator", "load_mini", "load_pipeline", "qat_distill", "quantize", "save_assembled", "save_quantized"]
