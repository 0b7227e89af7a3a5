"""Instruction fine-tuning (the LLMs-from-scratch book's chapter 7): Alpaca-style records to a model that answers.

    records   ``[{"instruction": ..., "input": ... (optional), "output": ...}, ...]`` as JSON or JSONL
    split     train / test / validation, in file order (the book: 85% / 10% / 5%) or shuffled with a seed
    examples  each record laid out by a ``PromptStyle`` (``gptlab.prompts``) and tokenized as prompt + response
    batches   ``collate_instructions``: pad with <|endoftext|>, shift, ignore padding (-100) except the first
              end-of-text, truncate, optionally ignore the prompt so only the response is learned
    training  full fine-tuning through ``gptlab.train.train``; the prompt style goes into the run's config.json
    respond   generate an answer for every record of a file, for ``gptlab judge`` to score
"""
from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from gptlab.data import read_text
from gptlab.errors import GptlabError
from gptlab.generate import generate_text
from gptlab.model import GPTModel
from gptlab.prompts import PromptStyle, get_prompt_style
from gptlab.files import atomic_write_text
from gptlab.run import CONFIG_FILE, prepare_out_dir, read_run_config
from gptlab.weights import build_model
from gptlab.tokenizer import Tokenizer
from gptlab.device import select_device
from gptlab.train import TrainConfig, TrainResult, evaluate_loss, lm_loss, train

log = logging.getLogger("gptlab")

IGNORE_INDEX = -100
DEFAULT_STYLE = "alpaca"
RESPONSE_KEY = "model_response"  # the book's key for a model's answer; `gptlab judge` reads it
TEST_FILE, VAL_FILE = "test.json", "val.json"  # the held-out splits, written into the run directory


def default_data_path() -> Path:
    """The book's 1,100 records, shipped inside the package so the default works after ``pip install``."""
    return Path(__file__).resolve().parent.parent / "assets" / "instruction-data.json"


# ---- records ------------------------------------------------------------------------------------

def load_instruction_records(path: str | Path) -> list[dict]:
    """Read Alpaca-style records from a JSON list or a JSONL file (one object per line), checked.

    Every record keeps all its keys (so ``respond`` can add one); ``input`` defaults to "".
    """
    path = Path(path)
    text = read_text(path)
    lines: list[int | None]
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise GptlabError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        lines = [None] * len(records)
    else:  # JSONL, which also covers a file holding a single object
        records, lines = [], []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise GptlabError(f"{path}: line {lineno} is not valid JSON ({e.msg}, column {e.colno}); "
                                  "expected a JSON list of records or one JSON object per line") from None
            lines.append(lineno)
    if not records:
        raise GptlabError(f"{path}: no records; expected [{{\"instruction\": ..., \"output\": ...}}, ...]")
    for i, (record, lineno) in enumerate(zip(records, lines)):
        _check_record(record, f"{path}: record {i}" + (f" (line {lineno})" if lineno else ""))
    return [{**r, "input": r.get("input") or ""} for r in records]


def _check_record(record, where: str) -> None:
    if not isinstance(record, dict):
        raise GptlabError(f"{where} is a {type(record).__name__}, not an object with 'instruction' and 'output'")
    for key in ("instruction", "output"):
        if key not in record:
            raise GptlabError(f"{where} has no {key!r}; every record needs 'instruction' and 'output' "
                              "('input' is optional)")
        if not isinstance(record[key], str):
            raise GptlabError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
    if not record["instruction"].strip():
        raise GptlabError(f"{where} has an empty 'instruction'")
    if record.get("input") is not None and not isinstance(record["input"], str):
        raise GptlabError(f"{where}: 'input' must be a string, got {type(record['input']).__name__}")


