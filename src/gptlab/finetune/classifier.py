"""The classification fine-tuning stage: a GPT whose output head predicts one of ``num_classes`` labels.

The LLMs-from-scratch book's chapter 6 (SMS spam), generalised to any labelled CSV/TSV/JSONL file. The
stage only joins the pieces that live below it:

    gptlab.classification_data  reading the file, the stratified split, datasets and the padding collate
    gptlab.surgery              the classifier head and which parameters train
    gptlab.train                the training loop (checkpoints, resume, metrics.csv, loss.png)
    gptlab.classify             the prediction at the last real token; ``Classifier`` for a finished run
    gptlab.evaluate             accuracy, per-class precision/recall/F1, the confusion matrix

and writes ``accuracy.png``, ``evaluation.json`` and ``confusion_matrix.png`` into the run directory.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from gptlab.classification_data import (
    ClassificationDataset, LabeledTexts, PadCollate, Splits, pad_id_for, read_labeled_file, split_examples,
)
from gptlab import distributed
from gptlab.classify import STAGE, last_token_logits, predict_loader, predict_proba
from gptlab.config import ClassifierSettings, classifier_training
from gptlab.device import select_device
from gptlab.errors import GptlabError
from gptlab.evaluate import ClassificationReport, classification_report, plot_confusion_matrix
from gptlab.files import atomic_write_text
from gptlab.model import GPTModel
from gptlab.run import (
    ACCURACY_PLOT, CONFUSION_PLOT, EVALUATION_FILE, METRICS_FILE, fingerprint_record, prepare_out_dir, read_run_config, start_stage,
)
from gptlab.surgery import select_trainable
from gptlab.tokenizer import Tokenizer
from gptlab.train import MetricsLog, TrainConfig, TrainResult, train
from gptlab.weights import build_model, load_run

log = logging.getLogger("gptlab")

STAGE_FILES = (ACCURACY_PLOT, CONFUSION_PLOT, EVALUATION_FILE)  # gptlab.run.clear_run removes them on --overwrite


def classification_loss(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    ids, lengths, labels = batch
    return F.cross_entropy(last_token_logits(model, ids, lengths).float(), labels)


@dataclass
class ClassifierResult:
    train: TrainResult
    labels: list[str]
    reports: dict[str, ClassificationReport]  # train / val / test (those that have examples)
    left_out: dict | None  # examples dropped by balancing, classified by the trained model
    truncated: int
    max_length: int


@dataclass
class _Examples:
    """The file's texts as the stage uses them: labelled, split, tokenized and truncated."""

    table: LabeledTexts
    labels: list[str]  # the class names, sorted; a class index points into this list
    label_ids: list[int]
    splits: Splits
    encoded: list[list[int]]
    max_length: int
    truncated: int


