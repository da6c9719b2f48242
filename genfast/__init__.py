"""genfast: make generative models cheaper to run and to personalize."""

from .models import load_evaluator, load_mini

__version__ = "0.1.0"
__all__ = ["__version__", "load_evaluator", "load_mini"]
