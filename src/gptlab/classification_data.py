"""Labelled texts for classification: reading them, splitting them, and batching them for the model.

    read_labeled_file      text + label columns of a CSV, TSV, JSONL or JSON file, one clear error per
                           kind of bad input (missing column, empty text, mixed delimiters, ...)
    split_examples         optional down-sampling to the smallest class, seeded stratified train/val/test split
    ClassificationDataset  token ids (already truncated) and class indices
    PadCollate             right-pads a batch and keeps each text's length, so the prediction reads the
                           last real token, not a pad
"""
from __future__ import annotations

import csv
import io
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from gptlab.config import ClassifierSettings, TrainConfig
from gptlab.errors import GptlabError
from gptlab.files import read_json_records, read_text
from gptlab.tokenizer import Tokenizer

log = logging.getLogger("gptlab")

TEXT_COLUMN, LABEL_COLUMN = ClassifierSettings.text_column, ClassifierSettings.label_column
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")


# ---- reading labelled text ----------------------------------------------------------------------

@dataclass
class LabeledTexts:
    texts: list[str]
    labels: list[str] | None  # None: the file has no label column (only allowed when not required)
    lines: list[int]  # the source line of each example, for messages
    source: str


def _delimiter_name(d: str) -> str:
    return "tab" if d == "\t" else repr(d)


def _is_position(ref: str) -> bool:
    return ref.isdigit()


def read_labeled_file(
    path: str | Path, text_column: str = TEXT_COLUMN, label_column: str = LABEL_COLUMN, header: str = "auto",
    require_labels: bool = True,
) -> LabeledTexts:
    """Texts and labels from a CSV, TSV (or tab-separated file without suffix), JSONL or JSON file.

    Columns are named (a header row / JSON keys) or given by 0-based position. ``header``: ``yes``, ``no`` or
    ``auto`` (a header when the first row names a column, or the file is .csv/.tsv; otherwise none).
    A headerless two-column file with the default column names is read as ``label, text`` (the SMS Spam
    Collection's layout). Tab-separated files are read without quote handling, so a quote in a text is text.
    """
    path = Path(path)
    if header not in ("auto", "yes", "no"):
        raise GptlabError(f"header must be auto, yes or no; got {header!r}")
    if path.suffix.lower() in JSON_SUFFIXES:
        records = read_json_records(path, what=f"an object with {text_column!r} and {label_column!r} keys")
        texts, labels, lines = _from_records(records, path, text_column, label_column, require_labels)
    else:
        texts, labels, lines = _from_table(read_text(path), path, text_column, label_column, header, require_labels)
    _check_filled(texts, lines, path, "text", text_column)
    if labels is not None:
        _check_filled(labels, lines, path, "label", label_column)
    return LabeledTexts(texts, labels, lines, str(path))


def _check_filled(values: list[str], lines: list[int], path: Path, what: str, column: str) -> None:
    empty = [line for value, line in zip(values, lines) if not value.strip()]
    if empty:
        shown = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
        raise GptlabError(f"{path}: {len(empty)} empty {what}(s) in column {column!r} at line(s) {shown}; "
                          f"fill them in or remove those rows")


def _from_records(records, path, text_column, label_column, require_labels):
    with_labels = require_labels or any(label_column in item for _, item in records)
    for n, item in records:
        for column, role, needed in ((text_column, "text", True), (label_column, "label", with_labels)):
            if needed and column not in item:
                raise GptlabError(f"{path} line {n}: no {role} key {column!r} (keys found: {', '.join(item) or 'none'}); "
                                  f"pass --{role}-column NAME")
    texts = [_as_text(item[text_column]) for _, item in records]
    labels = [_as_text(item[label_column]) for _, item in records] if with_labels else None
    return texts, labels, [n for n, _ in records]


def _as_text(value) -> str:
    return "" if value is None else value if isinstance(value, str) else json.dumps(value)


