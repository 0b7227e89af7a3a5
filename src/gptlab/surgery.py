"""Model surgery: the changes a fine-tuning stage makes to a ``GPTModel`` before it trains.

    add_classifier_head  ``lm_head`` becomes ``Linear(n_embd, num_classes)``, untied from ``wte``
    rebuild_head         the head a saved run was trained with, rebuilt from its ``config.json`` metadata
    select_trainable     which parameters train (``TRAINABLE_PARTS``); the output head always does
    add_lora             freeze the model, give chosen layers LoRA adapters (``gptlab.lora.lora_layer``)
    merge_lora           fold the adapters into the weights: an ordinary model again
    trained_names        what a LoRA model's run stores (the adapters, a classifier's head)
    weights_fingerprint  the digest of a model's weights, by which a LoRA run knows its base

Below the data layer, the run directory and the stages, so that every stage, the run loader and the
server share one implementation. Later methods (quantized linears) join here.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn as nn

from gptlab.config import LoRAConfig
from gptlab.errors import GptlabError
from gptlab.linear import CPULinear
from gptlab.lora import LoRAAdapter, lora_layer
from gptlab.model import GPTModel


def is_classifier(model: GPTModel) -> bool:
    """Does the model predict classes (a classifier run's head) instead of the next token?"""
    return model.lm_head.weight.shape[0] != model.config.vocab_size


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


def _train_adapters(model: GPTModel) -> None:
    if getattr(model, "lora", None) is None:
        raise GptlabError("only a model with LoRA adapters (add_lora, --lora) trains its adapters alone")
    for module in model.modules():
        if isinstance(module, LoRAAdapter):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)


# What ``which`` may be: ``gptlab.config.TRAINABLE_CHOICES`` lists the first three for --trainable; "lora" is --lora.
TRAINABLE_PARTS: dict[str, Callable[[GPTModel], None]] = {
    "head": lambda model: None,  # the output head alone (always unfrozen below)
    "last-block": _train_last_block,  # the book's choice: last block + final norm + head
    "all": lambda model: model.requires_grad_(True),
    "lora": _train_adapters,  # the adapters (+ a classifier's new head); the base stays frozen
}


def select_trainable(model: GPTModel, which: str) -> int:
    """Freeze everything, then unfreeze ``which`` (``TRAINABLE_PARTS``) and the output head; returns the count.

    With "lora" the output head is unfrozen only when it is a classifier's (new) head: a language model's is the
    base's (and tied to the token embedding).
    """
    if which not in TRAINABLE_PARTS:
        raise GptlabError(f"unknown trainable part {which!r}; choose one of: {', '.join(TRAINABLE_PARTS)}")
    if which != "lora" and getattr(model, "lora", None) is not None:
        raise GptlabError(f"a model with LoRA adapters trains its adapters (and a new head), not {which!r}; merge "
                          "the adapters first (merge_lora, gptlab export --merge) to train its weights")
    model.requires_grad_(False)
    if which != "lora" or is_classifier(model):
        model.lm_head.requires_grad_(True)
    TRAINABLE_PARTS[which](model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- LoRA ----------------------------------------------------------------------------------------

def target_layers(model: GPTModel, targets: tuple[str, ...]) -> dict[str, nn.Linear]:
    """The layers ``targets`` names (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``, ``head``)."""
    layers: dict[str, nn.Linear] = {}
    for i, block in enumerate(model.h):
        for target in targets:
            if target != "head":
                part, name = target.split(".")
                layers[f"h.{i}.{target}"] = getattr(getattr(block, part), name)
    if "head" in targets:
        layers["lm_head"] = model.lm_head
    return layers


def add_lora(model: GPTModel, config: LoRAConfig, base_ref: dict) -> GPTModel:
    """Freeze ``model`` and give the layers ``config.targets`` names a fresh adapter each (B = 0); in place.

    What trains afterwards: the adapters, and a classifier head (``add_classifier_head``), which is new and
    so cannot be frozen. ``base_ref`` (``gptlab.weights.base_reference``: the base's source and fingerprint)
    goes into the run's config.json. Returns ``model``, carrying ``model.lora`` and ``model.base_ref``.
    """
    if getattr(model, "lora", None) is not None:
        raise GptlabError("the model already has LoRA adapters; merge them first (gptlab export --merge)")
    classifier = is_classifier(model)
    if "head" in config.targets and classifier:
        raise GptlabError("--lora-targets head: a classifier's new head trains in full beside the adapters; "
                          "leave 'head' out")
    layers = target_layers(model, config.targets)
    for name, layer in layers.items():
        if config.rank > min(layer.in_features, layer.out_features):
            raise GptlabError(f"--lora-rank {config.rank} is larger than {name}'s smaller dimension "
                              f"({min(layer.in_features, layer.out_features)}); a rank that large is no longer "
                              "low-rank: choose at most that")
    for name, layer in layers.items():
        _replace(model, name, lora_layer(layer, config.rank, config.alpha, config.dropout))
    model.lora, model.base_ref = config, dict(base_ref)
    select_trainable(model, "lora")
    return model


def merge_lora(model: GPTModel) -> GPTModel:
    """Fold every adapter into its weight, in place: afterwards ``model`` is an ordinary ``GPTModel``.

    A tied head with an adapter no longer equals the token embedding, so it is untied (``tie_weights`` False).
    Adapters over an int8 / int4 base merge into float weights: dequantize that first (``gptlab.weights.merge_adapters``).
    """
    if getattr(model, "quantization", None) is not None:
        raise GptlabError("the model's base is int8/int4: dequantize it before merging its adapters "
                          "(gptlab.weights.merge_adapters does both)")
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRAAdapter)]:
        plain = CPULinear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight = nn.Parameter(layer.merged_weight(), requires_grad=False)
        plain.bias = layer.bias
        _replace(model, name, plain)
    if model.config.tie_weights and model.lm_head.weight is not model.wte.weight:
        model.config = replace(model.config, tie_weights=False)
    model.lora = model.base_ref = None
    return model


def trained_names(model: GPTModel) -> list[str]:
    """The parameters a LoRA model trains, which are all its run stores: the adapters and a classifier's head."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRAAdapter) for n in (f"{n}.lora_A", f"{n}.lora_B")]
    if is_classifier(model):
        names += [f"lm_head.{n}" for n, _ in model.lm_head.named_parameters()]
    return names


def weights_fingerprint(model: GPTModel) -> str:
    """SHA-256 over every weight's name, dtype, shape and bytes (a tied head once): the same for the same
    weights from any source format, different after any change. About a second per 500 MB."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=False).items()):
        if name == "lm_head.weight" and model.lm_head.weight is model.wte.weight:
            continue
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + digest.hexdigest()


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)
