"""Pretraining: next-token prediction on a text file, folder or prepared token file, through ``train``."""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch

from gptlab.config import PRETRAIN_TRAINING, PretrainSettings
from gptlab.data import TokenWindowDataset, load_tokens, split_tokens
from gptlab.errors import GptlabError
from gptlab.generate import generate_text
from gptlab.run import fingerprint_record, prepare_out_dir, start_stage
from gptlab.train import TrainConfig, TrainResult, train
from gptlab.weights import build_model, load_run

log = logging.getLogger("gptlab")


def pretrain(
    data: str | Path | None,
    out: str | Path,
    train_config: TrainConfig | dict | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **options,
) -> TrainResult:
    """Pretrain a GPT on ``data`` and write the run directory ``out``; see ``gptlab pretrain --help``.

    ``options`` are the fields of ``gptlab.config.PretrainSettings`` (``preset``, ``init``, ``tokenizer``,
    ``context_length``, ``dropout``, ``stride``, ``val_fraction``, ``sample_prompt``) with its defaults;
    ``train_config`` defaults to ``PRETRAIN_TRAINING``, what ``gptlab pretrain`` uses (a dict changes some
    of its fields). ``resume=True`` continues the run in ``out`` with its stored settings and data (``data``
    may then be None): a given option that differs from them is an error (``gptlab.run.start_stage``).
    """
    if data is None and not resume:
        raise GptlabError("pretrain: give the text to train on (--data FILE, a folder, or a token file)")
    given = {**options, **({"data": str(data)} if data is not None else {})}
    start = start_stage("pretrain", "pretrain", PretrainSettings, out, given, train_config,
                        lambda settings: PRETRAIN_TRAINING, resume)
    settings, train_config = start.settings, start.train_config
    out = prepare_out_dir(out, resume, overwrite)
    if resume:  # the run's own model; train() loads its exact state into it
        model, tok, _ = load_run(out)
    else:
        torch.manual_seed(train_config.seed)  # the initial weights, too, follow --seed
        model, tok = build_model(settings.preset, settings.init, settings.tokenizer, settings.model_overrides(),
                                 command="pretrain", lora=settings.lora_config())
    train_set, val_set = _windows(settings, tok, model.config.context_length)
    log.info("model: %.2fM parameters", model.num_parameters() / 1e6)

    def sample(m) -> str:
        return generate_text(m, tok, settings.sample_prompt, max_new_tokens=25)

    meta = {"stage": "pretrain", "data": settings.data, "pretrain": asdict(settings),
            **fingerprint_record(start, settings.data)}
    return train(model, tok, train_set, val_set, out, train_config, sample_fn=sample if settings.sample_prompt else None,
                 meta=meta, resume=resume, progress=progress, overwrite=overwrite)


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
