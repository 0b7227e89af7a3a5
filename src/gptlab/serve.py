"""Serve a model over HTTP: an OpenAI-compatible API, server-sent-event streaming and a chat page.

    GET  /                      the chat page (``assets/chat.html``: no CDN, works offline)
    GET  /health                liveness and queue depth (never behind the API key)
    GET  /v1/models             the one served model, with gptlab's extras (kind, context, labels, limits)
    POST /v1/completions        OpenAI's legacy completions: prompt(s) -> text, ``stream`` as SSE
    POST /v1/chat/completions   messages -> an answer, laid out by the model's prompt style
    POST /v1/classify           a classifier run: text(s) -> label and class probabilities

Concurrency: the event loop never touches the model. One worker thread owns it and interleaves up to
``max_active`` generations token by token (round robin), so a long answer neither blocks ``/health`` nor
makes a short request wait for it to finish; more requests wait in a bounded queue (503 when full).
A client that goes away mid-stream cancels its job, which the worker drops before its next token.

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so the official client
raises its usual exceptions: 400 bad values, 401 API key, 404 unknown model or route, 413 body too large,
422 malformed fields, 503 queue full.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptlab.errors import GptlabError
from gptlab.generate import TextStats, stream_text
from gptlab.model import GPTModel
from gptlab.prompts import PromptStyle
from gptlab.tokenizer import Tokenizer

log = logging.getLogger("gptlab")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
API_KEY_ENV = "GPTLAB_API_KEY"
CHAT_PAGE = "chat.html"
MAX_STOP_STRINGS = 4  # OpenAI's limit


@dataclass(frozen=True)
class ServeLimits:
    """Bounds on what one request may cost; each is a ``gptlab serve`` option."""

    max_tokens: int = 1024  # the most new tokens a request may ask for (per choice)
    default_max_tokens: int = 256  # when a request does not say
    max_request_bytes: int = 1_000_000  # request body
    max_n: int = 4  # choices per prompt
    max_queue: int = 64  # requests waiting for the worker; beyond that, 503
    max_active: int = 8  # generations the worker interleaves

    def __post_init__(self) -> None:
        for name in ("max_tokens", "default_max_tokens", "max_request_bytes", "max_n", "max_queue", "max_active"):
            if getattr(self, name) < 1:
                raise GptlabError(f"serve limit {name} must be at least 1, got {getattr(self, name)}")
        if self.default_max_tokens > self.max_tokens:
            raise GptlabError(f"default max tokens ({self.default_max_tokens}) is above the limit ({self.max_tokens})")


class APIError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# ---- the served model ---------------------------------------------------------------------------

class ServedModel:
    """A loaded model with what the server needs to know about it: name, prompt style, classifier labels."""

    def __init__(self, model: GPTModel, tokenizer: Tokenizer, name: str, prompt_style: PromptStyle,
                 labels: Sequence[str] | None = None, classify_max_length: int | None = None) -> None:
        self.model, self.tokenizer, self.name, self.prompt_style = model.eval(), tokenizer, name, prompt_style
        self.labels = list(labels) if labels is not None else None
        self.classifier = None
        if self.labels is not None:
            from gptlab.finetune.classifier import Classifier

            if model.lm_head.out_features != len(self.labels):
                raise GptlabError(f"{name}: the head predicts {model.lm_head.out_features} classes but the run "
                                  f"lists {len(self.labels)} labels; the run is damaged, train it again")
            self.classifier = Classifier(model, tokenizer, self.labels,
                                         classify_max_length or model.config.context_length)

    @classmethod
    def load(cls, source: str | Path, device: str | torch.device = "cpu", name: str | None = None,
             prompt_style: str | None = None) -> "ServedModel":
        """Any source ``gptlab.load`` reads; a run directory also supplies its prompt style or classifier labels."""
        from gptlab.finetune.instruct import model_prompt_style
        from gptlab.run import CONFIG_FILE, read_run_config
        from gptlab.weights import load

        model, tokenizer = load(source, device=device)
        meta: dict = {}
        if (Path(source) / CONFIG_FILE).is_file():
            try:
                meta = read_run_config(source)
            except GptlabError:
                meta = {}  # a Hugging Face folder's config.json: no gptlab metadata
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


# ---- the worker that owns the model ---------------------------------------------------------------

_END = ("end",)


class Job:
    """One request's work: a generator of events built and stepped by the worker, read by the event loop."""

    def __init__(self, make_events: Callable[[], Iterator[tuple]], loop: asyncio.AbstractEventLoop) -> None:
        self._make_events, self._loop = make_events, loop
        self._events: Iterator[tuple] | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    # worker side
    def step(self) -> tuple | None:
        """Advance by one event; None once finished."""
        if self._events is None:
            self._events = self._make_events()
        return next(self._events, None)

    def close(self) -> None:
        close = getattr(self._events, "close", None)  # a generator; a plain iterator has nothing to release
        if close is not None:
            close()  # GeneratorExit inside stream_text ends the generation and frees its cache

    def emit(self, event: tuple) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop has shut down: nobody is listening
            self.cancel()

    # event-loop side
    async def next_event(self, request: Request | None = None) -> tuple | None:
        """The next event, None at the end; with ``request``, a client that disconnects cancels the job."""
        while True:
            try:
                event = await asyncio.wait_for(self._queue.get(), timeout=0.25 if request is not None else None)
                break
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.cancel()
                    return None
        if event[0] == "error":
            raise event[1]
        return None if event is _END else event

    async def events(self, request: Request | None = None) -> AsyncIterator[tuple]:
        try:
            while (event := await self.next_event(request)) is not None:
                yield event
        finally:
            self.cancel()  # a no-op once finished; stops the generation when the reader went away


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

    def submit(self, make_events: Callable[[], Iterator[tuple]]) -> Job:
        job = Job(make_events, asyncio.get_running_loop())
        try:
            self._waiting.put_nowait(job)
        except queue.Full:
            raise APIError(503, f"the server is busy ({self._waiting.maxsize} requests waiting); retry shortly",
                           type="server_error", code="overloaded") from None
        return job

    @staticmethod
    def _advance(job: Job) -> tuple | None:
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

    def _run(self) -> None:
        active: list[Job] = []
        while not self._stopping.is_set():
            while len(active) < self.max_active:
                try:  # sleep on the queue only when there is nothing else to do
                    job = self._waiting.get(block=not active, timeout=0.2)
                except queue.Empty:
                    break
                if job.cancelled.is_set():
                    self.cancelled += 1
                    continue
                active.append(job)
            self.active = len(active)
            for job in list(active):
                if job.cancelled.is_set():
                    self.cancelled += 1
                else:
                    event = self._advance(job)
                    if event is not None and event[0] != "error":
                        job.emit(event)
                        continue
                    job.emit(event or _END)
                    self.completed += 1
                job.close()
                active.remove(job)
            self.active = len(active)
        for job in active:
            job.close()


