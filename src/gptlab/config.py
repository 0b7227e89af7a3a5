"""Every typed setting of gptlab, in one torch-free module: the one source of defaults and limits.

The model's shape (``GPTConfig`` and its named presets), the training loop's settings (``TrainConfig``),
sampling (``SamplingConfig``) and the server's limits (``ServeLimits``). The command line builds its
options and ``--help`` defaults from these dataclasses, the Python API takes them as they are, and a run
directory stores them, so ``--resume`` replays exactly what was used. Nothing here imports torch, so
``gptlab --help`` stays fast.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from gptlab.errors import GptlabError
from gptlab.prompts import PROMPT_STYLES


def check_finite(name: str, value: float | None) -> None:
    """NaN and infinity are never a sensible setting: refuse them with the option's name."""
    if value is not None and not math.isfinite(value):
        raise GptlabError(f"{name.replace('_', '-')} must be a finite number, got {value}")


# ---- the model ----------------------------------------------------------------------------------

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

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_embd", "n_layer", "n_head"):
            if getattr(self, name) <= 0:
                raise GptlabError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise GptlabError(f"model config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:  # also refuses NaN
            raise GptlabError(f"model config: dropout must be in [0, 1), got {self.dropout}")

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
    seed: int = field(default=123, metadata={"help": "random seed"})
    shuffle: bool = True
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps"})
    precision: str = field(default="auto", metadata={
        "help": "autocast precision; auto is bf16 on a capable GPU, else fp32", "choices": PRECISIONS})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the model: for GPUs, after a warm-up. On the CPU it loses gptlab's oneDNN kernels "
                "(0.55x the default at the 124M shape; BENCHMARKS.md)"})

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "eval_interval", "log_interval", "eval_batches"):
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

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p, self.max_new_tokens)
        object.__setattr__(self, "stop", tuple(self.stop))

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


# ---- serving ------------------------------------------------------------------------------------

DEFAULT_HOST = "127.0.0.1"  # this machine only
DEFAULT_PORT = 8000
API_KEY_ENV = "GPTLAB_API_KEY"  # the server's API key when --api-key is not given


