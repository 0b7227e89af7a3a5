"""The HTTP application: routes, OpenAI's response shapes (whole and streamed) and errors.

``create_app`` wires an ``Engine`` (which owns the model) to FastAPI behind the guards of
``gptlab.serve.guards``; nothing here touches the model.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptlab.batching import MAX_TOP_LOGPROBS
from gptlab.config import ServeLimits
from gptlab.errors import GptlabError
from gptlab.generate import TextStats
from gptlab.serve.engine import Engine, Job, ServedModel
from gptlab.serve.guards import (OLLAMA_PREFIX, BodyLimits, HostAllowlist, RequireAPIKey, api_key_error,
                                 cancelled_on_disconnect, error_response)
from gptlab.serve.ollama import OllamaRoutes
from gptlab.serve.schemas import (APIError, ChatRequest, ClassifyRequest, CompletionRequest, Sampling, SamplingFields,
                                  chat_messages, check_choices, non_empty, request_sampling, unsupported)

CHAT_PAGE = "chat.html"
COMPLETION_LOGPROBS = 5  # OpenAI's limit for the legacy completions' logprobs
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(served: ServedModel, api_key: str | None = None, limits: ServeLimits = ServeLimits(),
               allowed_hosts: Sequence[str] = ()) -> FastAPI:
    """The FastAPI application; its engine runs while the app does (lifespan).

    ``allowed_hosts``: Host header names answered besides loopback ones (see ``HostAllowlist``).
    """
    engine = Engine(served, limits)
    app = FastAPI(title="gptlab", version="1", lifespan=running(engine), docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.served, app.state.engine, app.state.worker, app.state.limits = served, engine, engine.worker, limits
    # The last added runs first: the Host, then the key (on the headers alone), then the body.
    app.add_middleware(BodyLimits, max_bytes=limits.max_request_bytes, timeout=limits.body_timeout)
    app.add_middleware(RequireAPIKey, api_key=api_key)
    app.add_middleware(HostAllowlist, allowed=tuple(allowed_hosts))
    add_error_handlers(app)
    Routes(engine, api_key).add_to(app)
    OllamaRoutes(engine).add_to(app)  # /api/...: Ollama's API over the same engine
    return app


def running(engine: Engine):
    """The app's lifespan: the engine's worker thread runs while the app serves."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    return lifespan


# ---- routes -------------------------------------------------------------------------------------