# ---- request bodies -------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI's, but common in OpenAI-compatible servers
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class TextPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None


class ClassifyRequest(BaseModel):
    model: str | None = None
    input: str | list[str]


@dataclass(frozen=True)
class Sampling:
    """A request's checked sampling settings."""

    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    n: int
    seed: int | None
    stop: tuple[str, ...]

    def kwargs(self, choice: int) -> dict:
        # Each choice gets its own seed so n samples differ, yet the same request repeats exactly.
        seed = None if self.seed is None else self.seed + choice
        return dict(max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                    top_k=self.top_k, seed=seed, stop=self.stop)


def check_sampling(req: SamplingFields, limits: ServeLimits, max_tokens: int | None) -> Sampling:
    """Out-of-range values become 400s naming the parameter (types were already checked: 422)."""
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    if max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    if max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens {max_tokens} is over this server's limit of {limits.max_tokens} "
                            "(gptlab serve --max-tokens-limit)", param="max_tokens")
    temperature = 1.0 if req.temperature is None else req.temperature
    if not 0.0 <= temperature <= 2.0:
        raise APIError(400, f"temperature must be between 0 and 2, got {temperature}", param="temperature")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise APIError(400, f"top_p must be in (0, 1], got {req.top_p}", param="top_p")
    if req.top_k is not None and req.top_k < 1:
        raise APIError(400, f"top_k must be at least 1, got {req.top_k}", param="top_k")
    n = 1 if req.n is None else req.n
    if not 1 <= n <= limits.max_n:
        raise APIError(400, f"n must be between 1 and {limits.max_n} (gptlab serve --max-n), got {n}", param="n")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise APIError(400, f"at most {MAX_STOP_STRINGS} stop sequences, got {len(stop)}", param="stop")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise APIError(400, f"{name} is not supported by gptlab; leave it at 0", param=name)
    return Sampling(max_tokens, temperature, req.top_p, req.top_k, n, req.seed, tuple(s for s in stop if s))