@dataclass(frozen=True)
class ServeLimits:
    """Bounds on what one request may cost; each is a ``gptlab serve`` option."""

    max_tokens: int = field(default=1024, metadata={"help": "most new tokens a request may ask for (per choice)",
                                                    "flag": "--max-tokens-limit"})
    default_max_tokens: int = field(default=256, metadata={"help": "new tokens when a request does not say"})
    max_request_bytes: int = field(default=1_000_000, metadata={"help": "largest request body in bytes"})
    max_n: int = field(default=4, metadata={"help": "most choices per prompt"})
    max_queue: int = field(default=64, metadata={"help": "requests that may wait; more get 503"})
    max_active: int = field(default=8, metadata={"help": "generations interleaved at once"})

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise GptlabError(f"serve limit {f.name} must be at least 1, got {getattr(self, f.name)}")
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
class PretrainSettings:
    data: str = _opt(None, "text file, folder, or token file from `gptlab prepare`", required=True)
    preset: str = _opt("demo", "model size", choices=tuple(PRESETS))
    init: str | None = _opt(None, "start from this model (run directory, ...) instead of random weights")
    tokenizer: str | None = _opt(None, "'gpt2' (default) or a saved tokenizer directory")
    context_length: int | None = _opt(None, "override the preset's context length")
    dropout: float | None = _opt(None, "override the preset's dropout")
    stride: int | None = _opt(None, "tokens between training windows (default: the context length)")
    val_fraction: float = _opt(0.1, "last fraction of tokens for validation")
    sample_prompt: str | None = _opt("Every effort moves you", "prompt sampled at each evaluation ('' for none)")

    def __post_init__(self) -> None:
        check_finite("dropout", self.dropout)
        if not 0.0 <= self.val_fraction < 1.0:
            raise GptlabError(f"val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.stride is not None and self.stride <= 0:
            raise GptlabError(f"stride must be positive, got {self.stride}")


PRETRAIN_TRAINING = TrainConfig(epochs=10, batch_size=8, lr=4e-4, eval_interval=20, log_interval=10)

CLASSIFIER_PADDING = ("batch", "longest", "max-length")
TRAINABLE_CHOICES = ("head", "last-block", "all")  # gptlab.surgery.TRAINABLE_PARTS implements each


@dataclass(frozen=True)
class ClassifierSettings:
    data: str = _opt(None, "labelled texts, e.g. data/SMSSpamCollection", required=True)
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
    context_length: int | None = _opt(None, "override the preset's context length")
    dropout: float | None = _opt(None, "override the model's dropout")

    def __post_init__(self) -> None:
        check_finite("dropout", self.dropout)
        object.__setattr__(self, "split", tuple(self.split))
        for name, allowed in (("padding", CLASSIFIER_PADDING), ("trainable", ("auto", *TRAINABLE_CHOICES)),
                              ("header", ("auto", "yes", "no"))):
            if getattr(self, name) not in allowed:
                raise GptlabError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")

    @property
    def resolved_trainable(self) -> str:
        if self.trainable == "auto":
            return "last-block" if self.init is not None else "all"
        return self.trainable


def classifier_training(init: str | None) -> TrainConfig:
    """Training defaults: the book's for a pretrained start, the README's measured recipe for random weights.

    ``eval_interval=None``: evaluate (and checkpoint) once per epoch.
    """
    if init is not None:
        return TrainConfig(epochs=5.0, lr=5e-5, batch_size=8, eval_interval=None)
    return TrainConfig(epochs=5.0, lr=3e-3, batch_size=16, eval_interval=None)


@dataclass(frozen=True)
class InstructSettings:
    data: str | None = _opt(None, "JSON list or JSONL of {instruction, input, output} records (default: the "
                                  "shipped 1,100-record instruction-data.json)")
    init: str | None = _opt(None, "model to start from: a run directory, gpt2, gpt2-medium, an HF folder, ...")
    preset: str | None = _opt(None, "start from random weights of this size instead", choices=tuple(PRESETS))
    tokenizer: str | None = _opt(None, "with --preset: 'gpt2' (default) or a saved tokenizer directory")
    prompt_style: str = _opt("alpaca", "prompt layout", choices=tuple(PROMPT_STYLES))
    mask_prompt: bool = _opt(False, "learn only the responses (no loss on the prompt's tokens)")
    max_length: int | None = _opt(None, "cut examples to this many tokens (default: the context length)")
    dropout: float | None = _opt(None, "override the model's dropout")
    train_fraction: float = _opt(0.85, "first part of the records for training")
    test_fraction: float = _opt(0.10, "next part, written to OUT/test.json; the rest validates")
    split_seed: int | None = _opt(None, "shuffle the records with this seed before splitting (default: file "
                                        "order, as in the book)")

    def __post_init__(self) -> None:
        check_finite("dropout", self.dropout)
        if self.init is None and self.preset is None:
            raise GptlabError("give --init SOURCE (a run directory, gpt2, gpt2-medium, ...) or --preset NAME "
                              "to start from random weights")
        if self.init is not None and self.preset is not None:
            raise GptlabError("give --init or --preset, not both")
        if self.init is not None and self.tokenizer is not None:
            raise GptlabError(f"--tokenizer is for a fresh --preset; the model {self.init} keeps its own tokenizer")
        for name in ("train_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise GptlabError(f"{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if self.train_fraction <= 0 or self.train_fraction + self.test_fraction > 1.0:
            raise GptlabError(f"train-fraction must be positive and train + test at most 1, got "
                              f"{self.train_fraction} + {self.test_fraction}")


INSTRUCT_TRAINING = TrainConfig(epochs=2, batch_size=8, lr=5e-5, eval_interval=20)


def settings_from(cls, options: dict, stage: str):
    """``cls(**options)`` with an unknown option named as the user would write it, not a TypeError."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise GptlabError(f"{stage}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**options)


# ---- judging ------------------------------------------------------------------------------------

JUDGE_BASE_URL = "http://localhost:11434/v1"  # Ollama's OpenAI-compatible endpoint
JUDGE_MODEL = "llama3"  # the book's judge
