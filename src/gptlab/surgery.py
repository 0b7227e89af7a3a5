"""Model surgery: the changes a fine-tuning stage makes to a ``GPTModel`` before it trains.

    add_classifier_head  ``lm_head`` becomes ``Linear(n_embd, num_classes)``, untied from ``wte``
    rebuild_head         the head a saved run was trained with, rebuilt from its ``config.json`` metadata
    select_trainable     which parameters train (``TRAINABLE_PARTS``); the output head always does

Below the data layer, the run directory and the stages, so that every stage, the run loader and the
server share one implementation. Later methods (LoRA adapters, quantized linears) join here: a new entry
in ``TRAINABLE_PARTS`` is selectable by every stage.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from gptlab.errors import GptlabError
from gptlab.model import GPTModel


def add_classifier_head(model: GPTModel, num_classes: int) -> GPTModel:
    """Replace the vocabulary head with ``Linear(n_embd, num_classes)`` (untying it from ``wte``)."""
    if num_classes < 2:
        raise GptlabError(f"a classifier needs at least 2 classes, got {num_classes}")
    device = model.wte.weight.device
    # Initialised on the CPU and then moved, so one seed gives one head on every device; a model being
    # loaded (built on the meta device) gets a head with no initial values to draw and overwrite.
    init_device = device if device.type == "meta" else torch.device("cpu")
    model.lm_head = torch.nn.Linear(model.config.n_embd, num_classes, device=init_device).to(device)
    return model


def rebuild_head(model: GPTModel, run_config: dict) -> GPTModel:
    """Give a freshly built ``model`` the output head its run was trained with, before its weights load.

    ``run_config`` is the run's ``config.json``: a classifier run lists its ``labels``, one class each.
    A language model's run lists none and keeps the vocabulary head it was built with.
    """
    labels = run_config.get("labels")
    if labels is None:
        return model
    if not isinstance(labels, list) or len(labels) < 2:
        raise GptlabError(f"config.json lists labels {labels!r}; a classifier run needs a list of at least 2; "
                          "the run is damaged, train it again")
    return add_classifier_head(model, len(labels))


def _train_last_block(model: GPTModel) -> None:
    model.h[-1].requires_grad_(True)
    model.ln_f.requires_grad_(True)


# What ``which`` may be, in the order ``gptlab.config.TRAINABLE_CHOICES`` lists them for the command line.
TRAINABLE_PARTS: dict[str, Callable[[GPTModel], None]] = {
    "head": lambda model: None,  # the output head alone (always unfrozen below)
    "last-block": _train_last_block,  # the book's choice: last block + final norm + head
    "all": lambda model: model.requires_grad_(True),
}


def select_trainable(model: GPTModel, which: str) -> int:
    """Freeze everything, then unfreeze ``which`` (head / last-block / all) and the output head; returns the count."""
    if which not in TRAINABLE_PARTS:
        raise GptlabError(f"unknown trainable part {which!r}; choose one of: {', '.join(TRAINABLE_PARTS)}")
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)
    TRAINABLE_PARTS[which](model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
