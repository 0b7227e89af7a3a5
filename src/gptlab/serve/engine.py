"""The generation engine: the served model, the one thread that runs it, and the work it does per request.

The event loop never touches the model. ``Engine`` is what the HTTP app asks for, in request terms
(``generate``: prompts and checked sampling settings; ``classify``: texts), and it answers with a ``Job``
whose events the app reads. Inside, one ``GenerationWorker`` thread owns the model and interleaves up to
``max_active`` jobs one event (a token's text, at batch 1) at a time, round robin, so a long answer neither
blocks ``/health`` nor makes a short request wait for it to finish; more jobs wait in a bounded queue (503
when full). A client that goes away cancels its job (``Job.cancel``, from the event loop the moment the
connection closes), and the worker drops it before its next step: at most the step under way is wasted.

A job's events are tuples: ``("text", choice, piece)``, ``("finish", choice, TextStats)``,
``("result", body)`` (a classification), ``("error", APIError)`` and ``("tick",)`` (a step of work with
nothing to send yet: a batch of a long classification, so that it too stops between steps). A batching
engine keeps ``Engine``'s methods and these events, and replaces what the worker does between them.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import torch

from gptlab.classify import Classifier
from gptlab.config import ServeLimits
from gptlab.errors import GptlabError
from gptlab.generate import TextStats, stream_text
from gptlab.model import GPTModel
from gptlab.prompts import PromptStyle
from gptlab.respond import model_prompt_style
from gptlab.run import source_metadata
from gptlab.serve.schemas import APIError, Sampling
from gptlab.tokenizer import Tokenizer
from gptlab.weights import load

log = logging.getLogger("gptlab")

Event = tuple
_END: Event = ("end",)
_CANCELLED: Event = ("cancelled",)  # wakes a reader whose job was cancelled: no more events will come
_TICK: Event = ("tick",)
CLASSIFY_BATCH = 32  # texts per classification step


# ---- the served model ---------------------------------------------------------------------------

class ServedModel:
    """A loaded model with what the server needs to know about it: name, prompt style, classifier labels."""

    def __init__(self, model: GPTModel, tokenizer: Tokenizer, name: str, prompt_style: PromptStyle,
                 labels: Sequence[str] | None = None, classify_max_length: int | None = None) -> None:
        self.model, self.tokenizer, self.name, self.prompt_style = model.eval(), tokenizer, name, prompt_style
        self.labels = list(labels) if labels is not None else None
        self.classifier = None
        if self.labels is not None:
            self.classifier = Classifier(model, tokenizer, self.labels,
                                         classify_max_length or model.config.context_length)

    @classmethod
    def load(cls, source: str | Path, device: str | torch.device = "cpu", name: str | None = None,
             prompt_style: str | None = None, dtype: torch.dtype | None = None) -> "ServedModel":
        """Any source ``gptlab.load`` reads, its weights in ``dtype`` (``--dtype``); a run directory also supplies
        its prompt style or classifier labels."""
        model, tokenizer = load(source, device=device, dtype=dtype)
        meta = source_metadata(source)
        labels = meta.get("labels") if meta.get("stage") == "classifier" else None
        max_length = (meta.get("classifier") or {}).get("max_length") if labels is not None else None
        if name is None:
            name = Path(source).resolve().name if Path(source).exists() else str(source)
        return cls(model, tokenizer, name, model_prompt_style(source, prompt_style), labels, max_length)

    @property
    def kind(self) -> str:
        return "classifier" if self.classifier is not None else "generator"

    def describe(self, limits: ServeLimits) -> dict:
        """gptlab's extras in the ``/v1/models`` entry: what the chat page needs to set itself up."""
        info = {"kind": self.kind, "context_length": self.model.config.context_length,
                "max_tokens_limit": limits.max_tokens, "default_max_tokens": limits.default_max_tokens}
        if self.classifier is not None:
            info["labels"] = self.labels
        else:
            info["prompt_style"] = self.prompt_style.name
        return info


# ---- what the worker runs per request -----------------------------------------------------------

def generation_events(served: ServedModel, prompts: Sequence[str], sampling: Sampling,
                      echo: bool = False) -> Iterator[Event]:
    """("text", choice, piece) as pieces are final, then ("finish", choice, TextStats), choice by choice."""
    for p, prompt in enumerate(prompts):
        for c in range(sampling.n):
            index = p * sampling.n + c
            if echo:
                yield ("text", index, prompt)
            stats = TextStats()
            settings = sampling.for_choice(c).kwargs()
            for piece in stream_text(served.model, served.tokenizer, prompt, stats=stats, **settings):
                yield ("text", index, piece)
            yield ("finish", index, stats)