class Routes:
    """The chat page, ``/health`` and OpenAI's ``/v1`` API over one engine."""

    def __init__(self, engine: Engine, api_key: str | None) -> None:
        self.engine, self.served, self.limits, self.api_key = engine, engine.served, engine.limits, api_key
        self.created = int(time.time())

    def add_to(self, app: FastAPI) -> None:
        app.get("/", response_class=HTMLResponse, include_in_schema=False)(self.chat_page)
        app.get("/health")(self.health)  # liveness for anyone; the details with the key (if there is one)
        # The /v1 routes are behind RequireAPIKey, which checks the key before the body is read.
        app.get("/v1/models")(self.list_models)
        app.get("/v1/models/{model_id:path}")(self.retrieve_model)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat_completions)
        app.post("/v1/classify")(self.classify)

    async def chat_page(self) -> HTMLResponse:
        return HTMLResponse(resources.files("gptlab").joinpath("assets", CHAT_PAGE).read_text(encoding="utf-8"))

    async def health(self, request: Request) -> dict:
        if self.api_key is not None and api_key_error(request.headers.get("authorization"), self.api_key):
            return {"status": "ok"}  # what is served, and how busy, is for those with the key
        return {"status": "ok", "model": self.served.name, **self.engine.status()}

    async def list_models(self) -> dict:
        return {"object": "list", "data": [self.model_entry()]}

    async def retrieve_model(self, model_id: str) -> dict:
        self.check_model(model_id)
        return self.model_entry()

    async def completions(self, body: CompletionRequest, request: Request):
        self.check_generator(body.model)
        unsupported("suffix", body.suffix)
        if body.best_of not in (None, 1):
            unsupported("best_of", body.best_of)
        logprobs = check_logprobs(body.logprobs, "logprobs", COMPLETION_LOGPROBS)
        if logprobs is not None and body.echo:
            unsupported("echo with logprobs (the prompt's log-probabilities)", True)
        sampling = request_sampling(body, self.limits, body.max_tokens)
        prompts = non_empty([body.prompt] if isinstance(body.prompt, str) else body.prompt, "prompt")
        check_choices(len(prompts), sampling.n, self.limits)
        job = self.engine.generate(prompts, sampling, echo=body.echo, logprobs=logprobs)
        return await self.answer(job, request, body, sampling, len(prompts), chat=False, logprobs=logprobs is not None)

    async def chat_completions(self, body: ChatRequest, request: Request):
        self.check_generator(body.model)
        unsupported("tools", body.tools)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = check_logprobs(body.top_logprobs or 0, "top_logprobs", MAX_TOP_LOGPROBS) if body.logprobs else None
        style = self.served.prompt_style
        messages = chat_messages(body)
        try:
            prompt = style.chat(messages)
        except GptlabError as e:
            raise APIError(400, str(e), param="messages") from None
        sampling = request_sampling(body, self.limits, body.max_completion_tokens or body.max_tokens)
        sampling = sampling.with_stop(style.stop)
        check_choices(1, sampling.n, self.limits)
        job = self.engine.generate([prompt], sampling, logprobs=logprobs)
        return await self.answer(job, request, body, sampling, 1, chat=True, logprobs=logprobs is not None)

    async def classify(self, body: ClassifyRequest, request: Request):
        self.check_model(body.model)
        if self.served.classifier is None:
            raise APIError(400, f"{self.served.name} is not a classifier run (its config.json has no "
                                "\"stage\": \"classifier\"); use /v1/completions", param="model")
        texts = non_empty([body.input] if isinstance(body.input, str) else body.input, "input")
        if len(texts) > self.limits.max_texts:
            raise APIError(400, f"input holds {len(texts)} texts, over this server's limit of {self.limits.max_texts} "
                                "per request (gptlab serve --max-texts)", param="input", code="too_many_inputs")
        job = self.engine.classify(texts)
        async with cancelled_on_disconnect(job, request):
            event = await job.next_event()
        if event is None:  # the client left
            return JSONResponse({}, status_code=499)
        return {"object": "list", "model": self.served.name, **event[1]}

    # checks
    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.served.name:
            raise APIError(404, f"the model {requested!r} does not exist; this server serves {self.served.name!r}",
                           param="model", code="model_not_found")

    def check_generator(self, requested: str | None) -> None:
        self.check_model(requested)
        if self.served.classifier is not None:
            raise APIError(400, f"{self.served.name} is a classifier; POST /v1/classify instead", param="model",
                           code="model_not_generative")

    # answers
    def model_entry(self) -> dict:
        return {"id": self.served.name, "object": "model", "created": self.created, "owned_by": "gptlab",
                **self.served.describe(self.limits)}

    async def answer(self, job: Job, request: Request, body: SamplingFields, sampling: Sampling, n_prompts: int,
                     chat: bool, logprobs: bool = False):
        """The job's choices as one JSON body, or as server-sent events when the request streams."""
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        header = {"id": ident, "object": "chat.completion" if chat else "text_completion",
                  "created": int(time.time()), "model": self.served.name}
        if body.stream:  # Starlette's StreamingResponse ends the stream, and so the job, when the client leaves
            return StreamingResponse(sse_stream(job, header, chat, body.include_usage, sampling.n, logprobs),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        async with cancelled_on_disconnect(job, request):
            return await whole_answer(job, header, chat, n_prompts * sampling.n, sampling.n, logprobs)


# ---- OpenAI's response shapes ---------------------------------------------------------------------

async def whole_answer(job: Job, header: dict, chat: bool, n_choices: int, n: int,
                       logprobs: bool = False) -> dict | JSONResponse:
    texts = [""] * n_choices
    finish: list[TextStats | None] = [None] * n_choices
    entries: list[list[dict]] = [[] for _ in range(n_choices)]
    async for kind, index, value in job.events():
        if kind == "text":
            texts[index] += value
        elif kind == "logprobs":
            entries[index] += value
        else:
            finish[index] = value
    if any(f is None for f in finish):  # the client left: nobody reads this
        return JSONResponse({}, status_code=499)
    choices = [whole_choice(i, t, f.finish_reason, chat, logprobs_body(entries[i], chat) if logprobs else None)
               for i, (t, f) in enumerate(zip(texts, finish))]
    return {**header, "choices": choices, "usage": usage(finish, n)}


def whole_choice(index: int, text: str, finish_reason: str, chat: bool, logprobs: dict | None = None) -> dict:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish_reason}
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


