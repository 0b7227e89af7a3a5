"""Ollama's API beside OpenAI's, over the same engine, so Ollama's clients work unchanged against gptlab serve.

    POST /api/generate   a prompt -> its continuation (laid out by the model's prompt style unless ``raw``)
    POST /api/chat       messages -> the assistant's answer
    GET  /api/tags       the one served model, as Ollama lists its local models
    POST /api/show       that model's details (architecture, context, parameter count)
    GET  /api/version    the Ollama API version these routes follow

Both generation routes stream NDJSON by default (one JSON object per line, ``"done": false`` pieces, then
a ``"done": true`` line with the counts and durations), or answer one JSON object with ``"stream": false``.
``options`` holds the sampling settings (temperature, top_k, top_p, min_p, seed, num_predict, stop,
repeat_penalty, presence_penalty, frequency_penalty); the ones gptlab cannot honour (``num_ctx``,
``mirostat``, ...) are ignored with a log line, as Ollama ignores unknown ones. A request that leaves a
setting out gets Ollama's default (temperature 0.8, top_k 40, top_p 0.9). Errors are Ollama's shape,
``{"error": "message"}`` (``guards.error_response``), with the same status codes as the /v1 routes, and the
API key rule of the /v1 routes applies.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from gptlab.errors import GptlabError
from gptlab.serve.engine import Engine, Job
from gptlab.serve.guards import cancelled_on_disconnect
from gptlab.serve.schemas import APIError, Bool, Float, Int, SamplingFields, request_sampling, unsupported

log = logging.getLogger("gptlab")

OLLAMA_API_VERSION = "0.6.3"  # the Ollama release whose API these routes follow
NDJSON = "application/x-ndjson"
OLLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}  # Ollama's own, for a request that does not say
# Ollama's option name -> the /v1 field that means the same (request_sampling checks it)
OPTION_FIELDS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "seed": "seed",
                 "num_predict": "max_tokens", "stop": "stop", "repeat_penalty": "repetition_penalty",
                 "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}


# ---- request bodies -------------------------------------------------------------------------------

class Options(BaseModel):
    """The options gptlab honours, typed; any other name is kept aside, logged and ignored."""

    model_config = ConfigDict(extra="allow")
    temperature: Float | None = None
    top_k: Int | None = None
    top_p: Float | None = None
    min_p: Float | None = None
    seed: Int | None = None
    num_predict: Int | None = None
    stop: list[str] | str | None = None
    repeat_penalty: Float | None = None
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None


class OllamaFields(BaseModel):
    model: str | None = None
    stream: Bool = True
    options: Options | None = None
    format: Any = None
    keep_alive: Any = None  # one model stays loaded: nothing to keep alive
    think: Any = None
    logprobs: Bool | None = None
    top_logprobs: Int | None = None


class GenerateBody(OllamaFields):
    prompt: str = ""
    system: str | None = None
    raw: Bool = False
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[Any] | None = None


class OllamaMessage(BaseModel):
    role: str
    content: str = ""
    images: list[Any] | None = None
    tool_calls: list[Any] | None = None


class ChatBody(OllamaFields):
    messages: list[OllamaMessage] = []
    tools: list[Any] | None = None


class ShowBody(BaseModel):
    model: str | None = None
    name: str | None = None  # the older field name, which clients still send
    verbose: Bool | None = None


def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


# ---- the routes -----------------------------------------------------------------------------------

class OllamaRoutes:
    """Ollama's generation and model routes over one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.served, self.limits = engine, engine.served, engine.limits
        self.modified_at = now()

    def add_to(self, app: FastAPI) -> None:
        app.post("/api/generate")(self.generate)
        app.post("/api/chat")(self.chat)
        app.get("/api/tags")(self.tags)
        app.post("/api/show")(self.show)
        app.get("/api/version")(self.version)

    async def version(self) -> dict:
        return {"version": OLLAMA_API_VERSION}

    async def tags(self) -> dict:
        return {"models": [{"name": self.served.name, "model": self.served.name, "modified_at": self.modified_at,
                            "size": self.size(), "details": self.details()}]}

    async def show(self, body: ShowBody) -> dict:
        self.check_model(body.model or body.name)
        config, style = self.served.model.config, self.served.prompt_style
        info = {"general.architecture": "gpt2", "general.parameter_count": self.served.model.num_parameters(),
                "gpt2.context_length": config.context_length, "gpt2.embedding_length": config.n_embd,
                "gpt2.block_count": config.n_layer, "gpt2.attention.head_count": config.n_head,
                "gpt2.vocab_size": config.vocab_size}
        capabilities = ["completion"] if self.served.classifier is None else []
        return {"modelfile": "", "parameters": "", "template": f"gptlab prompt style {style.name}",
                "details": self.details(), "model_info": info, "capabilities": capabilities,
                "modified_at": self.modified_at}

    async def generate(self, body: GenerateBody, request: Request):
        self.check_generator(body)
        for param in ("suffix", "template", "context", "images"):
            unsupported(param, getattr(body, param))
        if not body.prompt:  # Ollama's way to load a model: an empty prompt answers at once
            return self.loaded(body.stream)
        style = self.served.prompt_style
        prompt, stop = body.prompt, ()
        if not body.raw:
            messages = ([{"role": "system", "content": body.system}] if body.system else [])
            prompt, stop = self.laid_out([*messages, {"role": "user", "content": body.prompt}]), style.stop
        return await self.run(body, request, prompt, stop, chat=False)

    async def chat(self, body: ChatBody, request: Request):
        self.check_generator(body)
        unsupported("tools", body.tools)
        if not body.messages:
            raise APIError(400, "messages is empty: send at least one message")
        for i, m in enumerate(body.messages):
            if m.images:
                raise APIError(400, f"messages[{i}].images: gptlab models read text only")
        prompt = self.laid_out([{"role": m.role, "content": m.content} for m in body.messages])
        return await self.run(body, request, prompt, self.served.prompt_style.stop, chat=True)

    # ---- checks
    def check_model(self, requested: str | None) -> None:
        if not requested:
            raise APIError(400, "model is required: send \"model\": " + json.dumps(self.served.name))
        if requested not in (self.served.name, self.served.name + ":latest"):
            raise APIError(404, f"model {requested!r} not found; this server serves {self.served.name!r}")

    def check_generator(self, body: OllamaFields) -> None:
        self.check_model(body.model)
        if self.served.classifier is not None:
            raise APIError(400, f"{self.served.name} is a classifier; POST /v1/classify instead")
        if body.format:
            unsupported("format", body.format)
        if body.think:
            unsupported("think", body.think)

    def laid_out(self, messages: list[dict]) -> str:
        try:
            return self.served.prompt_style.chat(messages)
        except GptlabError as e:
            raise APIError(400, str(e)) from None

    def sampling(self, body: OllamaFields):
        """``options`` as a checked ``Sampling``: the /v1 rules, the errors naming Ollama's option."""
        options = body.options or Options()
        ignored = sorted(options.model_extra or {})
        if ignored:
            log.info("ollama options gptlab does not honour, ignored: %s", ", ".join(ignored))
        given = {name: getattr(options, name) for name in OPTION_FIELDS if getattr(options, name) is not None}
        num_predict = given.get("num_predict", self.limits.default_max_tokens)
        if not 1 <= num_predict <= self.limits.max_tokens:
            raise APIError(400, f"num_predict must be between 1 and this server's limit of {self.limits.max_tokens} "
                                f"(gptlab serve --max-tokens-limit), got {num_predict}; gptlab has no unlimited "
                                "(-1) or fill-the-context (-2) setting")
        fields = {OPTION_FIELDS[name]: value for name, value in {**OLLAMA_DEFAULTS, **given}.items()}
        try:
            return request_sampling(SamplingFields(**fields), self.limits, num_predict)
        except APIError as e:
            option = next((o for o, f in OPTION_FIELDS.items() if f == e.param), e.param)
            raise APIError(e.status, f"options.{option}: {e.message}") from None

    # ---- answers
    async def run(self, body: OllamaFields, request: Request, prompt: str, stop: tuple[str, ...], chat: bool):
        sampling = self.sampling(body).with_stop(stop)
        top = body.top_logprobs if body.logprobs else None
        if top is not None and not 0 <= top <= 20:
            raise APIError(400, f"top_logprobs must be between 0 and 20, got {top}")
        job = self.engine.generate([prompt], sampling, logprobs=(top or 0) if body.logprobs else None)
        if body.stream:  # Starlette ends the generator, and so the job, when the client leaves
            return StreamingResponse(ndjson_lines(job, self.served.name, chat, time.perf_counter()),
                                     media_type=NDJSON)
        async with cancelled_on_disconnect(job, request):  # an error here is a status and an error body
            return await whole_reply(ndjson_lines(job, self.served.name, chat, time.perf_counter(), inline=False),
                                     chat)

    def loaded(self, stream: bool) -> dict | StreamingResponse:
        line = {"model": self.served.name, "created_at": now(), "response": "", "done": True, "done_reason": "load"}
        if not stream:
            return line

        async def one() -> AsyncIterator[str]:
            yield json.dumps(line) + "\n"

        return StreamingResponse(one(), media_type=NDJSON)

    def details(self) -> dict:
        return {"parent_model": "", "format": "gptlab", "family": "gpt2", "families": ["gpt2"],
                "parameter_size": parameter_size(self.served.model.num_parameters()), "quantization_level": "F32"}

    def size(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.served.model.parameters())