def split_records(records: Sequence[dict], train_fraction: float = 0.85, test_fraction: float = 0.10,
                  seed: int | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """``(train, test, validation)``: the first ``train_fraction``, the next ``test_fraction``, the rest.

    In file order like the book (1,100 records: 935 / 110 / 55), or shuffled with ``seed`` first.
    """
    if not 0.0 < train_fraction <= 1.0 or not 0.0 <= test_fraction < 1.0 or train_fraction + test_fraction > 1.0:
        raise GptlabError(f"split fractions must satisfy 0 < train <= 1, 0 <= test, train + test <= 1; "
                          f"got train {train_fraction}, test {test_fraction}")
    records = list(records)
    if seed is not None:
        random.Random(seed).shuffle(records)
    n_train = int(len(records) * train_fraction)
    n_test = int(len(records) * test_fraction)
    if n_train == 0:
        raise GptlabError(f"{len(records)} record(s) leave nothing to train on with train fraction {train_fraction}")
    return records[:n_train], records[n_train:n_train + n_test], records[n_train + n_test:]


# ---- examples and batches -----------------------------------------------------------------------

class InstructionExample(NamedTuple):
    ids: list[int]  # prompt then response, without the closing <|endoftext|> (the collate adds it)
    prompt_len: int  # how many of ``ids`` are the prompt


class InstructionDataset(Dataset):
    """Records tokenized as ``style.prompt(...)`` + ``output``.

    Prompt and response are encoded separately so that ``prompt_len`` is exact and the prompt's tokens
    are the ones ``respond`` feeds the model. Records whose prompt alone fills ``max_length`` teach
    nothing about answering; they are left out with a warning naming them.
    """

    def __init__(self, records: Sequence[dict], tokenizer: Tokenizer, style: PromptStyle,
                 max_length: int | None = None, name: str = "data") -> None:
        self.examples: list[InstructionExample] = []
        too_long = []
        for i, record in enumerate(records):
            prompt = tokenizer.encode(style.prompt(record["instruction"], record.get("input") or ""))
            if max_length is not None and len(prompt) >= max_length:
                too_long.append((i, len(prompt)))
                continue
            self.examples.append(InstructionExample(prompt + tokenizer.encode(record["output"]), len(prompt)))
        if too_long:
            shown = ", ".join(f"record {i} ({n} tokens)" for i, n in too_long[:5])
            more = f" and {len(too_long) - 5} more" if len(too_long) > 5 else ""
            log.warning("%s: left out %d record(s) whose prompt does not fit the context of %d: %s%s",
                        name, len(too_long), max_length, shown, more)
        if records and not self.examples:
            raise GptlabError(f"{name}: every prompt is longer than the context of {max_length} tokens; "
                              "shorten the records or use a model with a longer context")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> InstructionExample:
        return self.examples[index]


def collate_instructions(batch: Sequence[Sequence[int] | InstructionExample], pad_id: int = 50256,
                         ignore_index: int = IGNORE_INDEX, max_length: int | None = None,
                         mask_prompt: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a batch of token lists into ``(inputs, targets)``, both (B, T), the book's ``custom_collate_fn``.

    Each sequence gets one <|endoftext|> (``pad_id``), which stays a target so the model learns to stop;
    the padding after it is ignored (``ignore_index``). Positions are decided by length, not by value,
    so a text that itself contains the pad id is not masked by accident. ``mask_prompt`` also ignores
    the targets inside the prompt (an ``InstructionExample``'s ``prompt_len``), so only the response is
    learned. Sequences longer than ``max_length`` are cut to it.
    """
    items = [b if isinstance(b, InstructionExample) else InstructionExample(list(b), 0) for b in batch]
    width = max(len(item.ids) for item in items) + 1  # room for the end-of-text of the longest
    inputs = torch.full((len(items), width), pad_id, dtype=torch.long)
    targets = torch.full((len(items), width), ignore_index, dtype=torch.long)
    for row, item in enumerate(items):
        sequence = torch.tensor([*item.ids, pad_id], dtype=torch.long)
        n = len(item.ids)
        inputs[row, :n] = sequence[:-1]
        targets[row, :n] = sequence[1:]
        if mask_prompt and item.prompt_len > 1:
            # target i predicts token i + 1, so the response's first token is target prompt_len - 1
            targets[row, :item.prompt_len - 1] = ignore_index
    inputs, targets = inputs[:, :-1], targets[:, :-1]  # the extra column only held the last end-of-text
    if max_length is not None:
        inputs, targets = inputs[:, :max_length], targets[:, :max_length]
    return inputs, targets


# ---- training -----------------------------------------------------------------------------------

def finetune_instruct(
    data: str | Path | None,
    out: str | Path,
    init: str | None = None,
    preset: str | None = None,
    tokenizer: str | None = None,
    prompt_style: str = DEFAULT_STYLE,
    train_config: TrainConfig | None = None,
    mask_prompt: bool = False,
    max_length: int | None = None,
    dropout: float | None = None,
    train_fraction: float = 0.85,
    test_fraction: float = 0.10,
    split_seed: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune ``init`` (a run directory, gpt2-medium, ...) or a fresh ``preset`` on instruction records.

    ``tokenizer`` ("gpt2" or a saved tokenizer directory) is for a fresh preset; ``init`` brings its own.

    Writes the run directory ``out`` (weights, metrics, loss plot, resumable state) plus the held-out
    ``test.json`` and ``val.json``, and stores the prompt style in config.json for ``chat``/``respond``.
    """
    if init is None and preset is None:
        raise GptlabError("give --init SOURCE (a run directory, gpt2, gpt2-medium, ...) or --preset NAME "
                          "to start from random weights")
    train_config = train_config or TrainConfig(epochs=2, batch_size=8, lr=5e-5)
    style = get_prompt_style(prompt_style)
    data = Path(data) if data is not None else default_data_path()
    records = load_instruction_records(data)
    train_records, test_records, val_records = split_records(records, train_fraction, test_fraction, split_seed)
    out = prepare_out_dir(out, resume, overwrite)
    previous_meta = read_run_config(out) if resume and (out / CONFIG_FILE).is_file() else {}

    if init is not None and tokenizer is not None:
        raise GptlabError(f"--tokenizer is for a fresh --preset; the model {init} keeps its own tokenizer")
    model, tokenizer = build_model(preset or "demo", init, tokenizer, {"dropout": dropout})
    if tokenizer.eot_id is None:
        raise GptlabError(f"the tokenizer {tokenizer.name!r} has no end-of-text token to pad and stop with")
    context = model.config.context_length
    if max_length is not None and not 1 < max_length <= context:
        raise GptlabError(f"--max-length must be between 2 and the model's context length {context}, got {max_length}")
    max_length = max_length or context
    train_set = InstructionDataset(train_records, tokenizer, style, max_length, name=f"{data} (training part)")
    val_set = InstructionDataset(val_records, tokenizer, style, max_length, name=f"{data} (validation part)")
    collate = partial(collate_instructions, pad_id=tokenizer.eot_id, max_length=max_length, mask_prompt=mask_prompt)
    for name, part in ((TEST_FILE, test_records), (VAL_FILE, val_records)):
        atomic_write_text(out / name, json.dumps(part, indent=2, ensure_ascii=False) + "\n")
    log.info("%s: %d records -> %d train / %d test / %d validation; style %s; model %.1fM parameters",
             data, len(records), len(train_set), len(test_records), len(val_set), style.name,
             model.num_parameters() / 1e6)

    initial_val_loss = previous_meta.get("initial_val_loss")
    if not resume and len(val_set):
        device = select_device(train_config.device)
        loader = DataLoader(val_set, batch_size=train_config.batch_size, collate_fn=collate)
        initial_val_loss = round(evaluate_loss(model.to(device), loader, lm_loss, device), 4)
        log.info("validation loss before fine-tuning: %.4f", initial_val_loss)

    sample_record = (val_records or test_records or train_records)[0]

    def sample(m: GPTModel) -> str:
        return respond_one(m, tokenizer, style, sample_record, max_new_tokens=40)

    meta = {"stage": "instruct", "prompt_style": style.name, "data": str(data), "init": init or f"preset:{preset}",
            "mask_prompt": mask_prompt, "max_length": max_length, "initial_val_loss": initial_val_loss,
            "split": {"train": len(train_records), "test": len(test_records), "val": len(val_records),
                      "seed": split_seed}}
    return train(model, tokenizer, train_set, val_set, out, train_config, collate_fn=collate,
                 sample_fn=sample, meta=meta, resume=resume, progress=progress)


# ---- using the model ----------------------------------------------------------------------------

def model_prompt_style(source: str | Path, override: str | None = None) -> PromptStyle:
    """The style a model was fine-tuned with (its run's config.json), unless ``override`` names one."""
    if override:
        return get_prompt_style(override)
    if (Path(source) / CONFIG_FILE).is_file():
        try:
            stored = read_run_config(source).get("prompt_style")
        except GptlabError:
            stored = None  # not a gptlab run (a Hugging Face folder, say): no stored style
        if stored:
            return get_prompt_style(stored)
    return get_prompt_style(DEFAULT_STYLE)


def respond_one(model: GPTModel, tokenizer: Tokenizer, style: PromptStyle, record: dict,
                max_new_tokens: int = 256, stop: Sequence[str] = (), **sampling) -> str:
    """The model's answer to one record: generated after the style's prompt, cut at a new turn (or ``stop``)."""
    prompt = style.prompt(record["instruction"], record.get("input") or "")
    text = generate_text(model, tokenizer, prompt, max_new_tokens, stop=(*style.stop, *stop), **sampling)
    return style.extract_response(text)


def respond(model: GPTModel, tokenizer: Tokenizer, style: PromptStyle, records: Sequence[dict],
            key: str = RESPONSE_KEY, max_new_tokens: int = 256, progress: bool = True, **sampling) -> list[dict]:
    """Each record with the model's answer added under ``key``."""
    context = model.config.context_length
    answered = []
    for i, record in enumerate(tqdm(records, desc="responding", unit="record", disable=not progress,
                                    dynamic_ncols=True)):
        n_prompt = len(tokenizer.encode(style.prompt(record["instruction"], record.get("input") or "")))
        if n_prompt >= context:
            log.warning("record %d: the prompt is %d tokens, longer than the context of %d; the model sees "
                        "only its last %d tokens", i, n_prompt, context, context - 1)
        answered.append({**record, key: respond_one(model, tokenizer, style, record, max_new_tokens, **sampling)})
    return answered
