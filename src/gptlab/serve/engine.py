"""The generation engine: the served model, the one thread that runs it, and the work it does per request.

The event loop never touches the model. ``Engine`` is what the HTTP app asks for, in request terms
(``generate``: prompts and checked sampling settings; ``classify``: texts), and it answers with a ``Job``
whose events the app reads. Inside, one ``GenerationWorker`` thread owns the model. Generations are decoded
by continuous batching (``gptlab.batching.ContinuousBatch``): every choice of every running request is a row
of one batch, a new request is prefilled and joins at the next step, a finished one leaves at once, and
each step decodes one token for all rows together. Up to ``max_active`` rows run at once (a request's
choices are admitted together); more requests wait in a bounded queue (503 when full). Other work (a
classification) is stepped between batch steps, one batch of texts at a time. A client that goes away
cancels its job (``Job.cancel``, from the event loop the moment the connection closes), and the worker
removes its rows before the next step: at most the step under way is wasted.

A job's events are tuples: ``("text", choice, piece)``, ``("logprobs", choice, [entry])`` (before the text
of those tokens, when asked for), ``("finish", choice, TextStats)``, ``("result", body)`` (a
classification), ``("error", APIError)`` and ``("tick",)`` (a step of work with nothing to send yet: a batch
of a long classification, so that it too stops between steps).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gptlab.batching import BatchedStream, ContinuousBatch
from gptlab.classify import Classifier
from gptlab.config import QuantizeConfig, ServeLimits
from gptlab.errors import GptlabError
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
             prompt_style: str | None = None, quantize: QuantizeConfig | None = None,
             dtype: torch.dtype | None = None) -> "ServedModel":
        """Any source ``gptlab.load`` reads, quantized (``--quantize``) or its weights in ``dtype`` (``--dtype``);
        a run directory also supplies its prompt style or classifier labels."""
        model, tokenizer = load(source, device=device, quantize=quantize, dtype=dtype)
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

@dataclass(frozen=True)
class GenerationRequest:
    """A generation job's work: ``sampling.n`` choices per prompt, numbered prompt by prompt (p * n + c)."""

    prompts: Sequence[str]
    sampling: Sampling
    echo: bool = False
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k most likely


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

    def __init__(self, make_events: Callable[[], Iterator[Event]] | None, loop: asyncio.AbstractEventLoop,
                 generation: GenerationRequest | None = None) -> None:
        self._make_events, self._loop, self.generation = make_events, loop, generation
        self._events: Iterator[Event] | None = None
        self.streams: list[BatchedStream] = []  # a generation's rows in the batch, one per choice
        self._queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.steps = 0  # events made (a generation: batch steps taken part in) so far: what a cancelled job cost

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
    """The one thread that runs the model: generations as one continuous batch, other jobs stepped between."""

    def __init__(self, max_active: int = 8, max_queue: int = 64, served: ServedModel | None = None) -> None:
        self.max_active = max_active
        self._waiting: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.batch = ContinuousBatch(served.model, served.tokenizer, max_active) if served is not None else None
        self.active = 0
        self.completed = 0
        self.cancelled = 0

    @property
    def queued(self) -> int:
        return self._waiting.qsize()

    @property
    def rows(self) -> int:
        """Generations (choices) in the batch now."""
        return self.batch.size if self.batch is not None else 0

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="gptlab-generation", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, make_events: Callable[[], Iterator[Event]]) -> Job:
        """A job stepped one event at a time between batch steps."""
        return self._enqueue(Job(make_events, asyncio.get_running_loop()))

    def submit_generation(self, request: GenerationRequest) -> Job:
        """A generation: its choices join the batch when there is room."""
        if self.batch is None:
            raise APIError(500, "this worker has no model to generate with", type="server_error")
        return self._enqueue(Job(None, asyncio.get_running_loop(), request))

    def _enqueue(self, job: Job) -> Job:
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
            for job in [j for j in active if j.cancelled.is_set()]:  # their rows are free before the next step
                self.cancelled += 1
                self._drop(job, active)
            self.active = len(active)
            for job in [j for j in active if j.generation is None]:
                if not self._step(job):
                    self._drop(job, active)
            generating = [j for j in active if j.generation is not None]
            if generating:
                self._step_batch(generating, active)
            self.active = len(active)
        for job in active:
            self._drop(job, active)

    def _admit(self, active: list[Job]) -> None:
        """Move waiting jobs into ``active`` while there is room; sleep on the queue only when idle."""
        while self._load(active) < self.max_active:
            try:
                job = self._waiting.get(block=not active, timeout=0.2)
            except queue.Empty:
                if not active and self.batch is not None:
                    self.batch.release_if_idle()  # idle for a while: no cache, no packed copies
                return
            if job.cancelled.is_set():
                self.cancelled += 1
            elif job.generation is None or self._join(job):
                active.append(job)

    @staticmethod
    def _load(active: list[Job]) -> int:
        return sum(len(j.streams) if j.generation is not None else 1 for j in active)

    def _join(self, job: Job) -> bool:
        """Add the job's choices to the batch (prefilled at the next step); False if it failed at once."""
        request = job.generation
        try:
            for p, prompt in enumerate(request.prompts):
                for c in range(request.sampling.n):
                    if request.echo:
                        job.emit(("text", p * request.sampling.n + c, prompt))
                    job.streams.append(self.batch.add(prompt, request.sampling.for_choice(c), request.logprobs))
        except Exception as e:
            self._fail(job, e)
            return False
        return True

    def _step_batch(self, generating: list[Job], active: list[Job]) -> None:
        """One batch step: the newcomers' prefill group by group, each group's first tokens sent at once, then
        one token for the others; each job's new events go to its client, and finished jobs leave."""
        for phase in self._phases():
            try:
                phase()
            except Exception as e:  # the batch is in an unknown state: fail its requests, start afresh
                for job in generating:
                    self._fail(job, e)
                    active.remove(job)
                self.batch.close()
                return
            for job in list(generating):
                for index, stream in enumerate(job.streams):
                    for kind, value in stream.take():
                        job.emit((kind, index, value))
                if all(s.done for s in job.streams):
                    job.emit(_END)
                    self.completed += 1
                    self._drop(job, active)
                    generating.remove(job)
        for job in generating:
            job.steps += 1

    def _phases(self) -> Iterator[Callable[[], None]]:
        """A step's work in turns: each prefill group (its first tokens go out before the next group's
        prefill), then the decoding of the others."""
        while self.batch.joining:
            yield lambda: self.batch.prefill(groups=1)
        yield self.batch.decode

    def _drop(self, job: Job, active: list[Job]) -> None:
        for stream in job.streams:
            self.batch.remove(stream)
        job.streams = []
        job.close()
        if job in active:
            active.remove(job)

    def _fail(self, job: Job, error: Exception) -> None:
        for stream in job.streams:
            self.batch.remove(stream)
        job.streams = []
        job.emit(error_event(error))
        self.completed += 1

    def _step(self, job: Job) -> bool:
        """Send the job's next event to its client; False once the job is done (finished, failed or cancelled)."""
        if job.cancelled.is_set():
            self.cancelled += 1
            return False
        try:
            event = job.step()
        except Exception as e:
            event = error_event(e)
        if event is not None and event[0] == "tick":  # work done, nothing to send yet
            return True
        if event is not None and event[0] != "error":
            job.emit(event)
            return True
        job.emit(event or _END)
        self.completed += 1
        return False


