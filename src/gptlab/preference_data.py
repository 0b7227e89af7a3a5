"""Preference pairs (the LLMs-from-scratch book's chapter-7 DPO bonus) and the batches made of them.

    records   ``[{"instruction": ..., "input": ... (optional), "chosen": ..., "rejected": ...}, ...]``, JSON or JSONL
    split     train / test / validation in file order, as for instruction records (the book: 85% / 10% / 5%)
    pairs     each record laid out by a ``PromptStyle``: one prompt, then the chosen and the rejected response
    batches   ``collate_preferences``: the chosen and the rejected sequences of a batch padded to one width and
              stacked, chosen rows first; the targets are the responses only (and their closing <|endoftext|>)
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from gptlab.errors import GptlabError
from gptlab.files import read_json_records
from gptlab.instruction_data import IGNORE_INDEX, InstructionExample, check_record, collate_instructions
from gptlab.prompts import PromptStyle
from gptlab.tokenizer import Tokenizer

log = logging.getLogger("gptlab")

PAIR_KEYS = ("instruction", "chosen", "rejected")


def default_preference_path() -> Path:
    """The book's 1,100 preference records, shipped inside the package so the default works after ``pip install``."""
    return Path(__file__).resolve().parent / "assets" / "instruction-data-with-preference.json"


# ---- records ------------------------------------------------------------------------------------

def load_preference_records(path: str | Path) -> list[dict]:
    """Read preference records from a JSON list or a JSONL file (one object per line), checked.

    Every record keeps all its keys (``output``, say); ``input`` defaults to "". A record without
    ``chosen`` or ``rejected`` is refused by number and line. One whose two answers are the same text is
    kept here, so the split stays the book's, and left out of training by ``PreferenceDataset``.
    """
    path = Path(path)
    rows = read_json_records(path, what="an object with 'instruction', 'chosen' and 'rejected'")
    several_lines = len({line for line, _ in rows}) > 1  # a one-line JSON list has no useful line numbers
    for i, (line, record) in enumerate(rows):
        check_record(record, f"{path}: record {i}" + (f" (line {line})" if several_lines else ""), PAIR_KEYS)
    return [{**record, "input": record.get("input") or ""} for _, record in rows]


def same_answers(record: dict) -> bool:
    """Whether a record's chosen and rejected answers are one text: a pair with nothing to prefer."""
    return record["chosen"].strip() == record["rejected"].strip()


# ---- pairs and batches --------------------------------------------------------------------------

class PreferencePair(NamedTuple):
    prompt: list[int]  # the style's prompt, up to and including the response header
    chosen: list[int]  # the preferred response, without the closing <|endoftext|> (the collate adds it)
    rejected: list[int]  # the dispreferred one, likewise
    # the frozen reference model's log-probabilities of (chosen, rejected); None until they are computed
    reference: tuple[float, float] | None = None


class PreferenceDataset(Dataset):
    """Records tokenized as one prompt and two responses, the way ``InstructionDataset`` tokenizes one.

    Prompt and responses are encoded separately, so the prompt's tokens are exactly the ones the
    instruction-tuned model was trained and is prompted with. Two kinds of record are left out with a
    warning naming them (``start`` is the first record's number in the file, so it names the file's
    record): one whose prompt alone fills ``max_length`` leaves no response to compare, and one whose
    ``chosen`` and ``rejected`` are the same text has nothing to prefer (its loss is ln 2 whatever the
    weights, its gradient zero; the book's file has six, records 122, 226, 400, 566, 628 and 676).
    """

    def __init__(self, records: Sequence[dict], tokenizer: Tokenizer, style: PromptStyle,
                 max_length: int | None = None, name: str = "data", start: int = 0) -> None:
        self.pairs: list[PreferencePair] = []
        too_long, same = [], []
        for i, record in enumerate(records):
            if same_answers(record):
                same.append(start + i)
                continue
            prompt = tokenizer.encode(style.prompt(record["instruction"], record.get("input") or ""))
            if max_length is not None and len(prompt) >= max_length:
                too_long.append((start + i, len(prompt)))
                continue
            self.pairs.append(PreferencePair(prompt, tokenizer.encode(record["chosen"]),
                                             tokenizer.encode(record["rejected"])))
        if too_long:
            shown = ", ".join(f"record {i} ({n} tokens)" for i, n in too_long[:5])
            more = f" and {len(too_long) - 5} more" if len(too_long) > 5 else ""
            log.warning("%s: left out %d pair(s) whose prompt fills the context of %d tokens: %s%s",
                        name, len(too_long), max_length, shown, more)
        if same:
            log.warning("%s: left out %d pair(s) whose 'chosen' and 'rejected' are the same text (nothing to "
                        "prefer): record %s", name, len(same), ", ".join(map(str, same)))
        if records and not self.pairs:
            why = (f"every prompt fills the context of {max_length} tokens; shorten the records or use a model with "
                   "a longer context") if too_long else ("every pair's 'chosen' and 'rejected' are the same text; "
                                                         "a preference pair needs two different answers")
            raise GptlabError(f"{name}: {why}")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> PreferencePair:
        return self.pairs[index]

    def set_reference(self, logps: torch.Tensor) -> None:
        """Attach the reference model's log-probabilities, (N, 2) as (chosen, rejected) per pair."""
        if tuple(logps.shape) != (len(self.pairs), 2):
            raise GptlabError(f"reference log-probabilities for {tuple(logps.shape)} pairs, but the data has "
                              f"{len(self.pairs)}; start the run over with --overwrite")
        self.pairs = [p._replace(reference=(float(c), float(r))) for p, (c, r) in zip(self.pairs, logps.tolist())]


def collate_preferences(batch: Sequence[PreferencePair], pad_id: int = 50256,
                        max_length: int | None = None) -> tuple[torch.Tensor, ...]:
    """``(inputs, targets)``, both (2B, T), plus ``reference`` (2B,) once the pairs carry it.

    Rows ``0..B-1`` are the chosen sequences and ``B..2B-1`` the rejected ones, padded to one width, so a
    single forward pass scores both. The targets are those of ``collate_instructions`` with the prompt
    masked: each response and the <|endoftext|> that closes it, as the instruction-tuned model learned
    them; padding and prompt are ``IGNORE_INDEX``. Sequences are cut to ``max_length``.
    """
    rows = ([InstructionExample(p.prompt + p.chosen, len(p.prompt)) for p in batch]
            + [InstructionExample(p.prompt + p.rejected, len(p.prompt)) for p in batch])
    inputs, targets = collate_instructions(rows, pad_id=pad_id, ignore_index=IGNORE_INDEX, max_length=max_length,
                                           mask_prompt=True)  # (2B, T), (2B, T)
    if any(p.reference is None for p in batch):
        return inputs, targets
    reference = torch.tensor([p.reference[0] for p in batch] + [p.reference[1] for p in batch])  # (2B,)
    return inputs, targets, reference