def parameter_size(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


async def ndjson_lines(job: Job, model: str, chat: bool, started: float, inline: bool = True) -> AsyncIterator[str]:
    """Ollama's stream: a line per piece of text, then the ``done`` line; a failure is an ``error`` line
    (``inline``; else it is raised, for a whole reply to answer with its status)."""
    first: float | None = None
    pending: list[dict] = []

    def line(piece: str, **fields) -> str:
        body = {"model": model, "created_at": now()}
        body.update({"message": {"role": "assistant", "content": piece}} if chat else {"response": piece})
        if pending:
            body["logprobs"] = [dict(e) for e in pending]
            pending.clear()
        return json.dumps({**body, **fields}) + "\n"

    try:
        async for kind, _, value in job.events():
            first = first if first is not None else time.perf_counter()
            if kind == "logprobs":
                pending.extend(value)
            elif kind == "text":
                yield line(value, done=False)
            else:
                end = time.perf_counter()
                ns = lambda seconds: int(seconds * 1e9)  # noqa: E731
                yield line("", done=True, done_reason=value.finish_reason, total_duration=ns(end - started),
                           load_duration=0, prompt_eval_count=value.prompt_tokens,
                           prompt_eval_duration=ns(first - started), eval_count=value.completion_tokens,
                           eval_duration=ns(end - first))
    except APIError as e:  # the status line is sent: report in-stream, as Ollama does
        if not inline:
            raise
        yield json.dumps({"error": e.message}) + "\n"


async def whole_reply(lines: AsyncIterator[str], chat: bool) -> dict | JSONResponse:
    """The stream joined into one object: the done line's fields, with the whole text (and log-probabilities)."""
    text, logprobs, last = "", [], None
    async for raw in lines:
        last = json.loads(raw)
        text += last["message"]["content"] if chat else last["response"]
        logprobs += last.pop("logprobs", [])
    if last is None or not last.get("done"):  # the client left: nobody reads this
        return JSONResponse({}, status_code=499)
    if chat:
        last["message"]["content"] = text
    else:
        last["response"] = text
    return {**last, **({"logprobs": logprobs} if logprobs else {})}