def classify_events(served: ServedModel, texts: Sequence[str]) -> Iterator[Event]:
    """One ("result", body) event; a ("tick",) after each batch but the last, so a cancelled job stops between them."""
    predictions = []
    for start in range(0, len(texts), CLASSIFY_BATCH):
        if start:
            yield _TICK
        with torch.no_grad():
            predictions += served.classifier.predict(texts[start : start + CLASSIFY_BATCH])
    tokens = sum(min(len(served.tokenizer.encode(t)), served.classifier.max_length) for t in texts)
    data = [{"index": i, "label": p.label, "probability": p.probability, "probabilities": p.probabilities}
            for i, p in enumerate(predictions)]
    yield ("result", {"data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


# ---- a job and the worker thread ----------------------------------------------------------------

class Job:
    """One request's work: a generator of events built and stepped by the worker, read by the event loop."""

    def __init__(self, make_events: Callable[[], Iterator[Event]], loop: asyncio.AbstractEventLoop) -> None:
        self._make_events, self._loop = make_events, loop
        self._events: Iterator[Event] | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.steps = 0  # events made so far: what a cancelled job cost after its client left

    def cancel(self) -> None:
        """Stop the work: the worker drops the job before its next step, and a reader waiting for events ends."""
        self.cancelled.set()
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, _CANCELLED)
        except RuntimeError:  # the event loop has shut down: no reader is waiting
            pass

    # worker side
    def step(self) -> Event | None:
        """Advance by one event; None once finished."""
        if self._events is None:
            self._events = self._make_events()
        event = next(self._events, None)
        if event is not None:
            self.steps += 1
        return event

    def close(self) -> None:
        close = getattr(self._events, "close", None)  # a generator; a plain iterator has nothing to release
        if close is not None:
            close()  # GeneratorExit inside stream_text ends the generation and frees its cache

    def emit(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop has shut down: nobody is listening
            self.cancelled.set()

    # event-loop side
    async def next_event(self) -> Event | None:
        """The next event; None at the end, or once the job is cancelled."""
        event = await self._queue.get()
        if event[0] == "error":
            raise event[1]
        return None if event is _END or event is _CANCELLED else event

    async def events(self) -> AsyncIterator[Event]:
        try:
            while (event := await self.next_event()) is not None:
                yield event
        finally:
            self.cancel()  # harmless once finished; stops the generation when the reader went away


class GenerationWorker:
    """The one thread that runs the model, interleaving up to ``max_active`` jobs one event at a time."""

    def __init__(self, max_active: int = 8, max_queue: int = 64) -> None:
        self.max_active = max_active
        self._waiting: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.active = 0
        self.completed = 0
        self.cancelled = 0

    @property
    def queued(self) -> int:
        return self._waiting.qsize()

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="gptlab-generation", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, make_events: Callable[[], Iterator[Event]]) -> Job:
        job = Job(make_events, asyncio.get_running_loop())
        try:
            self._waiting.put_nowait(job)
        except queue.Full:
            raise APIError(503, f"the server is busy ({self._waiting.maxsize} requests waiting); retry shortly",
                           type="server_error", code="overloaded") from None
        return job

    def _run(self) -> None:
        active: list[Job] = []
        while not self._stopping.is_set():
            self._admit(active)
            self.active = len(active)
            for job in list(active):
                if not self._step(job):
                    job.close()
                    active.remove(job)
            self.active = len(active)
        for job in active:
            job.close()

    def _admit(self, active: list[Job]) -> None:
        """Move waiting jobs into ``active`` up to ``max_active``; sleep on the queue only when idle."""
        while len(active) < self.max_active:
            try:
                job = self._waiting.get(block=not active, timeout=0.2)
            except queue.Empty:
                return
            if job.cancelled.is_set():
                self.cancelled += 1
            else:
                active.append(job)

    def _step(self, job: Job) -> bool:
        """Send the job's next event to its client; False once the job is done (finished, failed or cancelled)."""
        if job.cancelled.is_set():
            self.cancelled += 1
            return False
        event = self._advance(job)
        if event is not None and event[0] == "tick":  # work done, nothing to send yet
            return True
        if event is not None and event[0] != "error":
            job.emit(event)
            return True
        job.emit(event or _END)
        self.completed += 1
        return False

    @staticmethod
    def _advance(job: Job) -> Event | None:
        """The job's next event (None when it is done); a failure becomes an error event for its client only."""
        try:
            return job.step()
        except APIError as e:
            return ("error", e)
        except GptlabError as e:
            return ("error", APIError(400, str(e)))
        except Exception as e:  # keep serving the others; this client gets a 500
            log.exception("generation failed")
            return ("error", APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error"))


# ---- the engine the app talks to ----------------------------------------------------------------

class Engine:
    """The served model behind its worker, asked for work in request terms; runs between start() and stop()."""

    def __init__(self, served: ServedModel, limits: ServeLimits = ServeLimits()) -> None:
        self.served, self.limits = served, limits
        self.worker = GenerationWorker(limits.max_active, limits.max_queue)

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()

    def generate(self, prompts: Sequence[str], sampling: Sampling, echo: bool = False) -> Job:
        """``sampling.n`` choices per prompt, numbered prompt by prompt (prompt p, choice c: p * n + c)."""
        return self.worker.submit(lambda: generation_events(self.served, prompts, sampling, echo=echo))

    def classify(self, texts: Sequence[str]) -> Job:
        """One ``("result", body)`` event with the label and class probabilities of each text."""
        return self.worker.submit(lambda: classify_events(self.served, texts))

    def status(self) -> dict:
        """What ``/health`` reports: jobs waiting and jobs running."""
        return {"queued": self.worker.queued, "active": self.worker.active}
