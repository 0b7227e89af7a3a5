"""gptlab: a from-scratch GPT toolkit, from raw text to a trained, fine-tuned and served model.

``import gptlab`` loads nothing heavy: ``gptlab.load`` imports torch on first use, so the command line's
``--help`` and the tokenizers start without it.
"""
__version__ = "0.1.0"
__all__ = ["load", "__version__"]


def __getattr__(name: str):
    if name == "load":
        from gptlab.weights import load

        return load
    raise AttributeError(f"module 'gptlab' has no attribute {name!r}")
