"""Evaluating fine-tuned models.

Each stage's metrics live in their own section below; they share nothing but this file.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import math
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from gptlab.config import JUDGE_BASE_URL, JUDGE_MAX_TOKENS, JUDGE_MODEL
from gptlab.errors import GptlabError
from gptlab.files import atomic_write_text, check_output_file
from gptlab.instruction_data import RESPONSE_KEY, load_instruction_records
from gptlab.plotting import new_figure, save_figure
from gptlab.prompts import ALPACA

log = logging.getLogger("gptlab")

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
    k = len(report.labels)
    size = 2.5 + 0.6 * k
    fig = new_figure(size + 1, size)
    ax = fig.add_subplot()
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
    save_figure(fig, path)


# ==== end of classification ======================================================================


# ==== instruction responses: ROUGE-L, exact match, LLM judge =====================================
# `gptlab judge` scores the answers `gptlab respond` wrote. The judge is any OpenAI-compatible
# chat-completions endpoint (Ollama, OpenAI, gptlab's own server), spoken to with the standard library.

# The default endpoint and judge model (Ollama's llama3, the book's) are gptlab.config.JUDGE_BASE_URL / JUDGE_MODEL.
JUDGE_SCORE_KEY = "judge_score"


def _words(text: str) -> list[str]:
    """Lower-cased runs of letters and digits: punctuation and spacing do not count (as in rouge-score)."""
    return re.findall(r"\w+", text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, one row of the dynamic-programming table at a time."""
    if len(b) > len(a):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # the table's value above-left of the cell being filled
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F-measure: 2PR / (P + R) with P = LCS / candidate words, R = LCS / reference words."""
    c, r = _words(candidate), _words(reference)
    if not c or not r:
        return float(c == r)  # both empty: a perfect match; one empty: nothing in common
    lcs = lcs_length(c, r)
    return 0.0 if lcs == 0 else 2 * lcs / (len(c) + len(r))  # = 2PR / (P + R)


def exact_match(candidate: str, reference: str) -> bool:
    """Equal once case, punctuation and spacing are ignored."""
    return _words(candidate) == _words(reference)


def _check_response_records(records: Sequence[dict], key: str, source: str) -> None:
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise GptlabError(f"{source}: record {i} is a {type(record).__name__}, not an object")
        for field in ("instruction", "output", key):
            if not isinstance(record.get(field), str):
                hint = " (run `gptlab respond` first, or name the answer's key with --key)" if field == key else ""
                raise GptlabError(f"{source}: record {i} has no string {field!r}{hint}")


def offline_scores(records: Sequence[dict], key: str = RESPONSE_KEY, source: str = "records") -> dict:
    """Mean ROUGE-L and exact-match rate of ``record[key]`` against ``record["output"]``; adds both per record."""
    _check_response_records(records, key, source)
    if not records:
        raise GptlabError(f"{source}: no records to score")
    for record in records:
        record["rouge_l"] = round(rouge_l(record[key], record["output"]), 4)
        record["exact_match"] = exact_match(record[key], record["output"])
    return {"n": len(records), "rouge_l": sum(r["rouge_l"] for r in records) / len(records),
            "exact_match": sum(r["exact_match"] for r in records) / len(records)}


def judge_prompt(record: dict, key: str = RESPONSE_KEY) -> str:
    """The book's judging prompt: the task (in the Alpaca layout), the reference, the answer, a 0-100 scale."""
    task = ALPACA.task(record["instruction"], record.get("input") or "")
    return (f"Given the input `{task}` and correct output `{record['output']}`, score the model response "
            f"`{record[key]}` on a scale from 0 to 100, where 100 is the best score. "
            "Respond with the integer number only.")


def parse_score(reply: str) -> int | None:
    """The first whole number in the judge's reply if it is 0..100 ("85", "Score: 85/100"), else None."""
    match = re.search(r"(?<![\d.])(\d{1,3})(?!\d|\.\d)", reply)
    if match is None or int(match.group(1)) > 100:
        return None
    return int(match.group(1))


