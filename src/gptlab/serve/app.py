"""The HTTP application: routes, OpenAI's response shapes (whole and streamed), errors and the body limit.

``create_app`` wires an ``Engine`` (which owns the model) to FastAPI; nothing here touches the model.
"""
from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptlab.config import ServeLimits
from gptlab.errors import GptlabError
from gptlab.generate import TextStats
from gptlab.serve.engine import Disconnected, Engine, Job, ServedModel
from gptlab.serve.schemas import (APIError, ChatRequest, ClassifyRequest, CompletionRequest, Sampling, SamplingFields,
                                  chat_messages, non_empty, request_sampling, unsupported)

CHAT_PAGE = "chat.html"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(served: ServedModel, api_key: str | None = None, limits: ServeLimits = ServeLimits()) -> FastAPI:
    """The FastAPI application; its engine runs while the app does (lifespan)."""
    engine = Engine(served, limits)
    app = FastAPI(title="gptlab", version="1", lifespan=running(engine), docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.served, app.state.engine, app.state.worker, app.state.limits = served, engine, engine.worker, limits
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_request_bytes)
    add_error_handlers(app)
    Routes(engine, api_key).add_to(app)
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
        app.get("/health")(self.health)  # never behind the API key
        v1 = [Depends(self.require_api_key)]
        app.get("/v1/models", dependencies=v1)(self.list_models)
        app.get("/v1/models/{model_id:path}", dependencies=v1)(self.retrieve_model)
        app.post("/v1/completions", dependencies=v1)(self.completions)
        app.post("/v1/chat/completions", dependencies=v1)(self.chat_completions)
        app.post("/v1/classify", dependencies=v1)(self.classify)

    async def chat_page(self) -> HTMLResponse:
        return HTMLResponse(resources.files("gptlab").joinpath("assets", CHAT_PAGE).read_text(encoding="utf-8"))

    async def health(self) -> dict:
        return {"status": "ok", "model": self.served.name, **self.engine.status()}

    async def list_models(self) -> dict:
        return {"object": "list", "data": [self.model_entry()]}

    async def retrieve_model(self, model_id: str) -> dict:
        self.check_model(model_id)
        return self.model_entry()

    async def completions(self, body: CompletionRequest, request: Request):
        self.check_generator(body.model)
        for param in ("logprobs", "suffix"):
            unsupported(param, getattr(body, param))
        if body.best_of not in (None, 1):
            unsupported("best_of", body.best_of)
        sampling = request_sampling(body, self.limits, body.max_tokens)
        prompts = non_empty([body.prompt] if isinstance(body.prompt, str) else body.prompt, "prompt")
        job = self.engine.generate(prompts, sampling, echo=body.echo)
        return await self.answer(job, request, body, sampling, len(prompts), chat=False)

    async def chat_completions(self, body: ChatRequest, request: Request):
        self.check_generator(body.model)
        unsupported("logprobs", body.logprobs)
        unsupported("tools", body.tools)
        style = self.served.prompt_style
        messages = chat_messages(body)
        try:
            prompt = style.chat(messages)
        except GptlabError as e:
            raise APIError(400, str(e), param="messages") from None
        sampling = request_sampling(body, self.limits, body.max_completion_tokens or body.max_tokens)
        sampling = sampling.with_stop(style.stop)
        job = self.engine.generate([prompt], sampling)
        return await self.answer(job, request, body, sampling, 1, chat=True)

    async def classify(self, body: ClassifyRequest, request: Request):
        self.check_model(body.model)
        if self.served.classifier is None:
            raise APIError(400, f"{self.served.name} is not a classifier run (its config.json has no "
                                "\"stage\": \"classifier\"); use /v1/completions", param="model")
        texts = non_empty([body.input] if isinstance(body.input, str) else body.input, "input")
        event = await self.engine.classify(texts).next_event(request.is_disconnected)
        if event is None:
            return JSONResponse({}, status_code=499)
        return {"object": "list", "model": self.served.name, **event[1]}

    # checks
    def require_api_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
        if not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

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
                     chat: bool):
        """The job's choices as one JSON body, or as server-sent events when the request streams."""
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        header = {"id": ident, "object": "chat.completion" if chat else "text_completion",
                  "created": int(time.time()), "model": self.served.name}
        if body.stream:
            return StreamingResponse(sse_stream(job, header, chat, body.include_usage, sampling.n),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        return await whole_answer(job, request.is_disconnected, header, chat, n_prompts * sampling.n, sampling.n)


# ---- OpenAI's response shapes ---------------------------------------------------------------------

async def whole_answer(job: Job, disconnected: Disconnected, header: dict, chat: bool, n_choices: int,
                       n: int) -> dict | JSONResponse:
    texts = [""] * n_choices
    finish: list[TextStats | None] = [None] * n_choices
    async for kind, index, value in job.events(disconnected):
        if kind == "text":
            texts[index] += value
        else:
            finish[index] = value
    if any(f is None for f in finish):  # the client left: nobody reads this
        return JSONResponse({}, status_code=499)
    choices = [whole_choice(i, t, f.finish_reason, chat) for i, (t, f) in enumerate(zip(texts, finish))]
    return {**header, "choices": choices, "usage": usage(finish, n)}


def whole_choice(index: int, text: str, finish_reason: str, chat: bool) -> dict:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


def usage(finished: Sequence[TextStats], n: int) -> dict:
    """OpenAI counts each prompt once however many choices it has."""
    prompt = sum(s.prompt_tokens for s in finished[::n])
    completion = sum(s.completion_tokens for s in finished)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(data: dict) -> str:
    return "data: " + json.dumps(data) + "\n\n"


async def sse_stream(job: Job, header: dict, chat: bool, include_usage: bool, n: int) -> AsyncIterator[str]:
    """OpenAI's streaming format: ``data: {chunk}`` events, a usage chunk if asked, then ``data: [DONE]``."""
    chunk_object = "chat.completion.chunk" if chat else "text_completion"
    finished: dict[int, TextStats] = {}
    started: set[int] = set()

    def chunk(choice: dict) -> str:
        return sse({**header, "object": chunk_object, "choices": [choice]})

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
        yield sse(e.body())
        return
    if include_usage:
        stats = [finished[i] for i in sorted(finished)]
        yield sse({**header, "object": chunk_object, "choices": [], "usage": usage(stats, n)})
    yield "data: [DONE]\n\n"


# ---- errors, in OpenAI's shape ------------------------------------------------------------------

def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


async def api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """pydantic's first complaint, as a 422 naming the field (a body that is not JSON at all: 400)."""
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return error_response(APIError(400, f"the request body is not valid JSON: {first.get('msg', '')}"))
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = f"{param + ': ' if param else ''}{first.get('msg', 'invalid request')}"
    return error_response(APIError(422, message, param=param, code="invalid_value"))


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
    return error_response(APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None))


async def gptlab_error(request: Request, exc: GptlabError) -> JSONResponse:
    return error_response(APIError(400, str(exc)))


def add_error_handlers(app: FastAPI) -> None:
    for kind, handler in ((APIError, api_error), (RequestValidationError, validation_error),
                          (StarletteHTTPException, http_error), (GptlabError, gptlab_error)):
        app.add_exception_handler(kind, handler)


# ---- the body limit -----------------------------------------------------------------------------

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
            return await error_response(too_large)(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await error_response(too_large)(scope, receive, send)
            if not message.get("more_body", False):
                break
        await self.app(scope, replay(b"".join(chunks), receive), send)


def replay(body: bytes, receive):
    """An ASGI receive that hands the application ``body`` as one message, then whatever the client sends next."""
    replayed = False

    async def receive_replayed():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # afterwards: http.disconnect, which cancels a stream

    return receive_replayed
