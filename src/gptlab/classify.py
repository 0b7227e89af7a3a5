"""Classifying with a trained classifier run: what ``gptlab classify`` and the server's /v1/classify use.

    last_token_logits  the prediction reads the last *real* token, so padding never changes it
                       (the book reads position -1, which is a pad token in a padded batch)
    predict_proba      class probabilities for texts, batched by length
    Classifier         a run loaded: ``Classifier.load(run).predict(["text", ...])``
    classify_file      every text of a file classified into another, with a report when it has labels

With causal attention a token only sees tokens before it, so pads appended after the text cannot reach
the last real token's hidden state: the logits are the same whatever the amount of padding.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from gptlab.classification_data import (
    LABEL_COLUMN, TEXT_COLUMN, LabeledTexts, PadCollate, encode_texts, pad_id_for, read_labeled_file,
)
from gptlab.config import QuantizeConfig
from gptlab.device import to_device
from gptlab.errors import GptlabError
from gptlab.evaluate import ClassificationReport, classification_report
from gptlab.files import atomic_write_text, read_text
from gptlab.model import GPTModel
from gptlab.run import check_output_path, read_run_config
from gptlab.weights import in_precision, load_run
from gptlab.tokenizer import Tokenizer

log = logging.getLogger("gptlab")

STAGE = "classifier"  # config.json's "stage" of a classifier run, and the key of its settings


def last_token_logits(model: torch.nn.Module, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Class logits (B, K) read at each sequence's last real token; ``ids`` (B, T) is right-padded."""
    logits = model(ids)  # (B, T, K): the head is K wide, so computing it everywhere costs next to nothing
    return logits[torch.arange(ids.size(0), device=ids.device), lengths - 1]  # (B, K)


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


@torch.no_grad()
def predict_proba(model: GPTModel, tokenizer: Tokenizer, texts: Sequence[str], max_length: int,
                  batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """Class probabilities (N, K) for ``texts``, batched by length (padding does not change the result)."""
    model.eval()
    device = model.wpe.weight.device
    ids, truncated = encode_texts(tokenizer, texts, max_length)
    if truncated:
        log.warning("truncated %d of %d text(s) to the model's %d tokens", truncated, len(texts), max_length)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: little padding
    collate = PadCollate(pad_id_for(tokenizer))
    probs = torch.empty(len(ids), model.lm_head.out_features)  # (N, K)
    for start in tqdm(range(0, len(order), batch_size), desc="classifying", unit="batch",
                      disable=not progress or len(order) <= batch_size):
        chunk = order[start : start + batch_size]
        batch_ids, lengths, _ = collate([(ids[i], 0) for i in chunk])
        logits = last_token_logits(model, batch_ids.to(device), lengths.to(device))  # (b, K)
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
        if model.lm_head.out_features != len(labels):
            raise GptlabError(f"the head predicts {model.lm_head.out_features} classes but {len(labels)} labels are "
                              "given; the run is damaged, train it again")
        self.model, self.tokenizer, self.labels, self.max_length = model, tokenizer, labels, max_length

    @classmethod
    def load(cls, run_dir: str | Path, device: str | torch.device = "cpu",
             quantize: QuantizeConfig | None = None, dtype: torch.dtype | None = None) -> "Classifier":
        """A classifier run on ``device``, quantized with ``quantize`` (``--quantize``) or its weights in ``dtype``
        (``--dtype``; None: as stored, float32)."""
        config = read_run_config(run_dir)
        if config.get("stage") != STAGE or "labels" not in config:
            raise GptlabError(f"{run_dir}: not a classifier run (stage {config.get('stage')!r}); "
                              "train one with `gptlab finetune-classifier`")
        model, tokenizer, config = load_run(run_dir, device=device)
        model = in_precision(model, device, quantize, dtype, run_dir)
        return cls(model, tokenizer, list(config["labels"]), int(config[STAGE]["max_length"]))

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
                  text_column: str = TEXT_COLUMN, label_column: str = LABEL_COLUMN, header: str = "auto",
                  batch_size: int = 32) -> ClassificationReport | None:
    """Classify every text of ``input_path`` (``.txt``: one per line; else a table or JSONL) into ``output_path``.

    Output by suffix: ``.jsonl`` (one object per text), ``.csv``, anything else tab-separated; standard output
    (tab-separated) when ``output_path`` is None. Returns a report when the input has a label column. The
    output is checked before any text is classified: writable, not the input, not a file of a run.
    """
    if output_path:
        check_output_path(output_path, [input_path])
    table = _read_texts(Path(input_path), text_column, label_column, header)
    probs = classifier.predict_proba(table.texts, batch_size, progress=True)  # (N, K)
    best = probs.argmax(-1).tolist()
    content = _format_rows(_rows(table, classifier.labels, probs, best), output_path)
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


def _read_texts(path: Path, text_column: str, label_column: str, header: str) -> LabeledTexts:
    if path.suffix.lower() == ".txt":
        texts = [line for line in read_text(path).splitlines() if line.strip()]
        return LabeledTexts(texts, None, [], str(path))
    return read_labeled_file(path, text_column, label_column, header, require_labels=False)


def _rows(table: LabeledTexts, labels: list[str], probs: torch.Tensor, best: list[int]) -> list[dict]:
    rows = []
    for i, text in enumerate(table.texts):
        row = {"text": text, "label": labels[best[i]], "probability": round(probs[i, best[i]].item(), 6)}
        if table.labels is not None:
            row["true_label"] = table.labels[i]
        row.update({f"p_{label}": round(p, 6) for label, p in zip(labels, probs[i].tolist())})
        rows.append(row)
    return rows


def _format_rows(rows: list[dict], output_path: str | Path | None) -> str:
    suffix = Path(output_path).suffix.lower() if output_path else ""
    if suffix == ".jsonl":
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), delimiter="," if suffix == ".csv" else "\t",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