class _Retryable(Exception):
    """A failure worth another try (timeout, dropped connection, HTTP 429 or 5xx)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class JudgeClient:
    """A minimal OpenAI-compatible chat-completions client: ``complete(prompt) -> reply text``.

    Timeouts, dropped connections, HTTP 429 and 5xx are retried ``retries`` times with exponential
    backoff (honouring ``Retry-After``); other HTTP errors (a wrong key or model name) fail at once. An
    endpoint that refuses the very first connection fails at once too, with one message saying how to
    start one, instead of a stack of retries.
    """

    def __init__(self, base_url: str = JUDGE_BASE_URL, model: str = JUDGE_MODEL, api_key: str | None = None,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 1.0, temperature: float | None = 0.0,
                 sleep: Callable[[float], None] = time.sleep, max_tokens: int | None = JUDGE_MAX_TOKENS) -> None:
        if not (math.isfinite(timeout) and timeout > 0):
            raise GptlabError(f"--timeout must be a positive number of seconds, got {timeout}")
        if retries < 0 or not (math.isfinite(backoff) and backoff >= 0):
            raise GptlabError(f"--retries must be >= 0 (and the backoff a finite number >= 0); got {retries}, {backoff}")
        if max_tokens is not None and max_tokens <= 0:
            raise GptlabError(f"--max-tokens must be positive, got {max_tokens}")
        check_base_url(base_url)
        self.base_url, self.model, self.api_key, self.max_tokens = base_url.rstrip("/"), model, api_key, max_tokens
        self.url = self.base_url + "/chat/completions"
        self.timeout, self.retries, self.backoff, self.temperature = timeout, retries, backoff, temperature
        self.sleep = sleep
        self.reached = False  # has the endpoint answered at all? (refused before that: not running)

    def complete(self, prompt: str) -> str:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "seed": 123}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        for attempt in range(self.retries + 1):
            try:
                return self._post(body)
            except _Retryable as e:
                if attempt == self.retries:
                    raise GptlabError(f"judge {self.url} failed {self.retries + 1} times, last: {e}; "
                                      "finished records are cached, run again to resume") from None
                delay = min(e.retry_after if e.retry_after is not None else self.backoff * 2 ** attempt, 60.0)
                log.warning("judge: %s; retrying in %.1f s (%d/%d)", e, delay, attempt + 1, self.retries)
                self.sleep(delay)
        raise AssertionError("unreachable")

    def _post(self, body: dict) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            self.reached = True
            message = _http_error_message(e)
            if e.code in (408, 409, 429) or e.code >= 500:
                raise _Retryable(f"HTTP {e.code}: {message}", _retry_after(e.headers.get("Retry-After"))) from None
            hint = {401: "; set the key with --api-key or OPENAI_API_KEY",
                    403: "; the key may lack access to this model",
                    404: f"; check --base-url (it usually ends in /v1) and that model {self.model!r} exists "
                         f"(Ollama: `ollama pull {self.model}`)"}.get(e.code, "")
            raise GptlabError(f"judge {self.url} answered HTTP {e.code}: {message}{hint}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"no reply within {self.timeout:g} s") from None
            if not self.reached and isinstance(reason, (ConnectionRefusedError, socket.gaierror)):
                raise GptlabError(
                    f"cannot reach the judge at {self.base_url} ({reason}); start one (Ollama: `ollama serve` "
                    f"and `ollama pull {self.model}`) or point --base-url / GPTLAB_JUDGE_BASE_URL at a running "
                    "OpenAI-compatible server") from None
            raise _Retryable(f"{type(reason).__name__}: {reason}") from None
        self.reached = True
        try:
            return json.loads(raw)["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable(f"not a chat completion: {raw[:120]!r}") from None


def check_base_url(url: str) -> None:
    """An http(s) URL with a host, such as http://localhost:11434/v1; anything else is one clear line."""
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port  # noqa: B018  (a port that is not a number raises here)
    except ValueError:
        parts = parts._replace(netloc="")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise GptlabError(f"--base-url {url!r} is not an http(s) URL with a host; give the endpoint's base, e.g. "
                          f"{JUDGE_BASE_URL} (Ollama) or https://api.openai.com/v1")


def _http_error_message(error: urllib.error.HTTPError) -> str:
    try:
        body = error.read().decode("utf-8", "replace")
    except OSError:
        return error.reason or ""
    try:
        detail = json.loads(body).get("error", body)
        return str(detail.get("message", detail) if isinstance(detail, dict) else detail)[:200]
    except (ValueError, AttributeError):
        return body.strip()[:200] or str(error.reason)


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to the backoff