def finetune_classifier(
    data: str | Path | None,
    out: str | Path,
    train_config: TrainConfig | dict | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **options,
) -> ClassifierResult:
    """Fine-tune a GPT to classify the texts of ``data`` and write the run directory ``out``.

    ``options`` are the fields of ``gptlab.config.ClassifierSettings`` with its defaults: ``init`` (start
    from this model: ``gpt2``, a run directory, an HF folder ...; otherwise a fresh ``preset``),
    ``trainable`` (head / last-block / all, or ``auto``: last-block from pretrained weights, all from
    scratch), ``padding``, ``split``, ``balance``, the columns, ... ``train_config`` defaults to
    ``classifier_training(init)``, what ``gptlab finetune-classifier`` uses (evaluated once per epoch).
    On ``resume`` the settings stored in the run are used, so the data and the split are the same; a given
    option that differs from them is an error (``gptlab.run.start_stage``), and ``data`` may be None.
    """
    if data is None and not resume:
        raise GptlabError("finetune-classifier: give the labelled texts to train on (--data FILE)")
    given = {**options, **({"data": str(data)} if data is not None else {})}
    start = start_stage("finetune-classifier", STAGE, ClassifierSettings, out, given, train_config,
                        lambda settings: classifier_training(settings.init, settings.lora), resume,
                        normalize=lambda settings: replace(settings, trainable=settings.resolved_trainable))
    settings, train_config = start.settings, start.train_config
    split_seed = start.previous.get(STAGE, {}).get("split_seed", train_config.seed)
    table, labels, label_ids = _read_labels(settings, out, resume)
    splits = split_examples(label_ids, labels, settings.split, settings.balance, split_seed, table.lines,
                            settings.data)
    out = prepare_out_dir(out, resume, overwrite)
    model, tokenizer = _classifier_model(settings, len(labels), out, resume, train_config.seed)
    n_trainable = select_trainable(model, settings.trainable)
    model.train()
    examples = _encode(table, labels, label_ids, splits, tokenizer, settings, model.config.context_length, progress)
    parts = _datasets(examples, settings.padding)
    _log_summary(settings, examples, parts, model, n_trainable)

    pad_id = pad_id_for(tokenizer)
    device = select_device(train_config.device)
    loaders = {name: DataLoader(ds, batch_size=train_config.batch_size, collate_fn=PadCollate(pad_id, ds.pad_to))
               for name, ds in parts.items()}

    def accuracy_columns(m: torch.nn.Module) -> dict[str, float]:
        row = {}
        for name in ("train", "val"):
            if len(parts[name]):
                true, pred = predict_loader(m, loaders[name], device, train_config.eval_batches)
                row[f"{name}_acc"] = sum(t == p for t, p in zip(true, pred)) / len(true)
        return row

    meta = {"stage": STAGE, "labels": labels, STAGE: {**asdict(settings), "split_seed": split_seed,
                                                       "requested_max_length": settings.max_length,
                                                       "max_length": examples.max_length, "pad_id": pad_id},
            **fingerprint_record(start, settings.data)}
    result = train(model, tokenizer, parts["train"], parts["val"] if len(parts["val"]) else None, out, train_config,
                   loss_fn=classification_loss, collate_fn=PadCollate(pad_id, parts["train"].pad_to),
                   eval_fn=accuracy_columns, meta=meta, resume=resume, progress=progress, overwrite=overwrite)
    if distributed.is_main():  # under torchrun rank 0 alone writes into the run
        _plot_accuracy(out, result.step)
    if result.interrupted:  # the user wants to stop: evaluate when the run is finished
        return ClassifierResult(result, labels, {}, None, examples.truncated, examples.max_length)

    reports = {name: classification_report(*predict_loader(model, loaders[name], device), labels)
               for name, ds in parts.items() if len(ds)}
    left_out = None
    if splits.left_out:
        left_out = _evaluate_left_out(model, tokenizer, examples, max(train_config.batch_size, 32), progress)
    if distributed.is_main():
        _write_evaluation(out, reports, left_out, examples, result.step)
    return ClassifierResult(result, labels, reports, left_out, examples.truncated, examples.max_length)


# ---- the steps of the stage ----------------------------------------------------------------------

def _read_labels(settings: ClassifierSettings, out, resume: bool) -> tuple[LabeledTexts, list[str], list[int]]:
    table = read_labeled_file(settings.data, settings.text_column, settings.label_column, settings.header)
    labels = sorted(set(table.labels))
    if resume and labels != read_run_config(out).get("labels"):
        raise GptlabError(f"{out}: the run was trained on labels {read_run_config(out).get('labels')}, "
                          f"{settings.data} now has {labels}")
    return table, labels, [labels.index(label) for label in table.labels]


def _classifier_model(settings: ClassifierSettings, num_classes: int, out: Path, resume: bool,
                      seed: int) -> tuple[GPTModel, Tokenizer]:
    """The run's model on ``resume``; otherwise the base (``init`` or a fresh preset) with a new head."""
    if resume:
        model, tokenizer, _ = load_run(out)
        return model, tokenizer
    torch.manual_seed(seed)  # random weights and the new head follow --seed, as in pretrain
    return build_model(settings.preset, settings.init, None, settings.model_overrides(), command="finetune-classifier",
                       drop_head=settings.drop_head, num_classes=num_classes, lora=settings.lora_config())


