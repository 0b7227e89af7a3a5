"""Every typed setting of gptlab, in one torch-free module: the one source of defaults and limits.

The model's shape (``GPTConfig`` and its named presets), the training loop's settings (``TrainConfig``),
sampling (``SamplingConfig``) and the server's limits (``ServeLimits``). The command line builds its
options and ``--help`` defaults from these dataclasses, the Python API takes them as they are, and a run
directory stores them, so ``--resume`` replays exactly what was used. Nothing here imports torch, so
``gptlab --help`` stays fast.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, replace

from gptlab.errors import GptlabError
from gptlab.prompts import PROMPT_STYLES


def check_finite(name: str, value: float | None) -> None:
    """NaN and infinity are never a sensible setting: refuse them with the option's name."""
    if value is not None and not math.isfinite(value):
        raise GptlabError(f"{name.replace('_', '-')} must be a finite number, got {value}")


def check_split_fractions(train_fraction: float, test_fraction: float) -> None:
    """The records' split in file order: a training part, a test part, the rest validates."""
    for name, value in (("train-fraction", train_fraction), ("test-fraction", test_fraction)):
        if not 0.0 <= value <= 1.0:  # also refuses NaN
            raise GptlabError(f"{name} must be in [0, 1], got {value}")
    if train_fraction <= 0 or train_fraction + test_fraction > 1.0:
        raise GptlabError(f"train-fraction must be positive and train + test at most 1, got "
                          f"{train_fraction} + {test_fraction}")


# ---- the model ----------------------------------------------------------------------------------