def error_event(error: Exception) -> Event:
    """A failure as an error event for its client only: a 400 for a user mistake, else a 500."""
    if isinstance(error, APIError):
        return ("error", error)
    if isinstance(error, GptlabError):
        return ("error", APIError(400, str(error)))
    log.error("generation failed", exc_info=error)  # keep serving the others; this client gets a 500
    return ("error", APIError(500, f"generation failed: {type(error).__name__}: {error}", type="server_error"))


# ---- the engine the app talks to ----------------------------------------------------------------

class Engine:
    """The served model behind its worker, asked for work in request terms; runs between start() and stop()."""

    def __init__(self, served: ServedModel, limits: ServeLimits = ServeLimits()) -> None:
        self.served, self.limits = served, limits
        self.worker = GenerationWorker(limits.max_active, limits.max_queue, served)

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()

    def generate(self, prompts: Sequence[str], sampling: Sampling, echo: bool = False,
                 logprobs: int | None = None) -> Job:
        """``sampling.n`` choices per prompt, numbered prompt by prompt (prompt p, choice c: p * n + c);
        ``logprobs``: also each token's log-probability and that many alternatives (0: none)."""
        return self.worker.submit_generation(GenerationRequest(prompts, sampling, echo, logprobs))

    def classify(self, texts: Sequence[str]) -> Job:
        """One ``("result", body)`` event with the label and class probabilities of each text."""
        return self.worker.submit(lambda: classify_events(self.served, texts))

    def status(self) -> dict:
        """What ``/health`` reports: jobs waiting, jobs running, and their rows in the batch."""
        return {"queued": self.worker.queued, "active": self.worker.active, "batch_rows": self.worker.rows}
