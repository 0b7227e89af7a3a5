"""The instruction fine-tuning stage (the LLMs-from-scratch book's chapter 7): records to a model that answers.

The stage joins what lives below it: ``gptlab.instruction_data`` (records, the split, the dataset and the
collate), ``gptlab.train`` (full fine-tuning, checkpoints, resume) and ``gptlab.respond`` (the sample
answer printed at each evaluation). It writes the held-out ``test.json`` and ``val.json`` into the run
directory and stores the prompt style in its config.json, for ``chat``, ``respond`` and ``serve``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from gptlab.config import InstructSettings, instruct_training
from gptlab.device import select_device
from gptlab.errors import GptlabError
from gptlab.instruction_data import (
    TEST_FILE, VAL_FILE, InstructionDataset, collate_instructions, default_data_path,
    load_instruction_records, split_records,
)
from gptlab.model import GPTModel
from gptlab.prompts import PromptStyle, get_prompt_style
from gptlab.respond import respond_one
from gptlab.run import fingerprint_record, prepare_out_dir, start_stage
from gptlab.surgery import select_trainable
from gptlab.tokenizer import Tokenizer
from gptlab.train import TrainConfig, TrainResult, evaluate_loss, lm_loss, train
from gptlab.weights import build_model, load_run

log = logging.getLogger("gptlab")

STAGE = "instruct"
FRESH_PRESET_INIT = "preset:"  # config.json's "init" of a run from random weights: "preset:NAME"


def finetune_instruct(
    data: str | Path | None,
    out: str | Path,
    train_config: TrainConfig | dict | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **options,
) -> TrainResult:
    """Fine-tune ``init`` (a run directory, gpt2-medium, ...) or a fresh ``preset`` on instruction records.

    ``data``: JSON/JSONL records (None: the book's 1,100, shipped with gptlab). ``options`` are the fields
    of ``gptlab.config.InstructSettings`` with its defaults (``init`` or ``preset``, ``tokenizer`` for a
    preset, ``prompt_style``, ``mask_prompt``, ``max_length``, the split; ``lora`` ...); ``train_config``
    defaults to ``instruct_training(lora)``, what ``gptlab finetune-instruct`` uses (a dict changes some of its
    fields). On ``resume`` the settings stored in the run are used; a given option that differs from them is an error
    (``gptlab.run.start_stage``). Writes the run directory ``out`` (weights, metrics, loss plot, resumable
    state) plus the held-out ``test.json`` and ``val.json``, with its first checkpoint.
    """
    given = {**options, **({"data": str(data)} if data is not None else {})}
    start = start_stage("finetune-instruct", STAGE, InstructSettings, out, given, train_config,
                        lambda settings: instruct_training(settings.lora), resume,
                        data_path=lambda settings: settings.data or default_data_path())
    settings, train_config, previous = start.settings, start.train_config, start.previous
    style = get_prompt_style(settings.prompt_style)
    data = Path(settings.data) if settings.data is not None else default_data_path()
    records = load_instruction_records(data)
    train_records, test_records, val_records = split_records(records, settings.train_fraction,
                                                             settings.test_fraction, settings.split_seed)
    out = prepare_out_dir(out, resume, overwrite)

    model, tokenizer = load_run(out)[:2] if resume else _instruct_model(settings, train_config.seed)
    max_length = _max_length(settings, model)
    select_trainable(model, "lora" if settings.lora else "all")  # the adapters, or full fine-tuning
    train_set = InstructionDataset(train_records, tokenizer, style, max_length, name=f"{data} (training part)")
    val_set = InstructionDataset(val_records, tokenizer, style, max_length, name=f"{data} (validation part)")
    collate = partial(collate_instructions, pad_id=tokenizer.eot_id, max_length=max_length,
                      mask_prompt=settings.mask_prompt)
    held_out = {name: json.dumps(part, indent=2, ensure_ascii=False) + "\n"  # written with each checkpoint
                for name, part in ((TEST_FILE, test_records), (VAL_FILE, val_records))}
    log.info("%s: %d records -> %d train / %d test / %d validation; style %s; model %.1fM parameters",
             data, len(records), len(train_set), len(test_records), len(val_set), style.name,
             model.num_parameters() / 1e6)

    initial_val_loss = previous.get("initial_val_loss")
    if not resume and len(val_set):
        initial_val_loss = _initial_val_loss(model, val_set, collate, train_config)
    sample = _sampler(tokenizer, style, (val_records or test_records or train_records)[0])
    meta = {"stage": STAGE, "prompt_style": style.name, "data": str(data),
            "init": settings.init or f"{FRESH_PRESET_INIT}{settings.preset}", "mask_prompt": settings.mask_prompt,
            "max_length": max_length, "initial_val_loss": initial_val_loss,
            "split": {"train": len(train_records), "test": len(test_records), "val": len(val_records),
                      "seed": settings.split_seed},
            STAGE: asdict(settings), **fingerprint_record(start, data)}
    return train(model, tokenizer, train_set, val_set, out, train_config, collate_fn=collate,
                 sample_fn=sample, meta=meta, resume=resume, progress=progress, overwrite=overwrite,
                 extra_files=held_out)


# ---- the steps of the stage ----------------------------------------------------------------------

def _instruct_model(settings: InstructSettings, seed: int) -> tuple[GPTModel, Tokenizer]:
    torch.manual_seed(seed)  # random weights follow --seed, as in pretrain (a resume loads its own after this)
    model, tokenizer = build_model(settings.preset, settings.init, settings.tokenizer, settings.model_overrides(),
                                   command="finetune-instruct", lora=settings.lora_config())
    if tokenizer.eot_id is None:
        raise GptlabError(f"the tokenizer {tokenizer.name!r} has no end-of-text token to pad and stop with")
    return model, tokenizer


def _max_length(settings: InstructSettings, model: GPTModel) -> int:
    context = model.config.context_length
    if settings.max_length is not None and not 1 < settings.max_length <= context:
        raise GptlabError(f"--max-length must be between 2 and the model's context length {context}, "
                          f"got {settings.max_length}")
    return settings.max_length or context


def _initial_val_loss(model: GPTModel, val_set: InstructionDataset, collate, train_config: TrainConfig) -> float:
    device = select_device(train_config.device)
    loader = DataLoader(val_set, batch_size=train_config.batch_size, collate_fn=collate)
    loss = round(evaluate_loss(model.to(device), loader, lm_loss, device), 4)
    log.info("validation loss before fine-tuning: %.4f", loss)
    return loss


def _sampler(tokenizer: Tokenizer, style: PromptStyle, record: dict):
    """What ``train`` prints at each evaluation: the model's answer to one held-out record."""
    def sample(m: GPTModel) -> str:
        return respond_one(m, tokenizer, style, record, max_new_tokens=40)

    return sample