def _read_rows(raw: str, path: Path, delimiter: str) -> list[tuple[int, list[str]]]:
    """Non-empty rows, each with the line it starts on (a quoted text may span lines)."""
    # Tab-separated data (the SMS Spam Collection) has quotes inside texts: read them literally.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(raw, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    rows, previous = [], 0
    try:
        for row in reader:
            if row:
                rows.append((previous + 1, row))
            previous = reader.line_num
    except csv.Error as e:
        raise GptlabError(f"{path} line {reader.line_num}: {e}") from None
    return rows


def _check_widths(rows, path: Path, width: int, delimiter: str, other: str) -> None:
    for line, row in rows:
        if len(row) != width:
            hint = (f"it contains {_delimiter_name(other)} where the rest of the file uses {_delimiter_name(delimiter)}: "
                    "mixed delimiters; use one throughout" if any(other in cell for cell in row)
                    else f"check for a stray or missing {_delimiter_name(delimiter)}")
            raise GptlabError(f"{path} line {line}: {len(row)} field(s) where the first row has {width}; {hint}")


def _from_table(raw, path, text_column, label_column, header, require_labels):
    suffix = path.suffix.lower()
    raw = raw.lstrip("\ufeff")
    first_line = next(line for line in raw.splitlines() if line.strip())
    delimiter = TABLE_SUFFIXES.get(suffix) or ("\t" if "\t" in first_line else ",")
    other = "," if delimiter == "\t" else "\t"
    rows = _read_rows(raw, path, delimiter)
    first = rows[0][1]
    named = text_column in first or label_column in first
    positional = _is_position(text_column) and _is_position(label_column)
    if header == "auto":
        has_header = named or (suffix in TABLE_SUFFIXES and not positional)
    else:
        has_header = header == "yes"
    columns = first if has_header else [str(i) for i in range(len(first))]
    width = len(columns)
    _check_widths(rows, path, width, delimiter, other)
    if has_header:
        rows = rows[1:]
        if not rows:
            raise GptlabError(f"{path}: a header row but no data")
    defaults = text_column == TEXT_COLUMN and label_column == LABEL_COLUMN
    if not has_header and defaults and width in (1, 2):
        if width == 1 and require_labels:
            raise GptlabError(f"{path}: one column and no header row; a classifier needs a label column too")
        text_at, label_at = (1, 0) if width == 2 else (0, None)
        if width == 2:
            log.info("%s: no header row: reading the columns as label, text", path)
    else:
        text_at = _column_index(text_column, columns, has_header, path, "text", delimiter, other)
        label_at = None
        if require_labels or label_column in columns or (_is_position(label_column) and int(label_column) < width):
            label_at = _column_index(label_column, columns, has_header, path, "label", delimiter, other)
    texts = [row[text_at] for _, row in rows]
    labels = [row[label_at] for _, row in rows] if label_at is not None else None
    return texts, labels, [line for line, _ in rows]


def _column_index(ref, columns, has_header, path, role, delimiter, other) -> int:
    if has_header and ref in columns:
        return columns.index(ref)
    if _is_position(ref) and int(ref) < len(columns):
        return int(ref)
    found = ", ".join(repr(c) for c in columns) if has_header else f"{len(columns)} (positions 0-{len(columns) - 1}; no header row)"
    hint = ""
    if len(columns) == 1 and other in columns[0]:
        hint = f"; the file looks {_delimiter_name(other)}-separated, not {_delimiter_name(delimiter)}-separated"
    if has_header:
        hint += "; if the first row is data, not column names, pass --header no"
    raise GptlabError(f"{path}: no {role} column {ref!r} (columns found: {found}){hint}; pass --{role}-column NAME "
                      "or a 0-based position")


# ---- splitting ----------------------------------------------------------------------------------

@dataclass
class Splits:
    """Example indices into the file's rows, per part; ``left_out``: dropped by balancing."""

    train: list[int]
    val: list[int]
    test: list[int]
    left_out: list[int] = field(default_factory=list)


