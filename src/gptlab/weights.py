"""Read a model from wherever it lives: ``load(source)`` returns ``(model, tokenizer)``.

Sources understood so far: a gptlab run directory (see ``gptlab.run``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from gptlab.errors import GptlabError
from gptlab.model import GPTModel
from gptlab.run import CONFIG_FILE, load_run
from gptlab.tokenizer import Tokenizer


def load(source: str | Path, device: str | torch.device = "cpu") -> tuple[GPTModel, Tokenizer]:
    """Load a model and its tokenizer from ``source`` (a run directory), in eval mode on ``device``."""
    path = Path(source)
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        model, tokenizer, _ = load_run(path, device)
        return model, tokenizer
    raise GptlabError(f"cannot load {str(source)!r}: not a gptlab run directory (expected {CONFIG_FILE} inside)")
