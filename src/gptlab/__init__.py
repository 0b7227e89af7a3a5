"""gptlab: a from-scratch GPT toolkit, from raw text to a trained, fine-tuned and served model."""
from gptlab.weights import load

__version__ = "0.1.0"
__all__ = ["load", "__version__"]