def check_fractions(split: Sequence[float]) -> tuple[float, float, float]:
    if len(split) != 3 or any(f < 0 for f in split) or abs(sum(split) - 1.0) > 1e-6 or split[0] <= 0:
        raise GptlabError(f"split must be three non-negative fractions train val test summing to 1 with train > 0, "
                          f"got {' '.join(map(str, split))}")
    return tuple(split)


def _check_classes(by_class: dict[int, list[int]], label_names, lines, source: str) -> None:
    if len(by_class) < 2:
        only = label_names[next(iter(by_class))] if by_class else "none"
        raise GptlabError(f"{source}: only one class ({only!r}); a classifier needs examples of at least two labels")
    for c, members in sorted(by_class.items()):
        if len(members) < 2:
            where = f" (line {lines[members[0]]})" if lines is not None else ""
            raise GptlabError(f"{source}: label {label_names[c]!r} has only 1 example{where}; a stratified split "
                              "needs at least 2 per label: add examples or remove that label")


def split_examples(labels: Sequence[int], label_names: Sequence[str], split: Sequence[float] = ClassifierSettings.split,
                   balance: bool = False, seed: int = TrainConfig.seed, lines: Sequence[int] | None = None,
                   source: str = "data") -> Splits:
    """Seeded stratified split: each class is shuffled and cut in the same proportions.

    ``balance`` first down-samples every class to the size of the smallest (the book's 747 ham / 747 spam).
    """
    f_train, f_val, f_test = check_fractions(split)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    _check_classes(by_class, label_names, lines, source)
    rng = random.Random(seed)
    result = Splits([], [], [])
    keep = min(len(m) for m in by_class.values()) if balance else None
    for c in sorted(by_class):
        members = list(by_class[c])
        rng.shuffle(members)
        if keep is not None:
            members, dropped = members[:keep], members[keep:]
            result.left_out.extend(sorted(dropped))
        n = len(members)
        n_test = max(1 if f_test > 0 else 0, round(n * f_test))
        n_val = max(0, min(round(n * f_val), n - n_test - 1))
        n_train = n - n_test - n_val
        result.train += members[:n_train]
        result.val += members[n_train:n_train + n_val]
        result.test += members[n_train + n_val:]
    for part in (result.train, result.val, result.test):
        rng.shuffle(part)
    return result


# ---- datasets and batches -----------------------------------------------------------------------

class ClassificationDataset(Dataset):
    """Token ids (already truncated) and class indices; ``pad_to`` fixes the padded length of every batch."""

    def __init__(self, ids: list[list[int]], labels: list[int], pad_to: int | None = None) -> None:
        self.ids, self.labels, self.pad_to = ids, labels, pad_to

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.ids[i], self.labels[i]


class PadCollate:
    """Right-pads a batch to ``pad_to`` (or its longest sequence): ``(ids (B, T), lengths (B,), labels (B,))``."""

    def __init__(self, pad_id: int, pad_to: int | None = None) -> None:
        self.pad_id, self.pad_to = pad_id, pad_to

    def __call__(self, batch: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max(self.pad_to or 0, max(len(ids) for ids, _ in batch))
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # (B, T)
        for row, (seq, _) in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        lengths = torch.tensor([len(seq) for seq, _ in batch], dtype=torch.long)  # (B,)
        labels = torch.tensor([label for _, label in batch], dtype=torch.long)  # (B,)
        return ids, lengths, labels


def pad_id_for(tokenizer: Tokenizer) -> int:
    # Pads are never attended to by real tokens (causal attention), so any valid id does; GPT-2's is <|endoftext|>.
    return tokenizer.eot_id if tokenizer.eot_id is not None else 0


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids truncated to ``max_length``; returns them and how many texts were truncated."""
    ids, truncated = [], 0
    for text in texts:
        seq = tokenizer.encode(text)
        if not seq:
            raise GptlabError(f"text {text!r} encodes to no tokens")
        truncated += len(seq) > max_length
        ids.append(seq[:max_length])
    return ids, truncated
