"""Pretraining: next-token prediction on a text file, folder or prepared token file, through ``train``."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from gptlab.data import TokenWindowDataset, load_tokens, split_tokens
from gptlab.errors import GptlabError
from gptlab.generate import generate_text
from gptlab.model import GPTConfig, GPTModel
from gptlab.run import CONFIG_FILE, STATE_FILE
from gptlab.tokenizer import Tokenizer, get_tokenizer
from gptlab.train import TrainConfig, TrainResult, train
from gptlab.weights import load

log = logging.getLogger("gptlab")


def prepare_out_dir(out: str | Path, resume: bool, overwrite: bool) -> Path:
    """Refuse to train over an existing run unless asked to resume it or start it over.

    Creates nothing: the first checkpoint makes the directory, so a run that fails on its input (a
    missing file, bad data) leaves no empty directory behind.
    """
    out = Path(out)
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())  # what the checkpoint will build on
    if not existing.is_dir():
        raise GptlabError(f"{existing} is a file, not a directory; choose another --out than {out}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise GptlabError(f"{existing}: no permission to write there; choose another --out than {out}")
    exists = (out / CONFIG_FILE).exists() or (out / STATE_FILE).exists()
    if resume and not (out / STATE_FILE).exists():
        raise GptlabError(f"{out}: nothing to resume (no {STATE_FILE}); start without --resume")
    if exists and not (resume or overwrite):
        raise GptlabError(f"{out} already holds a run; pass --resume to continue it or --overwrite to start over")
    if overwrite and not resume:
        for name in ("config.json", "model.safetensors", "train_state.pt", "metrics.csv", "loss.png"):
            (out / name).unlink(missing_ok=True)
    return out


def build_model(preset: str, init: str | None, tokenizer_name: str | None,
                overrides: dict) -> tuple[GPTModel, Tokenizer]:
    """A fresh model from a preset (sized to the tokenizer's vocabulary), or a loaded one from ``init``."""
    if init is not None:
        model, tokenizer = load(init)
        changed = {k: v for k, v in overrides.items() if v is not None and getattr(model.config, k) != v}
        if "dropout" in changed:
            model.set_dropout(changed.pop("dropout"))
        if changed:
            raise GptlabError(f"--init {init}: cannot change {sorted(changed)} of a trained model")
        return model.train(), tokenizer
    tokenizer = get_tokenizer(tokenizer_name or "gpt2")
    config = GPTConfig.preset(preset, **{"vocab_size": tokenizer.n_vocab, **overrides})
    return GPTModel(config), tokenizer


def pretrain(
    data: str | Path,
    out: str | Path,
    preset: str = "demo",
    train_config: TrainConfig | None = None,
    init: str | None = None,
    tokenizer: str | None = None,
    context_length: int | None = None,
    dropout: float | None = None,
    stride: int | None = None,
    val_fraction: float = 0.1,
    sample_prompt: str | None = "Every effort moves you",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Pretrain a GPT on ``data`` and write the run directory ``out``; see ``gptlab pretrain --help``."""
    train_config = train_config or TrainConfig()
    out = prepare_out_dir(out, resume, overwrite)
    torch.manual_seed(train_config.seed)  # the initial weights, too, follow --seed
    model, tok = build_model(preset, init, tokenizer, {"context_length": context_length, "dropout": dropout})
    max_length = model.config.context_length
    tokens = load_tokens(data, tok)
    train_tokens, val_tokens = split_tokens(tokens, val_fraction)
    train_set = TokenWindowDataset(train_tokens, max_length, stride or max_length, name=f"{data} (training part)")
    val_set = None
    if val_fraction > 0:
        val_set = TokenWindowDataset(val_tokens, max_length, max_length, name=f"{data} (validation part)")
    log.info("%s: %d tokens, %d training windows of %d, model %.2fM parameters",
             data, len(tokens), len(train_set), max_length, model.num_parameters() / 1e6)

    def sample(m) -> str:
        return generate_text(m, tok, sample_prompt, max_new_tokens=25)

    return train(
        model, tok, train_set, val_set, out, train_config,
        sample_fn=sample if sample_prompt else None,
        meta={"stage": "pretrain", "data": str(data)},
        resume=resume, progress=progress,
    )
