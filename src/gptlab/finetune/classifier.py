"""Classification fine-tuning: a GPT whose output head predicts one of ``num_classes`` labels.

The LLMs-from-scratch book's chapter 6 (SMS spam), generalised to any labelled CSV/TSV/JSONL file:

    read_labeled_file    text + label columns, with one clear error per kind of bad input
    split_examples       optional down-sampling to the smallest class, seeded stratified train/val/test split
    add_classifier_head  ``lm_head`` becomes ``Linear(n_embd, num_classes)``; ``gptlab.run.load_run`` rebuilds it
    select_trainable     which parameters train: the one place later methods (LoRA) join
    last_token_logits    the prediction reads the last *real* token, so padding never changes it
                         (the book reads position -1, which is a pad token in a padded batch)
    finetune_classifier  the stage: data -> ``gptlab.train.train`` -> evaluation files in the run directory
    Classifier           a trained run, loaded for ``gptlab classify``

With causal attention a token only sees tokens before it, so pads appended after the text cannot reach
the last real token's hidden state: the logits are the same whatever the amount of padding.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from gptlab.data import read_text
from gptlab.errors import GptlabError
from gptlab.evaluate import ClassificationReport, classification_report, plot_confusion_matrix
from gptlab.model import GPTModel
from gptlab.files import atomic_write_text
from gptlab.run import METRICS_FILE, load_run, prepare_out_dir, read_run_config
from gptlab.weights import build_model
from gptlab.tokenizer import Tokenizer
from gptlab.device import select_device, to_device
from gptlab.train import MetricsLog, TrainConfig, TrainResult, train

log = logging.getLogger("gptlab")

STAGE = "classifier"
PADDING = ("batch", "longest", "max-length")
DEFAULT_SPLIT = (0.7, 0.1, 0.2)
# From random weights the smallest preset is enough (97% on the balanced SMS test split, README) and trains
# in minutes on two CPU cores; larger ones overfit the ~1,000 training messages no better and train slower.
DEFAULT_PRESET = "tiny"
ACCURACY_PLOT = "accuracy.png"
CONFUSION_PLOT = "confusion_matrix.png"
EVALUATION_FILE = "evaluation.json"
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
    path: str | Path, text_column: str = "text", label_column: str = "label", header: str = "auto",
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
    raw = read_text(path)
    if path.suffix.lower() in JSON_SUFFIXES:
        records = _json_records(raw, path)
        texts, labels, lines = _from_records(records, path, text_column, label_column, require_labels)
    else:
        texts, labels, lines = _from_table(raw, path, text_column, label_column, header, require_labels)
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


def _json_records(raw: str, path: Path) -> list[tuple[int, dict]]:
    stripped = raw.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as e:
            raise GptlabError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        records = [(i + 1, item) for i, item in enumerate(items)]  # "line" = record number for a JSON array
    else:
        records = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise GptlabError(f"{path} line {n}: invalid JSON ({e.msg}); one object per line is expected") from None
    for n, item in records:
        if not isinstance(item, dict):
            raise GptlabError(f"{path} line {n}: expected a JSON object with text and label keys, got {type(item).__name__}")
    if not records:
        raise GptlabError(f"{path}: no records")
    return records


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


def _from_table(raw, path, text_column, label_column, header, require_labels):
    suffix = path.suffix.lower()
    raw = raw.lstrip("\ufeff")
    first_line = next(line for line in raw.splitlines() if line.strip())
    delimiter = TABLE_SUFFIXES.get(suffix) or ("\t" if "\t" in first_line else ",")
    other = "," if delimiter == "\t" else "\t"
    # Tab-separated data (the SMS Spam Collection) has quotes inside texts: read them literally.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(raw, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    rows, previous = [], 0
    try:
        for row in reader:  # a quoted text may span lines: number a row by its first
            if row:
                rows.append((previous + 1, row))
            previous = reader.line_num
    except csv.Error as e:
        raise GptlabError(f"{path} line {reader.line_num}: {e}") from None
    first = rows[0][1]
    named = text_column in first or label_column in first
    positional = _is_position(text_column) and _is_position(label_column)
    if header == "auto":
        has_header = named or (suffix in TABLE_SUFFIXES and not positional)
    else:
        has_header = header == "yes"
    columns = first if has_header else [str(i) for i in range(len(first))]
    width = len(columns)
    for line, row in rows:
        if len(row) != width:
            hint = (f"it contains {_delimiter_name(other)} where the rest of the file uses {_delimiter_name(delimiter)}: "
                    "mixed delimiters; use one throughout" if any(other in cell for cell in row)
                    else f"check for a stray or missing {_delimiter_name(delimiter)}")
            raise GptlabError(f"{path} line {line}: {len(row)} field(s) where the first row has {width}; {hint}")
    if has_header:
        rows = rows[1:]
        if not rows:
            raise GptlabError(f"{path}: a header row but no data")
    defaults = text_column == "text" and label_column == "label"
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


def split_examples(labels: Sequence[int], label_names: Sequence[str], split: Sequence[float] = DEFAULT_SPLIT,
                   balance: bool = False, seed: int = 123, lines: Sequence[int] | None = None,
                   source: str = "data") -> Splits:
    """Seeded stratified split: each class is shuffled and cut in the same proportions.

    ``balance`` first down-samples every class to the size of the smallest (the book's 747 ham / 747 spam).
    """
    f_train, f_val, f_test = check_fractions(split)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    if len(by_class) < 2:
        only = label_names[next(iter(by_class))] if by_class else "none"
        raise GptlabError(f"{source}: only one class ({only!r}); a classifier needs examples of at least two labels")
    for c, members in sorted(by_class.items()):
        if len(members) < 2:
            where = f" (line {lines[members[0]]})" if lines is not None else ""
            raise GptlabError(f"{source}: label {label_names[c]!r} has only 1 example{where}; a stratified split "
                              "needs at least 2 per label: add examples or remove that label")
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


# ---- the model ----------------------------------------------------------------------------------

def add_classifier_head(model: GPTModel, num_classes: int) -> GPTModel:
    """Replace the vocabulary head with ``Linear(n_embd, num_classes)`` (untying it from ``wte``)."""
    if num_classes < 2:
        raise GptlabError(f"a classifier needs at least 2 classes, got {num_classes}")
    device = model.wte.weight.device
    model.lm_head = torch.nn.Linear(model.config.n_embd, num_classes).to(device)
    return model


def _train_head_last_block(model: GPTModel) -> None:
    model.h[-1].requires_grad_(True)
    model.ln_f.requires_grad_(True)


# What "which" may be; a later method (LoRA) adds its entry here and is selectable everywhere.
TRAINABLE_PARTS = {
    "head": lambda model: None,
    "last-block": _train_head_last_block,  # the book's choice: last block + final norm + head
    "all": lambda model: model.requires_grad_(True),
}


def select_trainable(model: GPTModel, which: str) -> int:
    """Freeze everything, then unfreeze ``which`` (head / last-block / all) and the output head; returns the count."""
    if which not in TRAINABLE_PARTS:
        raise GptlabError(f"unknown trainable part {which!r}; choose one of: {', '.join(TRAINABLE_PARTS)}")
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)
    TRAINABLE_PARTS[which](model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def last_token_logits(model: torch.nn.Module, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Class logits (B, K) read at each sequence's last real token; ``ids`` (B, T) is right-padded."""
    logits = model(ids)  # (B, T, K): the head is K wide, so computing it everywhere costs next to nothing
    return logits[torch.arange(ids.size(0), device=ids.device), lengths - 1]  # (B, K)


def classification_loss(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    ids, lengths, labels = batch
    return F.cross_entropy(last_token_logits(model, ids, lengths).float(), labels)


# ---- datasets -----------------------------------------------------------------------------------

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
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        for row, (seq, _) in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        lengths = torch.tensor([len(seq) for seq, _ in batch], dtype=torch.long)
        labels = torch.tensor([label for _, label in batch], dtype=torch.long)
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


@torch.no_grad()
def predict_loader(model: torch.nn.Module, loader: DataLoader, device: torch.device,
                   max_batches: int | None = None) -> tuple[list[int], list[int]]:
    """(true, predicted) class indices over ``loader``, in eval mode."""
    was_training = model.training
    model.eval()
    true, pred = [], []
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        ids, lengths, labels = to_device(batch, device)
        pred += last_token_logits(model, ids, lengths).argmax(-1).tolist()
        true += labels.tolist()
    model.train(was_training)
    return true, pred


# ---- inference ----------------------------------------------------------------------------------

@torch.no_grad()
def predict_proba(model: GPTModel, tokenizer: Tokenizer, texts: Sequence[str], max_length: int,
                  batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """Class probabilities (N, K) for ``texts``, batched by length (padding does not change the result)."""
    model.eval()
    device = model.wte.weight.device
    ids, truncated = encode_texts(tokenizer, texts, max_length)
    if truncated:
        log.warning("truncated %d of %d text(s) to the model's %d tokens", truncated, len(texts), max_length)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    collate = PadCollate(pad_id_for(tokenizer))
    probs = torch.empty(len(ids), model.lm_head.out_features)
    for start in tqdm(range(0, len(order), batch_size), desc="classifying", unit="batch",
                      disable=not progress or len(order) <= batch_size):
        chunk = order[start : start + batch_size]
        batch_ids, lengths, _ = collate([(ids[i], 0) for i in chunk])
        logits = last_token_logits(model, batch_ids.to(device), lengths.to(device))
        probs[chunk] = torch.softmax(logits.float(), dim=-1).cpu()
    return probs


@dataclass
class Prediction:
    label: str
    probability: float
    probabilities: dict[str, float]


class Classifier:
    """A trained classifier run: ``Classifier.load(run).predict(["text", ...])``."""

    def __init__(self, model: GPTModel, tokenizer: Tokenizer, labels: list[str], max_length: int) -> None:
        self.model, self.tokenizer, self.labels, self.max_length = model, tokenizer, labels, max_length

    @classmethod
    def load(cls, run_dir: str | Path, device: str | torch.device = "cpu") -> "Classifier":
        config = read_run_config(run_dir)
        if config.get("stage") != STAGE or "labels" not in config:
            raise GptlabError(f"{run_dir}: not a classifier run (stage {config.get('stage')!r}); "
                              "train one with `gptlab finetune-classifier`")
        model, tokenizer, config = load_run(run_dir, device=device)
        labels = list(config["labels"])
        if model.lm_head.out_features != len(labels):
            raise GptlabError(f"{run_dir}: the head predicts {model.lm_head.out_features} classes but config.json "
                              f"lists {len(labels)} labels; the run is damaged, train it again")
        return cls(model, tokenizer, labels, int(config[STAGE]["max_length"]))

    def predict_proba(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        return predict_proba(self.model, self.tokenizer, texts, self.max_length, batch_size, progress)

    def predict(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> list[Prediction]:
        probs = self.predict_proba(texts, batch_size, progress)
        out = []
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            out.append(Prediction(self.labels[best], row[best], dict(zip(self.labels, row))))
        return out


# ---- classifying a file ------------------------------------------------------------------------

def classify_file(classifier: Classifier, input_path: str | Path, output_path: str | Path | None = None,
                  text_column: str = "text", label_column: str = "label", header: str = "auto",
                  batch_size: int = 32) -> ClassificationReport | None:
    """Classify every text of ``input_path`` (``.txt``: one per line; else a table or JSONL) into ``output_path``.

    Output by suffix: ``.jsonl`` (one object per text), ``.csv``, anything else tab-separated; standard output
    (tab-separated) when ``output_path`` is None. Returns a report when the input has a label column.
    """
    input_path = Path(input_path)
    if input_path.suffix.lower() == ".txt":
        if not input_path.is_file():
            raise GptlabError(f"{input_path}: no such file")
        texts = [line for line in input_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise GptlabError(f"{input_path}: no texts (the file is empty)")
        table = LabeledTexts(texts, None, [], str(input_path))
    else:
        table = read_labeled_file(input_path, text_column, label_column, header, require_labels=False)
    probs = classifier.predict_proba(table.texts, batch_size, progress=True)
    best = probs.argmax(-1).tolist()
    rows = []
    for i, text in enumerate(table.texts):
        row = {"text": text, "label": classifier.labels[best[i]], "probability": round(probs[i, best[i]].item(), 6)}
        if table.labels is not None:
            row["true_label"] = table.labels[i]
        row.update({f"p_{label}": round(p, 6) for label, p in zip(classifier.labels, probs[i].tolist())})
        rows.append(row)
    suffix = Path(output_path).suffix.lower() if output_path else ""
    if suffix == ".jsonl":
        content = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), delimiter="," if suffix == ".csv" else "\t",
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        content = buf.getvalue()
    if output_path:
        atomic_write_text(output_path, content)
    else:
        sys.stdout.write(content)
    if table.labels is None:
        return None
    unknown = sorted(set(table.labels) - set(classifier.labels))
    if unknown:
        log.warning("%s: label(s) %s are not among the model's %s; no evaluation", input_path, unknown, classifier.labels)
        return None
    true = [classifier.labels.index(label) for label in table.labels]
    return classification_report(true, best, classifier.labels)


def stage_defaults(init: str | None) -> dict:
    """Training defaults: the book's for a pretrained start, the README's measured recipe for random weights."""
    if init is not None:
        return {"epochs": 5.0, "lr": 5e-5, "batch_size": 8}
    return {"epochs": 5.0, "lr": 3e-3, "batch_size": 16}


# ---- the stage ----------------------------------------------------------------------------------

@dataclass
class ClassifierResult:
    train: TrainResult
    labels: list[str]
    reports: dict[str, ClassificationReport]  # train / val / test (those that have examples)
    left_out: dict | None  # examples dropped by balancing, classified by the trained model
    truncated: int
    max_length: int


def _resolve_trainable(trainable: str, init: str | None) -> str:
    if trainable == "auto":
        return "last-block" if init is not None else "all"
    return trainable


def finetune_classifier(
    data: str | Path,
    out: str | Path,
    init: str | None = None,
    preset: str = DEFAULT_PRESET,
    train_config: TrainConfig | None = None,
    text_column: str = "text",
    label_column: str = "label",
    header: str = "auto",
    balance: bool = False,
    split: Sequence[float] = DEFAULT_SPLIT,
    max_length: int | None = None,
    padding: str = "batch",
    trainable: str = "auto",
    context_length: int | None = None,
    dropout: float | None = None,
    eval_each_epoch: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> ClassifierResult:
    """Fine-tune a GPT to classify the texts of ``data`` and write the run directory ``out``.

    ``init``: start from this model (``gpt2``, a run directory, an HF folder ...); otherwise a fresh ``preset``.
    ``trainable``: head / last-block / all, or ``auto`` (last-block from pretrained weights, all from scratch).
    ``padding``: ``batch`` (to the batch's longest), ``longest`` (to the longest text: the book) or ``max-length``.
    ``eval_each_epoch``: evaluate (and checkpoint) once per epoch instead of every ``eval_interval`` steps.
    On ``resume`` the data settings stored in the run are used, so the split is the same.
    """
    train_config = train_config or TrainConfig(**stage_defaults(init))
    settings = dict(data=str(data), text_column=text_column, label_column=label_column, header=header,
                    balance=balance, split=list(split), split_seed=train_config.seed, max_length=max_length,
                    padding=padding, trainable=_resolve_trainable(trainable, init), init=init,
                    preset=None if init is not None else preset)
    if resume:
        stored = read_run_config(out).get(STAGE)
        if stored is None:
            raise GptlabError(f"{out}: not a classifier run; cannot resume it with finetune-classifier")
        settings = {**stored, "max_length": stored.get("requested_max_length")}
    if settings["padding"] not in PADDING:
        raise GptlabError(f"padding must be one of {', '.join(PADDING)}; got {settings['padding']!r}")
    if settings["trainable"] not in TRAINABLE_PARTS:
        raise GptlabError(f"trainable must be auto or one of {', '.join(TRAINABLE_PARTS)}; got {settings['trainable']!r}")

    table = read_labeled_file(settings["data"], settings["text_column"], settings["label_column"], settings["header"])
    labels = sorted(set(table.labels))
    if resume and labels != read_run_config(out).get("labels"):
        raise GptlabError(f"{out}: the run was trained on labels {read_run_config(out).get('labels')}, "
                          f"{settings['data']} now has {labels}")
    label_ids = [labels.index(label) for label in table.labels]
    splits = split_examples(label_ids, labels, settings["split"], settings["balance"], settings["split_seed"],
                            table.lines, settings["data"])

    out = prepare_out_dir(out, resume, overwrite)
    if overwrite and not resume:
        for name in (ACCURACY_PLOT, CONFUSION_PLOT, EVALUATION_FILE):
            (out / name).unlink(missing_ok=True)
    if resume:
        model, tokenizer, _ = load_run(out)
    else:
        model, tokenizer = build_model(settings["preset"] or DEFAULT_PRESET, settings["init"], None,
                                       {"context_length": context_length, "dropout": dropout})
        torch.manual_seed(train_config.seed)  # the head's initial weights
        add_classifier_head(model, len(labels))
    n_trainable = select_trainable(model, settings["trainable"])
    model.train()

    context = model.config.context_length
    requested = settings["max_length"]
    if requested is not None and not 0 < requested <= context:
        raise GptlabError(f"max-length must be between 1 and the model's context length {context}, got {requested}")
    full = [tokenizer.encode(text) for text in tqdm(table.texts, desc="tokenizing", unit="text",
                                                     disable=not progress or len(table.texts) < 20000)]
    length = requested or min(context, max(len(full[i]) for i in splits.train))
    truncated = sum(len(seq) > length for seq in full)
    if truncated:
        log.warning("%s: truncated %d of %d texts to %d tokens (the longest has %d); --max-length changes the limit",
                    settings["data"], truncated, len(full), length, max(map(len, full)))
    encoded = [seq[:length] for seq in full]

    def dataset(indices: list[int]) -> ClassificationDataset:
        pad_to = {"batch": None, "max-length": length,
                  "longest": max((len(encoded[i]) for i in indices), default=0)}[settings["padding"]]
        return ClassificationDataset([encoded[i] for i in indices], [label_ids[i] for i in indices], pad_to)

    parts = {"train": dataset(splits.train), "val": dataset(splits.val), "test": dataset(splits.test)}
    counts = {name: dict(sorted(Counter(labels[y] for y in ds.labels).items())) for name, ds in parts.items()}
    log.info("%s: %d examples, labels %s; train %s, val %s, test %s%s; max length %d tokens; model %.2fM parameters "
             "(%.2fM trainable: %s)", settings["data"], len(table.texts), labels, counts["train"], counts["val"],
             counts["test"], f", {len(splits.left_out)} left out by balancing" if splits.left_out else "", length,
             model.num_parameters() / 1e6, n_trainable / 1e6, settings["trainable"])

    pad_id = pad_id_for(tokenizer)
    loaders = {name: DataLoader(ds, batch_size=train_config.batch_size, collate_fn=PadCollate(pad_id, ds.pad_to))
               for name, ds in parts.items()}
    if eval_each_epoch:
        per_epoch = max(1, math.ceil(len(parts["train"]) / train_config.batch_size) // train_config.grad_accum)
        train_config = replace(train_config, eval_interval=per_epoch)

    def accuracy_columns(m: torch.nn.Module) -> dict[str, float]:
        row = {}
        for name in ("train", "val"):
            if len(parts[name]):
                true, pred = predict_loader(m, loaders[name], device, train_config.eval_batches)
                row[f"{name}_acc"] = sum(t == p for t, p in zip(true, pred)) / len(true)
        return row

    device = select_device(train_config.device)
    meta = {"stage": STAGE, "labels": labels, STAGE: {**settings, "requested_max_length": settings["max_length"],
                                                       "max_length": length, "pad_id": pad_id}}
    result = train(model, tokenizer, parts["train"], parts["val"] if len(parts["val"]) else None, out, train_config,
                   loss_fn=classification_loss, collate_fn=PadCollate(pad_id, parts["train"].pad_to),
                   eval_fn=accuracy_columns, meta=meta, resume=resume, progress=progress)
    metrics = MetricsLog(out / METRICS_FILE, result.step)
    if metrics.rows:
        metrics.plot(out / ACCURACY_PLOT, f"{out.name}: accuracy", columns=(("train_acc", "train"), ("val_acc", "validation")),
                     x="epoch", ylabel="accuracy")
    if result.interrupted:  # the user wants to stop: evaluate when the run is finished
        return ClassifierResult(result, labels, {}, None, truncated, length)

    reports = {}
    for name, ds in parts.items():
        if len(ds):
            true, pred = predict_loader(model, loaders[name], device)
            reports[name] = classification_report(true, pred, labels)
    left_out = None
    if splits.left_out:
        left_out = _evaluate_left_out(model, tokenizer, [table.texts[i] for i in splits.left_out],
                                      [label_ids[i] for i in splits.left_out], labels, length, label_ids,
                                      train_config.batch_size, progress)
    if "test" in reports:
        plot_confusion_matrix(reports["test"], out / CONFUSION_PLOT, title=f"{out.name}: test set")
    evaluation = {name: r.to_dict() for name, r in reports.items()}
    evaluation.update(left_out=left_out, max_length=length, truncated=truncated, step=result.step)
    atomic_write_text(out / EVALUATION_FILE, json.dumps(evaluation, indent=2) + "\n")
    return ClassifierResult(result, labels, reports, left_out, truncated, length)


def _evaluate_left_out(model, tokenizer, texts, true, labels, max_length, all_label_ids, batch_size, progress) -> dict:
    """How the examples that balancing dropped are classified; for two classes, the false-positive rate.

    The positive class is the rarer one in the whole file (spam in the SMS data): balancing drops only
    examples of the commoner class, so every positive prediction among them is a false positive.
    """
    probs = predict_proba(model, tokenizer, texts, max_length, max(batch_size, 32), progress)
    pred = probs.argmax(-1).tolist()
    report = classification_report(true, pred, labels)
    summary = {"n": len(true), "accuracy": report.accuracy,
               "counts": {labels[c]: n for c, n in sorted(Counter(true).items())},
               "predicted": {labels[c]: n for c, n in sorted(Counter(pred).items())}, "confusion": report.confusion}
    if len(labels) == 2:
        positive = min(range(2), key=lambda c: all_label_ids.count(c))
        negatives = [p for t, p in zip(true, pred) if t != positive]
        if negatives:
            summary.update(positive=labels[positive],
                           false_positive_rate=sum(p == positive for p in negatives) / len(negatives))
    return summary