def check_logprobs(value: int | None, param: str, limit: int) -> int | None:
    if value is not None and not 0 <= value <= limit:
        raise APIError(400, f"{param} must be between 0 and {limit}, got {value}", param=param)
    return value


def logprobs_body(entries: list[dict], chat: bool, offset: int = 0) -> dict:
    """Tokens' log-probabilities in OpenAI's shape: chat's ``{"content": [entry]}``, or the legacy
    completions' parallel lists (``text_offset``: where each token starts, counted from ``offset``)."""
    if chat:
        return {"content": entries, "refusal": None}
    starts = []
    for e in entries:
        starts.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": starts}


def usage(finished: Sequence[TextStats], n: int) -> dict:
    """OpenAI counts each prompt once however many choices it has."""
    prompt = sum(s.prompt_tokens for s in finished[::n])
    completion = sum(s.completion_tokens for s in finished)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(data: dict) -> str:
    return "data: " + json.dumps(data) + "\n\n"


async def sse_stream(job: Job, header: dict, chat: bool, include_usage: bool, n: int,
                     logprobs: bool = False) -> AsyncIterator[str]:
    """OpenAI's streaming format: ``data: {chunk}`` events, a usage chunk if asked, then ``data: [DONE]``.

    With ``logprobs``, each chunk carries the entries of the tokens since the previous chunk of its choice."""
    chunk_object = "chat.completion.chunk" if chat else "text_completion"
    finished: dict[int, TextStats] = {}
    started: set[int] = set()
    pending: dict[int, list[dict]] = {}  # log-probabilities not yet sent, per choice
    offsets: dict[int, int] = {}  # characters sent per choice (completions' text_offset)

    def entries(index: int, text: str = "") -> dict | None:
        if not logprobs:
            return None
        body = logprobs_body(pending.pop(index, []), chat, offsets.get(index, 0))
        offsets[index] = offsets.get(index, 0) + len(text)
        return body

    def chunk(choice: dict) -> str:
        return sse({**header, "object": chunk_object, "choices": [choice]})

    try:
        async for kind, index, value in job.events():
            if chat and index not in started:  # the first chunk of a chat choice announces the role
                started.add(index)
                yield chunk({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})
            if kind == "logprobs":  # sent with the text they belong to
                pending.setdefault(index, []).extend(value)
            elif kind == "text":
                body = {"delta": {"content": value}} if chat else {"text": value}
                yield chunk({"index": index, **body, "logprobs": entries(index, value), "finish_reason": None})
            else:
                finished[index] = value
                body = {"delta": {}} if chat else {"text": ""}
                yield chunk({"index": index, **body, "logprobs": entries(index), "finish_reason": value.finish_reason})
    except APIError as e:  # headers are sent: report in-stream, as OpenAI does, and end without [DONE]
        yield sse(e.body())
        return
    if include_usage:
        stats = [finished[i] for i in sorted(finished)]
        yield sse({**header, "object": chunk_object, "choices": [], "usage": usage(stats, n)})
    yield "data: [DONE]\n\n"


# ---- errors, in OpenAI's shape ------------------------------------------------------------------

async def api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc, path=request.url.path)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """pydantic's first complaint, as a 422 naming the field (a body that is not JSON at all: 400)."""
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return error_response(APIError(400, f"the request body is not valid JSON: {first.get('msg', '')}"),
                              path=request.url.path)
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = f"{param + ': ' if param else ''}{first.get('msg', 'invalid request')}"
    status = 400 if request.url.path.startswith(OLLAMA_PREFIX) else 422  # Ollama: a 400 for any bad field
    return error_response(APIError(status, message, param=param, code="invalid_value"), path=request.url.path)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
    return error_response(APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None),
                          path=request.url.path)


async def gptlab_error(request: Request, exc: GptlabError) -> JSONResponse:
    return error_response(APIError(400, str(exc)), path=request.url.path)


def add_error_handlers(app: FastAPI) -> None:
    for kind, handler in ((APIError, api_error), (RequestValidationError, validation_error),
                          (StarletteHTTPException, http_error), (GptlabError, gptlab_error)):
        app.add_exception_handler(kind, handler)