def unsupported(param: str, value: Any) -> None:
    if value:
        raise APIError(400, f"{param} is not supported by gptlab", param=param)


def chat_text(message: ChatMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise APIError(400, f"messages[{index}]: only text content parts are supported, got {part.type!r}",
                           param=f"messages.{index}.content")
        texts.append(part.text)
    return "".join(texts)


# ---- the application --------------------------------------------------------------------------------

def create_app(served: ServedModel, api_key: str | None = None, limits: ServeLimits = ServeLimits()) -> FastAPI:
    """The FastAPI application; its generation worker runs while the app does (lifespan)."""
    worker = GenerationWorker(limits.max_active, limits.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="gptlab", version="1", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served, app.state.worker, app.state.limits = served, worker, limits
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_request_bytes)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return APIError(400, f"the request body is not valid JSON: {first.get('msg', '')}").response()
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param + ': ' if param else ''}{first.get('msg', 'invalid request')}"
        return APIError(422, message, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None).response()

    @app.exception_handler(GptlabError)
    async def gptlab_error(request: Request, exc: GptlabError) -> JSONResponse:
        return APIError(400, str(exc)).response()

    def require_api_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
        if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    def check_model(requested: str | None) -> None:
        if requested is not None and requested != served.name:
            raise APIError(404, f"the model {requested!r} does not exist; this server serves {served.name!r}",
                           param="model", code="model_not_found")

    def model_entry() -> dict:
        return {"id": served.name, "object": "model", "created": created, "owned_by": "gptlab",
                **served.describe(limits)}

    def require_generator() -> None:
        if served.classifier is not None:
            raise APIError(400, f"{served.name} is a classifier; POST /v1/classify instead", param="model",
                           code="model_not_generative")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(resources.files("gptlab").joinpath("assets", CHAT_PAGE).read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": served.name, "queued": worker.queued, "active": worker.active}

    v1 = [Depends(require_api_key)]

    @app.get("/v1/models", dependencies=v1)
    async def list_models() -> dict:
        return {"object": "list", "data": [model_entry()]}

    @app.get("/v1/models/{model_id:path}", dependencies=v1)
    async def retrieve_model(model_id: str) -> dict:
        check_model(model_id)
        return model_entry()

    @app.post("/v1/completions", dependencies=v1)
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        require_generator()
        for param in ("logprobs", "suffix"):
            unsupported(param, getattr(body, param))
        if body.best_of not in (None, 1):
            unsupported("best_of", body.best_of)
        sampling = check_sampling(body, limits, body.max_tokens)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt is an empty list", param="prompt")
        job = worker.submit(lambda: generation_events(served, prompts, sampling, echo=body.echo))
        return await respond(job, request, body, sampling, len(prompts), chat=False)

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        require_generator()
        unsupported("logprobs", body.logprobs)
        unsupported("tools", body.tools)
        if not body.messages:
            raise APIError(400, "messages is empty", param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": chat_text(m, i)}
                    for i, m in enumerate(body.messages)]
        try:
            prompt = served.prompt_style.chat(messages)
        except GptlabError as e:
            raise APIError(400, str(e), param="messages") from None
        sampling = check_sampling(body, limits, body.max_completion_tokens or body.max_tokens)
        sampling = Sampling(**{**sampling.__dict__, "stop": (*served.prompt_style.stop, *sampling.stop)})
        job = worker.submit(lambda: generation_events(served, [prompt], sampling))
        return await respond(job, request, body, sampling, 1, chat=True)

    @app.post("/v1/classify", dependencies=v1)
    async def classify(body: ClassifyRequest, request: Request):
        check_model(body.model)
        if served.classifier is None:
            raise APIError(400, f"{served.name} is not a classifier run (its config.json has no "
                                "\"stage\": \"classifier\"); use /v1/completions", param="model")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise APIError(400, "input is an empty list", param="input")
        job = worker.submit(lambda: classify_events(served, texts))
        event = await job.next_event(request)
        if event is None:
            return JSONResponse({}, status_code=499)
        return {"object": "list", "model": served.name, **event[1]}

    async def respond(job: Job, request: Request, body: SamplingFields, sampling: Sampling, n_prompts: int,
                      chat: bool):
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        header = {"id": ident, "object": "chat.completion" if chat else "text_completion",
                  "created": int(time.time()), "model": served.name}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(sse_stream(job, header, chat, include_usage, sampling.n), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        n_choices = n_prompts * sampling.n
        texts = [""] * n_choices
        finish: list[TextStats | None] = [None] * n_choices
        async for kind, index, value in job.events(request):
            if kind == "text":
                texts[index] += value
            else:
                finish[index] = value
        if any(f is None for f in finish):  # the client left: nobody reads this
            return JSONResponse({}, status_code=499)
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": f.finish_reason} for i, (t, f) in enumerate(zip(texts, finish))]
        else:
            choices = [{"text": t, "index": i, "logprobs": None, "finish_reason": f.finish_reason}
                       for i, (t, f) in enumerate(zip(texts, finish))]
        return {**header, "choices": choices, "usage": usage(finish, sampling.n)}

    return app


def usage(finished: Sequence[TextStats], n: int) -> dict:
    """OpenAI counts each prompt once however many choices it has."""
    prompt = sum(s.prompt_tokens for s in finished[::n])
    completion = sum(s.completion_tokens for s in finished)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def generation_events(served: ServedModel, prompts: Sequence[str], sampling: Sampling,
                      echo: bool = False) -> Iterator[tuple]:
    """("text", choice, piece) as pieces are final, then ("finish", choice, TextStats), choice by choice."""
    for p, prompt in enumerate(prompts):
        for c in range(sampling.n):
            index = p * sampling.n + c
            if echo:
                yield ("text", index, prompt)
            stats = TextStats()
            for piece in stream_text(served.model, served.tokenizer, prompt, stats=stats, **sampling.kwargs(c)):
                yield ("text", index, piece)
            yield ("finish", index, stats)


def classify_events(served: ServedModel, texts: Sequence[str]) -> Iterator[tuple]:
    with torch.no_grad():
        predictions = served.classifier.predict(texts)
    tokens = sum(min(len(served.tokenizer.encode(t)), served.classifier.max_length) for t in texts)
    data = [{"index": i, "label": p.label, "probability": p.probability, "probabilities": p.probabilities}
            for i, p in enumerate(predictions)]
    yield ("result", {"data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


async def sse_stream(job: Job, header: dict, chat: bool, include_usage: bool, n: int) -> AsyncIterator[str]:
    """OpenAI's streaming format: ``data: {chunk}`` events, a usage chunk if asked, then ``data: [DONE]``."""
    chunk_object = "chat.completion.chunk" if chat else "text_completion"
    finished: dict[int, TextStats] = {}
    started: set[int] = set()

    def chunk(choice: dict) -> str:
        return "data: " + json.dumps({**header, "object": chunk_object, "choices": [choice]}) + "\n\n"

    try:
        async for kind, index, value in job.events():
            if chat and index not in started:  # the first chunk of a chat choice announces the role
                started.add(index)
                yield chunk({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})
            if kind == "text":
                body = {"delta": {"content": value}} if chat else {"text": value}
                yield chunk({"index": index, **body, "logprobs": None, "finish_reason": None})
            else:
                finished[index] = value
                body = {"delta": {}} if chat else {"text": ""}
                yield chunk({"index": index, **body, "logprobs": None, "finish_reason": value.finish_reason})
    except APIError as e:  # headers are sent: report in-stream, as OpenAI does, and end without [DONE]
        yield "data: " + json.dumps(e.body()) + "\n\n"
        return
    if include_usage:
        stats = [finished[i] for i in sorted(finished)]
        yield "data: " + json.dumps({**header, "object": chunk_object, "choices": [], "usage": usage(stats, n)}) + "\n\n"
    yield "data: [DONE]\n\n"


# ---- plumbing: body limit, running uvicorn ------------------------------------------------------------

class BodySizeLimit:
    """ASGI middleware: a body over ``max_bytes`` gets 413 before the application parses it.

    The body is read here in full (it is small by construction) so a chunked upload without a
    Content-Length is bounded too; the application then receives it as one message.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"the request body is over this server's limit of {self.max_bytes:,} bytes "
                                  "(gptlab serve --max-request-bytes)", code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large.response()(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await too_large.response()(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # afterwards: http.disconnect, which cancels a stream

        await self.app(scope, replay, send)


def bind_warnings(host: str, api_key: str | None) -> list[str]:
    """What to tell the user about listening on ``host``: anything but loopback is reachable by others."""
    if host == "localhost":
        return []
    try:
        if ipaddress.ip_address(host).is_loopback:
            return []
    except ValueError:
        pass  # a host name: it may resolve to a public address
    warnings = [f"listening on {host}, which is not a loopback address: other machines can reach this server"]
    if api_key is None:
        warnings.append(f"no API key: anyone who can connect may use the model (set --api-key or {API_KEY_ENV})")
    return warnings


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (0: any free port) for uvicorn to serve on.

    Bound before the model loads, so a port in use is a one-line error at once, not a uvicorn log
    after a model has loaded and its address has been announced.
    """
    if not 0 <= port <= 65535:
        raise GptlabError(f"port {port} is out of range; use 1-65535 (or 0: any free port)")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise GptlabError(f"cannot listen on {host}:{port} ({e.strerror or e}); "
                          "choose another --port, or a --host address of this machine") from None
    return sock


class BackgroundServer:
    """uvicorn serving ``app`` from a daemon thread on a free port: for tests, benchmarks and notebooks.

        with BackgroundServer(create_app(served)) as server:
            openai.OpenAI(base_url=server.url + "/v1", api_key="-")...
    """

    def __init__(self, app: FastAPI, host: str = DEFAULT_HOST, port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self._socket = listening_socket(host, port)  # bound here, so the port is known before the server starts
        self.app = app
        self.host, self.port = host, self._socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name="gptlab-uvicorn", daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()


def serve(source: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, api_key: str | None = None,
          limits: ServeLimits = ServeLimits(), device: str = "auto", name: str | None = None,
          prompt_style: str | None = None, log_level: str = "info") -> None:
    """Load ``source`` and serve it until interrupted (``gptlab serve``)."""
    import uvicorn

    from gptlab.device import select_device

    for warning in bind_warnings(host, api_key):
        log.warning(warning)
    sock = listening_socket(host, port)
    try:
        served = ServedModel.load(source, device=select_device(device), name=name, prompt_style=prompt_style)
        app = create_app(served, api_key=api_key, limits=limits)
        shown = f"[{host}]" if ":" in host else host
        port = sock.getsockname()[1]
        log.info("serving %s (%s) at http://%s:%d/ (chat page) and http://%s:%d/v1 (OpenAI API)%s",
                 served.name, served.kind, shown, port, shown, port, "; API key required" if api_key else "")
        server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
        server.run(sockets=[sock])
    finally:
        sock.close()
