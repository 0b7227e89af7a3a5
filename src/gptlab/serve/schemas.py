"""What a client sends and how it is refused: OpenAI's request bodies, its error shape, and the checks
that turn a request's sampling fields into a ``Sampling`` for the engine.

The sampling ranges are gptlab's one set of rules (``gptlab.config.check_sampling``, shared with the CLI
and ``gptlab.generate``); only what belongs to the protocol is checked here: ``max_tokens`` against the
server's limits, ``n``, the number of stop strings and the parameters gptlab does not support.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, Any

from pydantic import BaseModel, Strict

from gptlab.config import SamplingConfig, ServeLimits
from gptlab.errors import GptlabError

MAX_STOP_STRINGS = 4  # OpenAI's limit
SEED_LIMIT = 2**63  # seeds are 0 <= seed < 2**63: torch takes up to 2**64 - 1, and each choice adds its index
DEFAULT_TEMPERATURE = 1.0  # OpenAI's, for a request that does not say (gptlab's own default is greedy)


class APIError(Exception):
    """An error answered in OpenAI's JSON shape, ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict | None:
        return {"WWW-Authenticate": "Bearer"} if self.status == 401 else None


# ---- request bodies (types are checked by pydantic: a wrong one is a 422) ---------------------------
# Strict: JSON's true is not the integer 1 (``max_tokens: true``), nor is "5" a number; a float field
# still takes an integer (``temperature: 1``).

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]


class StreamOptions(BaseModel):
    include_usage: Bool = False


class SamplingFields(BaseModel):
    model: str | None = None
    max_tokens: Int | None = None
    temperature: Float | None = None
    top_p: Float | None = None
    top_k: Int | None = None  # not OpenAI's, but common in OpenAI-compatible servers
    n: Int | None = None
    stream: Bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Int | None = None
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    repetition_penalty: Float | None = None  # not OpenAI's: Hugging Face's and vLLM's name and meaning
    min_p: Float | None = None  # not OpenAI's: vLLM's
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    echo: Bool = False
    logprobs: Int | None = None
    suffix: str | None = None
    best_of: Int | None = None


class TextPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: Int | None = None
    logprobs: Bool | None = None
    top_logprobs: Int | None = None
    tools: list[Any] | None = None


class ClassifyRequest(BaseModel):
    model: str | None = None
    input: str | list[str]


# ---- checked settings ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Sampling:
    """A request's checked sampling settings: how to sample each choice, and how many choices per prompt."""

    config: SamplingConfig
    n: int = 1

    @property
    def max_tokens(self) -> int:
        return self.config.max_new_tokens

    def for_choice(self, choice: int) -> SamplingConfig:
        # Each choice gets its own seed so n samples differ, yet the same request repeats exactly.
        seed = None if self.config.seed is None else self.config.seed + choice
        return replace(self.config, seed=seed)

    def with_stop(self, stop: tuple[str, ...]) -> "Sampling":
        """The same settings, also stopping at ``stop`` (a chat prompt style's turn markers)."""
        return replace(self, config=replace(self.config, stop=(*stop, *self.config.stop)))


PENALTIES = ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p")  # SamplingConfig's names


def request_sampling(req: SamplingFields, limits: ServeLimits, max_tokens: int | None) -> Sampling:
    """Out-of-range values become 400s naming the parameter (types were already checked: 422)."""
    max_tokens = check_max_tokens(limits.default_max_tokens if max_tokens is None else max_tokens, limits)
    temperature = DEFAULT_TEMPERATURE if req.temperature is None else req.temperature
    # the fields that the request set; SamplingConfig's defaults for the rest
    given = {name: getattr(req, name) for name in PENALTIES if getattr(req, name) is not None}
    for param, value in (("temperature", temperature), ("top_k", req.top_k), ("top_p", req.top_p), *given.items()):
        try:  # one setting at a time, so the error names the parameter that is wrong
            SamplingConfig(**{param: value})
        except GptlabError as e:
            raise APIError(400, str(e), param=param) from None
    n = 1 if req.n is None else req.n
    if not 1 <= n <= limits.max_n:
        raise APIError(400, f"n must be between 1 and {limits.max_n} (gptlab serve --max-n), got {n}", param="n")
    if req.seed is not None and not 0 <= req.seed < SEED_LIMIT:
        raise APIError(400, f"seed must be an integer in [0, 2**63), got {req.seed}", param="seed")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise APIError(400, f"at most {MAX_STOP_STRINGS} stop sequences, got {len(stop)}", param="stop")
    config = SamplingConfig(max_new_tokens=max_tokens, temperature=temperature, top_k=req.top_k, top_p=req.top_p,
                            seed=req.seed, stop=tuple(s for s in stop if s), **given)
    return Sampling(config, n)


def check_max_tokens(max_tokens: int, limits: ServeLimits) -> int:
    # At least 1: a request for no tokens at all is a mistake here, though `gptlab generate` allows 0.
    if max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    if max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens {max_tokens} is over this server's limit of {limits.max_tokens} "
                            "(gptlab serve --max-tokens-limit)", param="max_tokens")
    return max_tokens


def check_choices(prompts: int, n: int, limits: ServeLimits) -> None:
    """A request's cost is its choices, prompts x n, each a whole generation: at most ``max_choices``."""
    if prompts * n > limits.max_choices:
        raise APIError(400, f"this request asks for {prompts} prompt(s) x n={n} = {prompts * n} choices, over this "
                            f"server's limit of {limits.max_choices} per request (gptlab serve --max-choices)",
                       param="n" if prompts <= limits.max_choices else "prompt", code="too_many_choices")


def unsupported(param: str, value: Any) -> None:
    if value:
        raise APIError(400, f"{param} is not supported by gptlab", param=param)


def non_empty(items: list, param: str) -> list:
    if not items:
        raise APIError(400, f"{param} is an empty list", param=param)
    return items


def chat_messages(body: ChatRequest) -> list[dict]:
    """The request's messages as ``{"role", "content"}`` dicts for a prompt style (``developer`` is ``system``)."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": chat_text(m, i)}
            for i, m in enumerate(non_empty(body.messages, "messages"))]


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