INIT_STYLES = ("gpt2", "book")


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    dropout: float = 0.0
    qkv_bias: bool = True
    tie_weights: bool = True
    # How fresh weights are drawn. "gpt2": N(0, 0.02), residual projections scaled by depth (GPT-2's paper,
    # nanoGPT). "book": PyTorch's defaults, as the LLMs-from-scratch book's GPTModel gets them (embeddings
    # N(0, 1), linears Kaiming-uniform); from a seed, layer by layer the same draws as the book's model.
    init_style: str = "gpt2"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_embd", "n_layer", "n_head"):
            if getattr(self, name) <= 0:
                raise GptlabError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise GptlabError(f"model config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:  # also refuses NaN
            raise GptlabError(f"model config: dropout must be in [0, 1), got {self.dropout}")
        if self.init_style not in INIT_STYLES:
            raise GptlabError(f"model config: init style must be one of {', '.join(INIT_STYLES)}; got {self.init_style!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        """A named configuration, with any field overridden: ``GPTConfig.preset("gpt2-small", dropout=0.1)``."""
        if name not in PRESETS:
            raise GptlabError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise GptlabError(f"unknown config field(s) {sorted(unknown)}; valid: {[f.name for f in fields(cls)]}")
        return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


PRESETS: dict[str, GPTConfig] = {
    # Test-sized: runs a training step in milliseconds.
    "tiny": GPTConfig(context_length=64, n_embd=32, n_layer=2, n_head=2),
    "mini": GPTConfig(context_length=128, n_embd=192, n_layer=4, n_head=4),
    # What `make demo` trains on the-verdict.txt. The 50,257-wide output head costs most of the compute at
    # this width, so depth is cheap: 8 layers memorise the text in fewer tokens than 4 wider ones would.
    "demo": GPTConfig(context_length=128, n_embd=192, n_layer=8, n_head=3),
    "small": GPTConfig(context_length=256, n_embd=384, n_layer=6, n_head=6),
    # OpenAI's GPT-2 sizes (Hugging Face: openai-community/gpt2, -medium, -large, -xl).
    "gpt2-small": GPTConfig(),
    "gpt2-medium": GPTConfig(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPTConfig(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPTConfig(n_embd=1600, n_layer=48, n_head=25),
    # The LLMs-from-scratch book's GPT_CONFIG_124M (chapter 4-5): GPT-2 small's shape with a 256-token context,
    # its own output head (163M parameters in all), no q/k/v bias, dropout 0.1, PyTorch's initialisation.
    "book-124m": GPTConfig(context_length=256, dropout=0.1, qkv_bias=False, tie_weights=False, init_style="book"),
}


# ---- training -----------------------------------------------------------------------------------

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """How to train; a stage fills in what it knows and the user overrides the rest.

    Each field's ``help`` metadata is its ``--help`` line; the CLI appends the stage's default.
    """

    epochs: float | None = field(default=1.0, metadata={"help": "passes over the training data"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps; overrides --epochs"})
    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=4e-4, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr as a fraction of --lr (cosine decay)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay of weight matrices"})
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={
        "help": "AdamW betas", "flag": "--adam-betas", "metavar": ("B1", "B2")})
    grad_clip: float | None = field(default=1.0, metadata={"help": "clip the gradient norm; 0 disables"})
    eval_interval: int | None = field(default=50, metadata={
        "help": "steps between evaluations and checkpoints (none: once per epoch)"})
    log_interval: int | None = field(default=None, metadata={
        "help": "steps between train-loss rows in metrics.csv (none: at evaluations only)"})
    eval_batches: int | None = field(default=None, metadata={"help": "validation batches per evaluation (none: all)"})
    eval_train_batches: int | None = field(default=None, metadata={
        "help": "also score this many training batches in eval mode (no dropout) at each evaluation, as the "
                "LLMs-from-scratch book reports its train loss (column train_eval_loss; none: off)"})
    seed: int = field(default=123, metadata={"help": "random seed"})
    shuffle: bool = True
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps"})
    precision: str = field(default="auto", metadata={
        "help": "autocast precision; auto is bf16 on a GPU with bf16 and, from 20M parameters, on a CPU with native "
                "bf16 (avx512_bf16, amx_bf16), else fp32; bf16 is refused where the device lacks it",
        "choices": PRECISIONS})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the model: for GPUs, after a warm-up. On the CPU it loses gptlab's oneDNN kernels "
                "(0.55x the default at the 124M shape; BENCHMARKS.md)"})
    fsdp: bool = field(default=False, metadata={
        "help": "under torchrun, shard the weights, gradients and optimizer state over the ranks (FSDP2) instead "
                "of a full copy on each (DDP); README: Train on several GPUs or machines"})

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "eval_interval", "log_interval", "eval_batches", "eval_train_batches"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise GptlabError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("epochs", "lr", "min_lr_ratio", "weight_decay", "grad_clip"):
            check_finite(name, getattr(self, name))
        if self.max_steps is None and (self.epochs is None or self.epochs <= 0):
            raise GptlabError("give a positive number of epochs or max-steps")
        if self.max_steps is not None and self.max_steps <= 0:
            raise GptlabError(f"max-steps must be positive, got {self.max_steps}")
        if self.lr <= 0:
            raise GptlabError(f"learning rate must be positive, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise GptlabError(f"min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise GptlabError(f"warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0:
            raise GptlabError(f"weight-decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise GptlabError(f"grad-clip must be >= 0 (0 disables), got {self.grad_clip}")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise GptlabError(f"adam betas must be two numbers in [0, 1), got {' '.join(map(str, self.betas))}")
        if self.precision not in PRECISIONS:
            raise GptlabError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        if not 0 <= self.seed < 2**63:  # torch's generators take 64 bits; the epoch is added to it
            raise GptlabError(f"seed must be between 0 and 2**63 - 1, got {self.seed}")


# ---- sampling -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each new token: the one set of rules the CLI, ``generate`` and the server check against."""

    max_new_tokens: int = field(default=100, metadata={"help": "tokens to generate"})
    temperature: float = field(default=0.0, metadata={"help": "0 is greedy; higher is more random"})
    top_k: int | None = field(default=None, metadata={"help": "sample only from the k most likely tokens"})
    top_p: float | None = field(default=None, metadata={
        "help": "sample only from the smallest set of tokens holding this probability"})
    seed: int | None = field(default=None, metadata={"help": "random seed for sampling"})
    stop: tuple[str, ...] = field(default=(), metadata={"help": "stop when this text appears (repeatable)"})
    # Penalties and min-p: gptlab.sampling applies them in a fixed, documented order (README: Decoding).
    repetition_penalty: float = field(default=1.0, metadata={
        "help": "Hugging Face's: divide the logit of every token already in the text (prompt included) by this "
                "(multiply a negative one); > 1 discourages repeats, 1 is off"})
    presence_penalty: float = field(default=0.0, metadata={
        "help": "OpenAI's: subtract this from the logit of every token generated so far; -2 to 2, 0 is off"})
    frequency_penalty: float = field(default=0.0, metadata={
        "help": "OpenAI's: subtract this times how often each token was generated so far; -2 to 2, 0 is off"})
    min_p: float | None = field(default=None, metadata={
        "help": "sample only tokens with at least this fraction of the most likely token's probability (0 to 1)"})
    # Beam search (Hugging Face's, token for token); greedy only.
    num_beams: int = field(default=1, metadata={"help": "beam search with this many beams (1: none); greedy only"})
    length_penalty: float | None = field(default=None, metadata={
        "help": "beam search: a finished beam scores its log-probability / length**this; > 0 favours longer, "
                "< 0 shorter (default with beams: 1.0); an error without --num-beams"})
    early_stopping: str | bool | None = field(default=None, metadata={
        "help": "beam search: true stops once num-beams beams have finished; false (default with beams) also stops "
                "when no running beam is likely to do better; never stops only when none can",
        "choices": ("true", "false", "never")})
    num_return_sequences: int = field(default=1, metadata={
        "help": "answers to return: the best beams with --num-beams (at most that many), else independent samples "
                "(needs --temperature > 0)"})
    # Faster decoding with the same output: a cheap guess of the next tokens, checked by the model in one step.
    draft: str | None = field(default=None, metadata={
        "help": "speculative decoding: a smaller model with the same tokenizer (run directory, ...) proposes tokens "
                "that the model checks; greedy output is unchanged, sampled output keeps its distribution"})
    draft_tokens: int = field(default=4, metadata={
        "help": "tokens the draft model or the prompt lookup proposes per step"})
    prompt_lookup: int | None = field(default=None, metadata={
        "help": "prompt-lookup decoding: propose the tokens that followed an earlier occurrence of the last N (down to "
                "1) tokens; no draft model, same output", "metavar": "N"})

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p, self.max_new_tokens)
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "early_stopping", early_stopping_value(self.early_stopping))
        check_decoding(self.temperature, self.top_k, self.top_p, self.num_beams, self.length_penalty,
                       self.early_stopping, self.num_return_sequences, self.repetition_penalty,
                       self.presence_penalty, self.frequency_penalty, self.min_p, self.draft is not None,
                       self.draft_tokens, self.prompt_lookup)

    def kwargs(self) -> dict:
        """The keyword arguments of ``gptlab.generate.stream_text``."""
        return asdict(self)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    """Raise a GptlabError naming the first sampling setting that is out of range."""
    if not math.isfinite(temperature) or temperature < 0:
        raise GptlabError(f"temperature must be >= 0 and finite, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise GptlabError(f"top-k must be positive, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:  # also refuses NaN
        raise GptlabError(f"top-p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise GptlabError(f"max-new-tokens must be >= 0, got {max_new_tokens}")


EARLY_STOPPING = {"true": True, "false": False, "never": "never"}  # Hugging Face's three values


def early_stopping_value(value: bool | str | None) -> bool | str | None:
    """True, False or "never" from what a user may write ("true", "False", ...); None stays None."""
    if value is None or value is True or value is False:
        return value
    if isinstance(value, str) and value.lower() in EARLY_STOPPING:
        return EARLY_STOPPING[value.lower()]
    raise GptlabError(f"early-stopping must be true, false or never, got {value!r}")


def check_decoding(temperature: float, top_k: int | None, top_p: float | None, num_beams: int = 1,
                   length_penalty: float | None = None, early_stopping: bool | str | None = None,
                   num_return_sequences: int = 1, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                   frequency_penalty: float = 0.0, min_p: float | None = None, draft: bool = False,
                   draft_tokens: int = 4, prompt_lookup: int | None = None) -> None:
    """Raise a GptlabError naming the first decoding setting that is out of range or cannot be honoured together.

    ``draft``: whether a draft model is given (its tokenizer and context are checked where it is loaded).
    """
    if not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise GptlabError(f"repetition-penalty must be a positive number (1 is off), got {repetition_penalty}")
    for name, value in (("presence-penalty", presence_penalty), ("frequency-penalty", frequency_penalty)):
        if not -2.0 <= value <= 2.0:  # OpenAI's range; also refuses NaN
            raise GptlabError(f"{name} must be between -2 and 2 (0 is off), got {value}")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise GptlabError(f"min-p must be in [0, 1], got {min_p}")
    if num_beams < 1:
        raise GptlabError(f"num-beams must be at least 1 (1 is no beam search), got {num_beams}")
    if num_return_sequences < 1:
        raise GptlabError(f"num-return-sequences must be at least 1, got {num_return_sequences}")
    check_finite("length_penalty", length_penalty)
    early_stopping_value(early_stopping)
    if num_beams == 1:
        # Refused rather than ignored: without beams nothing would change, and a silent no-op hides the mistake.
        for name, value in (("length-penalty", length_penalty), ("early-stopping", early_stopping)):
            if value is not None:
                raise GptlabError(f"{name} only applies to beam search; add --num-beams N (N > 1) or drop it")
        if num_return_sequences > 1 and temperature <= 0:
            raise GptlabError(f"greedy decoding has one answer: num-return-sequences {num_return_sequences} needs "
                              f"--num-beams {num_return_sequences} or more, or --temperature > 0")
    else:
        if temperature > 0:
            raise GptlabError(f"beam search is greedy: it cannot sample at temperature {temperature}; "
                              "drop --temperature or --num-beams")
        for name, value in (("top-k", top_k), ("top-p", top_p), ("min-p", min_p)):
            if value is not None:
                raise GptlabError(f"{name} filters what is sampled, and beam search does not sample; drop {name} "
                                  "or --num-beams")
        if num_return_sequences > num_beams:
            raise GptlabError(f"num-return-sequences ({num_return_sequences}) cannot exceed num-beams ({num_beams})")
        if draft or prompt_lookup is not None:
            raise GptlabError("beam search cannot be combined with --draft or --prompt-lookup; choose one")
    if draft and prompt_lookup is not None:
        raise GptlabError("give --draft or --prompt-lookup, not both")
    if draft_tokens < 1:
        raise GptlabError(f"draft-tokens must be at least 1, got {draft_tokens}")
    if prompt_lookup is not None and prompt_lookup < 1:
        raise GptlabError(f"prompt-lookup must be at least 1 (the longest n-gram to match), got {prompt_lookup}")


# ---- serving ------------------------------------------------------------------------------------

DEFAULT_HOST = "127.0.0.1"  # this machine only
DEFAULT_PORT = 8000
API_KEY_ENV = "GPTLAB_API_KEY"  # the server's API key when --api-key is not given


def default_serve_threads() -> int:
    """torch's threads for ``gptlab serve`` (``--threads``): half the cores this process may use, at least 1.

    The server's threads are not only torch's: the event loop, the generation worker and the clients'
    connections need a core too, and torch's pool spins while it waits. With every core given to torch
    (its default) a busy 2-core machine served several times fewer requests (BENCHMARKS.md, serving).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // 2)


@dataclass(frozen=True)
class ServeLimits:
    """Bounds on what one request may cost; each is a ``gptlab serve`` option."""

    max_tokens: int = field(default=1024, metadata={"help": "most new tokens a request may ask for (per choice)",
                                                    "flag": "--max-tokens-limit"})
    default_max_tokens: int = field(default=256, metadata={"help": "new tokens when a request does not say"})
    max_request_bytes: int = field(default=1_000_000, metadata={"help": "largest request body in bytes"})
    max_n: int = field(default=4, metadata={"help": "most choices per prompt"})
    max_queue: int = field(default=64, metadata={"help": "requests that may wait; more get 503"})
    max_active: int = field(default=8, metadata={"help": "choices decoded at once, as one continuous batch"})
    # What one request may hold: each choice is a whole generation, so prompts x n is the request's cost.
    max_choices: int = field(default=16, metadata={"help": "most choices one request may ask for (prompts x n)"})
    max_texts: int = field(default=256, metadata={"help": "most texts one /v1/classify request may hold"})
    # Connections: a client that is slow, silent or one of too many must not hold the server's memory.
    max_connections: int = field(default=128, metadata={"help": "open connections at once; more get 503"})
    header_timeout: float = field(default=10.0, metadata={
        "help": "seconds a client has to send a request's headers (from connecting, or the last response)"})
    body_timeout: float = field(default=30.0, metadata={"help": "seconds a client has to send a request's body"})
    idle_timeout: float = field(default=5.0, metadata={"help": "seconds a connection may stay silent between requests"})

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", float):  # a timeout: any positive number of seconds
                if not (math.isfinite(value) and value > 0):
                    raise GptlabError(f"serve limit {f.name} must be a positive number of seconds, got {value}")
            elif value < 1:
                raise GptlabError(f"serve limit {f.name} must be at least 1, got {value}")
        if self.default_max_tokens > self.max_tokens:
            raise GptlabError(f"default max tokens ({self.default_max_tokens}) is above the limit ({self.max_tokens})")

    @classmethod
    def from_options(cls, **given: int) -> "ServeLimits":
        """The limits with ``given`` ones changed; a lower ``max_tokens`` alone pulls the default down with it."""
        if "max_tokens" in given and "default_max_tokens" not in given:
            given["default_max_tokens"] = min(cls.default_max_tokens, given["max_tokens"])
        return cls(**given)


# ---- the training stages --------------------------------------------------------------------------
# Each stage's settings (what it reads and builds) and its training defaults. A run directory stores
# both, so ``--resume`` replays them; the CLI shows these defaults in ``--help``.

def _opt(default, help: str, **extra):
    """A field with its ``--help`` line (and argparse extras: ``choices``, ``metavar``, ``flag``)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for a sequence default")
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class ModelOptions:
    """Changes to a preset for a model built from random weights; a loaded model may change only its dropout.

    Shared by the training stages (each settings class below extends it), so every stage offers them.
    """

    context_length: int | None = _opt(None, "override the preset's context length")
    dropout: float | None = _opt(None, "override the model's dropout")
    init_style: str | None = _opt(None, "how fresh weights are drawn: gpt2 (N(0, 0.02), GPT-2's) or book (PyTorch's "
                                        "defaults, the LLMs-from-scratch book's; default: the preset's)",
                                  choices=INIT_STYLES)
    tie_weights: bool | None = _opt(None, "give the model its own output head instead of sharing the token "
                                          "embedding (the book's GPTModel)", flag="--no-tie-weights")
    qkv_bias: bool | None = _opt(None, "no bias on the q/k/v projection (the book's qkv_bias=False)",
                                 flag="--no-qkv-bias")

    def __post_init__(self) -> None:
        check_finite("dropout", self.dropout)

    def model_overrides(self) -> dict:
        """The ``GPTConfig`` fields to change; None means: keep the preset's (or the loaded model's)."""
        return {f.name: getattr(self, f.name) for f in fields(ModelOptions)}


# ---- LoRA adapters ---------------------------------------------------------------------------------

LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "head")  # gptlab.lora.target_layers
# Every projection inside the blocks: QLoRA (Dettmers et al. 2023) found adapting all of them needed to match
# full fine-tuning, where attention alone (Hu et al.; PEFT's GPT-2 default, c_attn) falls short. The head is
# left out: it is tied to the token embedding, and a vocabulary-wide adapter would be a third of the adapter.
DEFAULT_LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@dataclass(frozen=True)
class LoRAConfig:
    """One adapter's shape: what a LoRA run stores in its config.json and PEFT's adapter_config.json holds."""

    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank, as in PEFT and litgpt
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", _lora_targets(self.targets))
        check_finite("lora-alpha", self.alpha)
        check_finite("lora-dropout", self.dropout)
        if not isinstance(self.rank, int) or self.rank < 1:
            raise GptlabError(f"lora-rank must be a positive whole number (8 is usual), got {self.rank}")
        if self.alpha <= 0:
            raise GptlabError(f"lora-alpha must be positive (the update is scaled by alpha / rank), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise GptlabError(f"lora-dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def _lora_targets(given) -> tuple[str, ...]:
    """Targets as a tuple, from names given one by one or comma-separated; an unknown or repeated one is an error."""
    if isinstance(given, str):
        given = (given,)
    names = [n.strip() for item in given for n in str(item).split(",") if n.strip()]
    unknown = [n for n in names if n not in LORA_TARGETS]
    if unknown or not names:
        raise GptlabError(f"lora-targets: unknown {', '.join(map(repr, unknown)) or '(none given)'}; choose from "
                          f"{', '.join(LORA_TARGETS)} (comma-separated or repeated)")
    if len(set(names)) != len(names):
        raise GptlabError(f"lora-targets names a layer twice: {', '.join(names)}")
    return tuple(n for n in LORA_TARGETS if n in names)  # one order, so a resume compares equal


@dataclass(frozen=True)
class LoRAOptions:
    """``--lora`` and its shape; shared by the stages that fine-tune a loaded model (each settings class extends it)."""

    lora: bool = _opt(False, "train LoRA adapters on the frozen model instead of its weights: the run holds only the "
                             "adapters (a few MB) and a reference to the base")
    lora_rank: int = _opt(LoRAConfig.rank, "the adapters' rank")
    lora_alpha: float = _opt(LoRAConfig.alpha, "the update is scaled by alpha / rank (PEFT, litgpt)")
    lora_dropout: float = _opt(LoRAConfig.dropout, "dropout on the adapters' input")
    lora_targets: tuple[str, ...] = _opt(DEFAULT_LORA_TARGETS, "layers that get an adapter, comma-separated: "
                                         + ", ".join(LORA_TARGETS) + " (the output head; a classifier's new head "
                                         "trains in full anyway)", metavar="LAYERS")

    def __post_init__(self) -> None:
        getattr(super(), "__post_init__", lambda: None)()
        object.__setattr__(self, "lora_targets", _lora_targets(self.lora_targets))
        self.lora_config()  # its checks, also when --lora is not given: a bad value is never stored

    def lora_config(self) -> LoRAConfig | None:
        """The adapter to add, or None without ``--lora``."""
        config = LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets)
        return config if self.lora else None


@dataclass(frozen=True)
class PretrainSettings(LoRAOptions, ModelOptions):
    # not required by the parser: a --resume takes the stored one
    data: str = _opt(None, "text file, folder, or token file from `gptlab prepare` (required; --resume: the run's)")
    preset: str = _opt("demo", "model size", choices=tuple(PRESETS))
    init: str | None = _opt(None, "start from this model (run directory, ...) instead of random weights")
    tokenizer: str | None = _opt(None, "'gpt2' (default) or a saved tokenizer directory")
    stride: int | None = _opt(None, "tokens between training windows (default: the context length)")
    val_fraction: float = _opt(0.1, "last fraction of tokens for validation")
    sample_prompt: str | None = _opt("Every effort moves you", "prompt sampled at each evaluation ('' for none)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.val_fraction < 1.0:
            raise GptlabError(f"val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.stride is not None and self.stride <= 0:
            raise GptlabError(f"stride must be positive, got {self.stride}")
        if self.lora and self.init is None:
            raise GptlabError("--lora adapts a trained model: give --init SOURCE (continued pretraining), or leave "
                              "--lora out to train from random weights")


PRETRAIN_TRAINING = TrainConfig(epochs=10, batch_size=8, lr=4e-4, eval_interval=20, log_interval=10)

CLASSIFIER_PADDING = ("batch", "longest", "max-length")
TRAINABLE_CHOICES = ("head", "last-block", "all")  # gptlab.surgery.TRAINABLE_PARTS implements each


@dataclass(frozen=True)
class ClassifierSettings(LoRAOptions, ModelOptions):
    data: str = _opt(None, "labelled texts, e.g. data/SMSSpamCollection (required; --resume: the run's)")
    init: str | None = _opt(None, "start from this model (gpt2, a run directory, an HF folder, ...) instead of "
                                  "random weights")
    # From random weights the smallest preset is enough (97% on the balanced SMS test split, README) and trains
    # in minutes on two CPU cores; larger ones overfit the ~1,000 training messages no better and train slower.
    preset: str = _opt("tiny", "model size when starting from random weights", choices=tuple(PRESETS))
    text_column: str = _opt("text", "column name or 0-based position of the text")
    label_column: str = _opt("label", "column name or 0-based position of the label")
    header: str = _opt("auto", "whether the first row names the columns; auto: yes if it names a column or the "
                               "file is .csv/.tsv", choices=("auto", "yes", "no"))
    balance: bool = _opt(False, "down-sample every label to the rarest one's count (the book)")
    split: tuple[float, float, float] = _opt((0.7, 0.1, 0.2), "stratified split fractions",
                                             metavar=("TRAIN", "VAL", "TEST"))
    max_length: int | None = _opt(None, "truncate texts to this many tokens (default: the longest training text, "
                                        "up to the context length)")
    padding: str = _opt("batch", "pad to the batch's longest text, the split's longest (the book) or --max-length "
                                 "(the prediction is the same either way)", choices=CLASSIFIER_PADDING)
    trainable: str = _opt("auto", "parameters to train; auto: last-block (+ final norm + head) with --init, all "
                                  "from scratch", choices=("auto", *TRAINABLE_CHOICES))
    drop_head: bool = _opt(False, "--init is a classifier run: keep its backbone and give it a new head (without "
                                  "this, a classifier run as --init is refused)")

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "split", tuple(self.split))
        split = self.split
        if (len(split) != 3 or not all(math.isfinite(f) and f >= 0 for f in split) or split[0] <= 0
                or abs(sum(split) - 1.0) > 1e-6):
            raise GptlabError(f"split must be three fractions TRAIN VAL TEST, each >= 0 (train > 0), summing to 1; "
                              f"got {' '.join(map(str, split))}")
        if self.max_length is not None and self.max_length <= 0:
            raise GptlabError(f"max-length must be positive, got {self.max_length}")
        for name, allowed in (("padding", CLASSIFIER_PADDING), ("trainable", ("auto", "lora", *TRAINABLE_CHOICES)),
                              ("header", ("auto", "yes", "no"))):
            if getattr(self, name) not in allowed:
                raise GptlabError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.lora and self.init is None:
            raise GptlabError("--lora adapts a trained model: give --init SOURCE (gpt2, a run directory, ...), or "
                              "leave --lora out to train from random weights")
        if self.lora and self.trainable not in ("auto", "lora"):
            raise GptlabError(f"--trainable {self.trainable} and --lora both choose what trains: with --lora the "
                              "adapters and the new head train; give one of them")
        if self.trainable == "lora" and not self.lora:
            raise GptlabError("trainable 'lora' is what --lora sets: give lora=True (--lora)")

    @property
    def resolved_trainable(self) -> str:
        if self.lora:
            return "lora"
        if self.trainable == "auto":
            return "last-block" if self.init is not None else "all"
        return self.trainable


# With --lora a stage's default learning rate is this one: the adapters start at zero and are few, so they take
# a larger step than the weights of the same model would. The classifier's was measured (README "Fine-tune with
# LoRA": 5e-5, the full-weights default, left the adapters near zero); instruct's is PEFT's and litgpt's usual
# LoRA rate; DPO's is ten times the book's full-weights 5e-6, as adapters usually get.
LORA_LR = {"classifier": 1e-3, "instruct": 3e-4, "dpo": 5e-5}


def classifier_training(init: str | None, lora: bool = False) -> TrainConfig:
    """Training defaults: the book's for a pretrained start, the README's measured recipe for random weights.

    ``eval_interval=None``: evaluate (and checkpoint) once per epoch. ``lora``: the rate ``LORA_LR`` gives.
    """
    if init is not None:
        return TrainConfig(epochs=5.0, lr=LORA_LR["classifier"] if lora else 5e-5, batch_size=8, eval_interval=None)
    return TrainConfig(epochs=5.0, lr=3e-3, batch_size=16, eval_interval=None)


@dataclass(frozen=True)
class InstructSettings(LoRAOptions, ModelOptions):
    data: str | None = _opt(None, "JSON list or JSONL of {instruction, input, output} records (default: the "
                                  "shipped 1,100-record instruction-data.json)")
    init: str | None = _opt(None, "model to start from: a run directory, gpt2, gpt2-medium, an HF folder, ...")
    preset: str | None = _opt(None, "start from random weights of this size instead", choices=tuple(PRESETS))
    tokenizer: str | None = _opt(None, "with --preset: 'gpt2' (default) or a saved tokenizer directory")
    prompt_style: str = _opt("alpaca", "prompt layout", choices=tuple(PROMPT_STYLES))
    mask_prompt: bool = _opt(False, "learn only the responses (no loss on the prompt's tokens)")
    max_length: int | None = _opt(None, "cut examples to this many tokens (default: the context length)")
    train_fraction: float = _opt(0.85, "first part of the records for training")
    test_fraction: float = _opt(0.10, "next part, written to OUT/test.json; the rest validates")
    split_seed: int | None = _opt(None, "shuffle the records with this seed before splitting (default: file "
                                        "order, as in the book)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init is None and self.preset is None:
            raise GptlabError("give --init SOURCE (a run directory, gpt2, gpt2-medium, ...) or --preset NAME "
                              "to start from random weights")
        if self.init is not None and self.preset is not None:
            raise GptlabError("give --init or --preset, not both")
        if self.init is not None and self.tokenizer is not None:
            raise GptlabError(f"--tokenizer is for a fresh --preset; the model {self.init} keeps its own tokenizer")
        if self.lora and self.init is None:
            raise GptlabError("--lora adapts a trained model: give --init SOURCE, or leave --lora out to train "
                              "--preset's random weights")
        check_split_fractions(self.train_fraction, self.test_fraction)
        if self.max_length is not None and self.max_length < 2:  # an input token and its target, at least
            raise GptlabError(f"max-length must be at least 2, got {self.max_length}")


INSTRUCT_TRAINING = TrainConfig(epochs=2, batch_size=8, lr=5e-5, eval_interval=20)


def instruct_training(lora: bool = False) -> TrainConfig:
    return replace(INSTRUCT_TRAINING, lr=LORA_LR["instruct"]) if lora else INSTRUCT_TRAINING


# ---- preference tuning (DPO) ----------------------------------------------------------------------

LOGP_REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class DPOSettings(LoRAOptions):
    # not required by the parser: a --resume takes the stored one
    init: str = _opt(None, "the instruction-tuned model to align (required): a finetune-instruct run directory (or "
                           "gpt2, an HF folder, ...); it is also the frozen reference")
    data: str | None = _opt(None, "JSON list or JSONL of {instruction, input, chosen, rejected} records (default: the "
                                  "shipped 1,100-pair instruction-data-with-preference.json)")
    prompt_style: str | None = _opt(None, "prompt layout (default: the --init run's style, else alpaca)",
                                    choices=tuple(PROMPT_STYLES))
    beta: float = _opt(0.1, "how far the policy may move from the reference: the implicit reward is beta * "
                            "log(policy / reference); larger keeps it closer (the book: 0.1 to 0.5)")
    # "mean" (the book's notebook) scores a response by its average token log-probability, so the reward, and
    # what --beta means, does not grow with the answer's length; "sum" (the paper, TRL) is the sequence's full
    # log-likelihood. The default follows the book, whose recipe (beta 0.1, lr 5e-6) was tuned with it.
    logp_reduction: str = _opt("mean", "score a response by the mean (the book) or the sum (the paper, TRL) of its "
                                       "tokens' log-probabilities", choices=LOGP_REDUCTIONS)
    max_length: int | None = _opt(None, "cut sequences to this many tokens (default: the context length)")
    dropout: float = _opt(0.0, "the policy's dropout while training; 0 (as TRL does) keeps the policy's "
                               "log-probabilities at step 0 equal to the reference's")
    train_fraction: float = _opt(0.85, "first part of the records for training")
    test_fraction: float = _opt(0.10, "next part, written to OUT/test.json; the rest validates")
    train_eval_batches: int = _opt(5, "training batches (the first, in file order) scored at each evaluation for "
                                      "the train_* reward columns (the book: 5)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init is None:
            raise GptlabError("give --init RUN: the instruction-tuned model to align (from gptlab finetune-instruct)")
        for name in ("beta", "dropout", "train_fraction", "test_fraction"):
            check_finite(name, getattr(self, name))
        if self.beta <= 0:
            raise GptlabError(f"beta must be positive (0.1 to 0.5 is usual), got {self.beta}")
        if self.logp_reduction not in LOGP_REDUCTIONS:
            raise GptlabError(f"logp-reduction must be one of {', '.join(LOGP_REDUCTIONS)}; got {self.logp_reduction!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise GptlabError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.train_eval_batches < 0:
            raise GptlabError(f"train-eval-batches must be >= 0 (0: no train_* reward columns), got "
                              f"{self.train_eval_batches}")
        check_split_fractions(self.train_fraction, self.test_fraction)


# The book's DPO recipe: AdamW (PyTorch's betas) at a constant lr 5e-6, weight decay 0.01, no clipping, one epoch
# of batches of 8 pairs, evaluated every 5 steps. DPO over-optimises quickly: more epochs or a higher lr let the
# loss fall while the answers degrade (the book's notebook).
DPO_TRAINING = TrainConfig(epochs=1, batch_size=8, lr=5e-6, weight_decay=0.01, betas=(0.9, 0.999), min_lr_ratio=1.0,
                           grad_clip=None, eval_interval=5)


def dpo_training(lora: bool = False) -> TrainConfig:
    return replace(DPO_TRAINING, lr=LORA_LR["dpo"]) if lora else DPO_TRAINING


def settings_from(cls, options: dict, stage: str):
    """``cls(**options)`` with an unknown option named as the user would write it, not a TypeError."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise GptlabError(f"{stage}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    # a path is stored as its text: settings go into config.json, and a run must read back what it was given
    return cls(**{k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in options.items()})


# ---- judging ------------------------------------------------------------------------------------

JUDGE_BASE_URL = "http://localhost:11434/v1"  # Ollama's OpenAI-compatible endpoint
JUDGE_MODEL = "llama3"  # the book's judge
# The reply asked for is one number; the cap only stops a judge that rambles (raise it for a judge that reasons
# aloud before it answers: its reasoning counts against it).
JUDGE_MAX_TOKENS = 256


# ---- weight-only quantization (gptlab.quantize) ------------------------------------------------

QUANTIZE_KINDS = ("int8", "int4")
INT4_GROUP_SIZES = (128, 64, 32)  # inputs per int4 group; the default is the largest that divides every layer


@dataclass(frozen=True)
class QuantizeConfig:
    """How a model's linear layers hold their weights: what a quantized run's config.json records.

    int8: symmetric, one scale per output channel. int4: groups of ``group_size`` inputs per output channel,
    each with a scale and a zero point (asymmetric), two 4-bit values per byte. ``group_size`` is None for int8.
    """

    to: str
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.to not in QUANTIZE_KINDS:
            raise GptlabError(f"unknown quantization {self.to!r}; choose one of {', '.join(QUANTIZE_KINDS)}")
        if self.to == "int8" and self.group_size is not None:
            raise GptlabError("--group-size applies to int4 (int8 has one scale per output channel); leave it out")
        if self.to == "int4" and self.group_size is not None and self.group_size not in INT4_GROUP_SIZES:
            raise GptlabError(f"--group-size must be one of {', '.join(map(str, sorted(INT4_GROUP_SIZES)))}, "
                              f"got {self.group_size}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantizeConfig":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
