"""Pretraining: next-token prediction on a text file, folder or prepared token file, through ``train``."""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch

from gptlab.config import PRETRAIN_TRAINING, PretrainSettings, settings_from
from gptlab.data import TokenWindowDataset, load_tokens, split_tokens
from gptlab.generate import generate_text
from gptlab.run import prepare_out_dir
from gptlab.train import TrainConfig, TrainResult, train
from gptlab.weights import build_model

log = logging.getLogger("gptlab")


def pretrain(
    data: str | Path,
    out: str | Path,
    train_config: TrainConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **options,
) -> TrainResult:
    """Pretrain a GPT on ``data`` and write the run directory ``out``; see ``gptlab pretrain --help``.

    ``options`` are the fields of ``gptlab.config.PretrainSettings`` (``preset``, ``init``, ``tokenizer``,
    ``context_length``, ``dropout``, ``stride``, ``val_fraction``, ``sample_prompt``) with its defaults;
    ``train_config`` defaults to ``PRETRAIN_TRAINING``, what ``gptlab pretrain`` uses.
    """
    settings = settings_from(PretrainSettings, {**options, "data": str(data)}, "pretrain")
    train_config = train_config or PRETRAIN_TRAINING
    out = prepare_out_dir(out, resume, overwrite)
    torch.manual_seed(train_config.seed)  # the initial weights, too, follow --seed
    model, tok = build_model(settings.preset, settings.init, settings.tokenizer,
                             {"context_length": settings.context_length, "dropout": settings.dropout})
    train_set, val_set = _windows(settings, tok, model.config.context_length)
    log.info("model: %.2fM parameters", model.num_parameters() / 1e6)

    def sample(m) -> str:
        return generate_text(m, tok, settings.sample_prompt, max_new_tokens=25)

    meta = {"stage": "pretrain", "data": settings.data, "pretrain": asdict(settings)}
    return train(model, tok, train_set, val_set, out, train_config, sample_fn=sample if settings.sample_prompt else None,
                 meta=meta, resume=resume, progress=progress)


def _windows(settings: PretrainSettings, tokenizer, max_length: int):
    """The training and validation windows of the settings' data (no validation set for a fraction of 0)."""
    tokens = load_tokens(settings.data, tokenizer)
    train_tokens, val_tokens = split_tokens(tokens, settings.val_fraction)
    data = settings.data
    train_set = TokenWindowDataset(train_tokens, max_length, settings.stride or max_length, name=f"{data} (training part)")
    val_set = None
    if settings.val_fraction > 0:
        val_set = TokenWindowDataset(val_tokens, max_length, max_length, name=f"{data} (validation part)")
    log.info("%s: %d tokens, %d training windows of %d", data, len(tokens), len(train_set), max_length)
    return train_set, val_set