def _encode(table: LabeledTexts, labels: list[str], label_ids: list[int], splits: Splits, tokenizer: Tokenizer,
            settings: ClassifierSettings, context: int, progress: bool) -> _Examples:
    """Tokenize every text and truncate it to ``max_length`` (default: the longest training text)."""
    requested = settings.max_length
    if requested is not None and not 0 < requested <= context:
        raise GptlabError(f"max-length must be between 1 and the model's context length {context}, got {requested}")
    full = [tokenizer.encode(text) for text in tqdm(table.texts, desc="tokenizing", unit="text",
                                                     disable=not progress or len(table.texts) < 20000)]
    length = requested or min(context, max(len(full[i]) for i in splits.train))
    truncated = sum(len(seq) > length for seq in full)
    if truncated:
        log.warning("%s: truncated %d of %d texts to %d tokens (the longest has %d); --max-length changes the limit",
                    settings.data, truncated, len(full), length, max(map(len, full)))
    return _Examples(table, labels, label_ids, splits, [seq[:length] for seq in full], length, truncated)


def _datasets(examples: _Examples, padding: str) -> dict[str, ClassificationDataset]:
    """train / val / test, each padded as ``padding`` says: the batch's longest, the split's or max-length."""
    def dataset(indices: list[int]) -> ClassificationDataset:
        pad_to = {"batch": None, "max-length": examples.max_length,
                  "longest": max((len(examples.encoded[i]) for i in indices), default=0)}[padding]
        return ClassificationDataset([examples.encoded[i] for i in indices],
                                     [examples.label_ids[i] for i in indices], pad_to)

    s = examples.splits
    return {"train": dataset(s.train), "val": dataset(s.val), "test": dataset(s.test)}


def _log_summary(settings: ClassifierSettings, examples: _Examples, parts: dict, model: GPTModel,
                 n_trainable: int) -> None:
    labels = examples.labels
    counts = {name: dict(sorted(Counter(labels[y] for y in ds.labels).items())) for name, ds in parts.items()}
    left_out = examples.splits.left_out
    log.info("%s: %d examples, labels %s; train %s, val %s, test %s%s; max length %d tokens; model %.2fM parameters "
             "(%s trainable: %s)", settings.data, len(examples.table.texts), labels, counts["train"], counts["val"],
             counts["test"], f", {len(left_out)} left out by balancing" if left_out else "", examples.max_length,
             model.num_parameters() / 1e6, f"{n_trainable:,}", settings.trainable)


def _plot_accuracy(out: Path, step: int) -> None:
    metrics = MetricsLog(out / METRICS_FILE, step)
    if metrics.rows:
        metrics.plot(out / ACCURACY_PLOT, f"{out.name}: accuracy", columns=(("train_acc", "train"), ("val_acc", "validation")),
                     x="epoch", ylabel="accuracy")


def _write_evaluation(out: Path, reports: dict[str, ClassificationReport], left_out: dict | None,
                      examples: _Examples, step: int) -> None:
    if "test" in reports:
        plot_confusion_matrix(reports["test"], out / CONFUSION_PLOT, title=f"{out.name}: test set")
    evaluation = {name: r.to_dict() for name, r in reports.items()}
    evaluation.update(left_out=left_out, max_length=examples.max_length, truncated=examples.truncated, step=step)
    atomic_write_text(out / EVALUATION_FILE, json.dumps(evaluation, indent=2) + "\n")


def _evaluate_left_out(model: GPTModel, tokenizer: Tokenizer, examples: _Examples, batch_size: int,
                       progress: bool) -> dict:
    """How the examples that balancing dropped are classified; for two classes, the false-positive rate.

    The positive class is the rarer one in the whole file (spam in the SMS data): balancing drops only
    examples of the commoner class, so every positive prediction among them is a false positive.
    """
    labels, indices = examples.labels, examples.splits.left_out
    true = [examples.label_ids[i] for i in indices]
    probs = predict_proba(model, tokenizer, [examples.table.texts[i] for i in indices], examples.max_length,
                          batch_size, progress)
    pred = probs.argmax(-1).tolist()
    report = classification_report(true, pred, labels)
    summary = {"n": len(true), "accuracy": report.accuracy,
               "counts": {labels[c]: n for c, n in sorted(Counter(true).items())},
               "predicted": {labels[c]: n for c, n in sorted(Counter(pred).items())}, "confusion": report.confusion}
    if len(labels) == 2:
        positive = min(range(2), key=lambda c: examples.label_ids.count(c))
        negatives = [p for t, p in zip(true, pred) if t != positive]
        if negatives:
            summary.update(positive=labels[positive],
                           false_positive_rate=sum(p == positive for p in negatives) / len(negatives))
    return summary
