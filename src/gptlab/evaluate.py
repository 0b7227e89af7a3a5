"""Evaluating fine-tuned models.

Each stage's metrics live in their own section below; they share nothing but this file.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.run import atomic_write

# ==== classification: accuracy, per-class precision/recall/F1, confusion matrix =================


def confusion_matrix(true: Sequence[int], pred: Sequence[int], num_classes: int) -> list[list[int]]:
    """``matrix[t][p]`` counts examples of true class ``t`` predicted as ``p`` (rows: truth, columns: prediction)."""
    if len(true) != len(pred):
        raise GptlabError(f"{len(true)} true labels but {len(pred)} predictions")
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for t, p in zip(true, pred):
        if not (0 <= t < num_classes and 0 <= p < num_classes):
            raise GptlabError(f"class index out of range 0..{num_classes - 1}: true {t}, predicted {p}")
        matrix[t][p] += 1
    return matrix


@dataclass
class ClassMetrics:
    label: str
    precision: float
    recall: float
    f1: float
    support: int  # true examples of this class


@dataclass
class ClassificationReport:
    labels: list[str]
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    accuracy: float
    per_class: list[ClassMetrics]

    @property
    def total(self) -> int:
        return sum(map(sum, self.confusion))

    @property
    def macro_f1(self) -> float:
        return sum(c.f1 for c in self.per_class) / len(self.per_class)

    def to_dict(self) -> dict:
        return {
            "n": self.total, "accuracy": self.accuracy, "macro_f1": self.macro_f1, "labels": self.labels,
            "confusion": self.confusion,
            "per_class": {c.label: {"precision": c.precision, "recall": c.recall, "f1": c.f1, "support": c.support}
                          for c in self.per_class},
        }

    def format(self) -> str:
        """Per-class table and confusion matrix as aligned text."""
        width = max(9, *(len(label) for label in self.labels))
        lines = [f"accuracy {self.accuracy:.2%} ({sum(self.confusion[i][i] for i in range(len(self.labels)))}"
                 f"/{self.total}), macro F1 {self.macro_f1:.4f}",
                 f"{'class':<{width}}  precision  recall     f1  support"]
        for c in self.per_class:
            lines.append(f"{c.label:<{width}}  {c.precision:9.4f}  {c.recall:6.4f}  {c.f1:5.4f}  {c.support:7d}")
        cell = max(6, width, *(len(str(v)) for row in self.confusion for v in row))
        lines.append("confusion matrix (rows: true, columns: predicted)")
        lines.append(" " * (width + 2) + "".join(f"{label:>{cell + 1}}" for label in self.labels))
        for label, row in zip(self.labels, self.confusion):
            lines.append(f"{label:<{width}}  " + "".join(f"{v:>{cell + 1}}" for v in row))
        return "\n".join(lines)


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0  # scikit-learn's zero_division=0 convention


def classification_report(true: Sequence[int], pred: Sequence[int], labels: Sequence[str]) -> ClassificationReport:
    """Accuracy and per-class precision, recall and F1 of predictions ``pred`` against ``true`` (class indices)."""
    if not true:
        raise GptlabError("no examples to evaluate")
    k = len(labels)
    matrix = confusion_matrix(true, pred, k)
    per_class = []
    for c in range(k):
        tp = matrix[c][c]
        predicted = sum(matrix[t][c] for t in range(k))
        actual = sum(matrix[c])
        precision, recall = _ratio(tp, predicted), _ratio(tp, actual)
        f1 = _ratio(2 * tp, predicted + actual)  # = 2PR / (P + R), defined as 0 when both are 0
        per_class.append(ClassMetrics(labels[c], precision, recall, f1, actual))
    accuracy = sum(matrix[c][c] for c in range(k)) / len(true)
    return ClassificationReport(list(labels), matrix, accuracy, per_class)


def plot_confusion_matrix(report: ClassificationReport, path: str | Path, title: str = "confusion matrix") -> None:
    """The confusion matrix as a PNG heat map, counts in the cells, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(report.labels)
    size = 2.5 + 0.6 * k
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=110)
    image = ax.imshow(report.confusion, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(k), report.labels, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax.set_yticks(range(k), report.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\naccuracy {report.accuracy:.2%}")
    peak = max(max(row) for row in report.confusion) or 1
    for t in range(k):
        for p in range(k):
            value = report.confusion[t][p]
            ax.text(p, t, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


# ==== end of classification ======================================================================
