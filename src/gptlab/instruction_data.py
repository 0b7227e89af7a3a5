"""Instruction records (the LLMs-from-scratch book's chapter 7) and the batches made of them.

    records   ``[{"instruction": ..., "input": ... (optional), "output": ...}, ...]`` as JSON or JSONL
    split     train / test / validation, in file order (the book: 85% / 10% / 5%) or shuffled with a seed
    examples  each record laid out by a ``PromptStyle`` (``gptlab.prompts``) and tokenized as prompt + response
    batches   ``collate_instructions``: pad with <|endoftext|>, shift, ignore padding (-100) except the first
              end-of-text, truncate, optionally ignore the prompt so only the response is learned
"""
from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from gptlab.config import InstructSettings
from gptlab.errors import GptlabError
from gptlab.files import read_json_records
from gptlab.prompts import PromptStyle
from gptlab.tokenizer import Tokenizer

log = logging.getLogger("gptlab")

IGNORE_INDEX = -100
RESPONSE_KEY = "model_response"  # the book's key for a model's answer: `gptlab respond` adds it, `judge` reads it
TEST_FILE, VAL_FILE = "test.json", "val.json"  # the held-out splits, written into the run directory


def default_data_path() -> Path:
    """The book's 1,100 records, shipped inside the package so the default works after ``pip install``."""
    return Path(__file__).resolve().parent / "assets" / "instruction-data.json"


# ---- records ------------------------------------------------------------------------------------

def load_instruction_records(path: str | Path) -> list[dict]:
    """Read Alpaca-style records from a JSON list or a JSONL file (one object per line), checked.

    Every record keeps all its keys (so ``respond`` can add one); ``input`` defaults to "".
    """
    path = Path(path)
    rows = read_json_records(path, what="an object with 'instruction' and 'output'")
    # a line number helps only where records stand on different lines (not in a one-line JSON list)
    several_lines = len({line for line, _ in rows}) > 1
    for i, (line, record) in enumerate(rows):
        check_record(record, f"{path}: record {i}" + (f" (line {line})" if several_lines else ""))
    return [{**record, "input": record.get("input") or ""} for _, record in rows]


def check_record(record: dict, where: str, required: tuple[str, ...] = ("instruction", "output")) -> None:
    """An instruction record (or, with other ``required`` keys, a preference pair) with string fields."""
    for key in required:
        if key not in record:
            needed = ", ".join(repr(k) for k in required)
            raise GptlabError(f"{where} has no {key!r}; every record needs {needed} ('input' is optional)")
        if not isinstance(record[key], str):
            raise GptlabError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
    if not record["instruction"].strip():
        raise GptlabError(f"{where} has an empty 'instruction'")
    if record.get("input") is not None and not isinstance(record["input"], str):
        raise GptlabError(f"{where}: 'input' must be a string, got {type(record['input']).__name__}")


def split_records(records: Sequence[dict], train_fraction: float = InstructSettings.train_fraction,
                  test_fraction: float = InstructSettings.test_fraction,
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
    inputs = torch.full((len(items), width), pad_id, dtype=torch.long)  # (B, T + 1)
    targets = torch.full((len(items), width), ignore_index, dtype=torch.long)  # (B, T + 1)
    for row, item in enumerate(items):
        sequence = torch.tensor([*item.ids, pad_id], dtype=torch.long)
        n = len(item.ids)
        inputs[row, :n] = sequence[:-1]
        targets[row, :n] = sequence[1:]
        if mask_prompt and item.prompt_len > 1:
            # target i predicts token i + 1, so the response's first token is target prompt_len - 1
            targets[row, :item.prompt_len - 1] = ignore_index
    inputs, targets = inputs[:, :-1], targets[:, :-1]  # (B, T): the extra column only held the last end-of-text
    if max_length is not None:
        inputs, targets = inputs[:, :max_length], targets[:, :max_length]
    return inputs, targets
