"""Pretraining: next-token prediction on a text file, folder or prepared token file, through ``train``."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from gptlab.data import TokenWindowDataset, load_tokens, split_tokens
from gptlab.generate import generate_text
from gptlab.run import prepare_out_dir
from gptlab.train import TrainConfig, TrainResult, train
from gptlab.weights import build_model

log = logging.getLogger("gptlab")


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