class JudgeCache:
    """Judged records, one JSON line each, appended as they come, so an interrupted run resumes.

    Keyed by a hash of the judge model and the prompt: a changed answer or another judge is asked
    again. A line cut short by a kill is skipped when reading.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        self._needs_newline = False
        if self.path.is_file():
            text = self.path.read_text(encoding="utf-8", errors="replace")
            self._needs_newline = bool(text) and not text.endswith("\n")
            for line in text.splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry
                except (ValueError, KeyError, TypeError):
                    continue

    @staticmethod
    def key(model: str, prompt: str) -> str:
        return hashlib.sha256(f"{model}\n{prompt}".encode()).hexdigest()[:24]

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def add(self, entry: dict) -> None:
        self.entries[entry["key"]] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            if self._needs_newline:
                f.write("\n")
                self._needs_newline = False
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
            f.flush()


def judge_records(records: Sequence[dict], client: JudgeClient, cache: JudgeCache, key: str = RESPONSE_KEY,
                  source: str = "records", progress: bool = True) -> list[dict]:
    """Each record with ``judge_score`` (0..100, or None when the reply held no score) added.

    Records already in ``cache`` are not sent again; each new score is cached as soon as it arrives.
    """
    _check_response_records(records, key, source)
    judged, asked = [], 0
    for i, record in enumerate(tqdm(records, desc="judging", unit="record", disable=not progress, dynamic_ncols=True)):
        prompt = judge_prompt(record, key)
        cache_key = JudgeCache.key(client.model, prompt)
        entry = cache.get(cache_key)
        if entry is None:
            reply = client.complete(prompt)
            asked += 1
            score = parse_score(reply)
            if score is None:
                # not cached, so the next run asks again
                log.warning("record %d: no score 0-100 in the judge's reply %r; left unscored", i, reply[:80])
            else:
                entry = {"key": cache_key, "index": i, "score": score, "reply": reply}
                cache.add(entry)
        judged.append({**record, JUDGE_SCORE_KEY: entry["score"] if entry else None})
    log.info("judge: %d record(s) asked, %d from the cache %s", asked, len(records) - asked, cache.path)
    return judged


def score_histogram(scores: Sequence[float], bins: int = 10, top: float = 100.0) -> list[int]:
    """Counts in ``bins`` equal ranges of 0..top; the top value falls in the last."""
    counts = [0] * bins
    for s in scores:
        counts[min(bins - 1, max(0, int(s / top * bins)))] += 1
    return counts


def text_histogram(scores: Sequence[float], bins: int = 10, top: float = 100.0, width: int = 40) -> str:
    """One line per range: ``  0- 9 | ####### 7``."""
    counts = score_histogram(scores, bins, top)
    peak = max(counts) or 1
    step = top / bins
    lines = []
    for b, count in enumerate(counts):
        low, high = b * step, (b + 1) * step - (1 if b < bins - 1 else 0)
        lines.append(f"{low:>4.0f}-{high:<4.0f}| {'#' * round(count / peak * width)} {count}")
    return "\n".join(lines)


def plot_score_histogram(scores: Sequence[float], path: str | Path, title: str = "judge scores",
                         bins: int = 10, top: float = 100.0) -> None:
    """The scores' histogram as a PNG, written atomically."""
    fig = new_figure()
    ax = fig.add_subplot()
    ax.bar([b * top / bins for b in range(bins)], score_histogram(scores, bins, top), width=top / bins,
           align="edge", edgecolor="black")
    mean = sum(scores) / len(scores) if scores else float("nan")
    ax.axvline(mean, color="red", linestyle="--", label=f"mean {mean:.1f}")
    ax.set_xlim(0, top)
    ax.set_xlabel("score")
    ax.set_ylabel("records")
    ax.set_title(f"{title} (n={len(scores)})")
    ax.legend()
    save_figure(fig, path)


def judge_output_paths(input_path: str | Path, output_path: str | Path | None = None,
                       judged: bool = True) -> dict[str, Path]:
    """What ``evaluate_responses`` writes: the scored records (default ``INPUT.judged.json``) and, with a judge,
    its cache (the output's name with ``.cache.jsonl`` for its suffix: ``INPUT.judged.cache.jsonl``) and the
    histogram (``.png``)."""
    input_path = Path(input_path)
    output = Path(output_path) if output_path else input_path.with_name(input_path.stem + ".judged.json")
    paths = {"--output": output}
    if judged:
        paths.update({"the judge's cache": output.with_suffix(".cache.jsonl"), "the histogram": output.with_suffix(".png")})
    return paths


def evaluate_responses(input_path: str | Path, output_path: str | Path | None = None, key: str = RESPONSE_KEY,
                       client: JudgeClient | None = None, progress: bool = True) -> dict:
    """Score the answers in ``input_path`` (written by ``gptlab respond``): ROUGE-L and exact match always,
    the LLM judge when ``client`` is given (cached beside the output, so a rerun resumes).

    Writes the records with their scores to ``output_path`` (default ``INPUT.judged.json``) and, with a
    judge, the score histogram as PNG beside it. Returns the summary.
    """
    input_path = Path(input_path)
    paths = judge_output_paths(input_path, output_path, judged=client is not None)
    for option, path in paths.items():  # before judging: never onto the input, never an unwritable place
        check_output_file(path, [input_path], option)
    records = load_instruction_records(input_path)
    output_path = paths["--output"]
    summary = offline_scores(records, key, str(input_path))
    summary.update(output=str(output_path))
    if client is not None:
        cache = JudgeCache(paths["the judge's cache"])
        records = judge_records(records, client, cache, key, str(input_path), progress)
        scores = [r[JUDGE_SCORE_KEY] for r in records if r[JUDGE_SCORE_KEY] is not None]
        summary.update(judge_model=client.model, judge_url=client.base_url, judged=len(scores),
                       unscored=len(records) - len(scores), cache=str(cache.path),
                       judge_mean=sum(scores) / len(scores) if scores else None,
                       histogram=score_histogram(scores), text_histogram=text_histogram(scores))
        if scores:
            plot_path = paths["the histogram"]
            plot_score_histogram(scores, plot_path, title=f"{client.model} judging {input_path.name}")
            summary["plot"] = str(plot_path)
    atomic_write_text(output_path, json.dumps(records, indent=2, ensure_ascii=False) + "\n")
    return summary


# ==== end of instruction responses ===============================================================
