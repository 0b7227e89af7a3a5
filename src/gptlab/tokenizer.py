"""Text to token ids and back.

Every tokenizer here satisfies one small interface (``Tokenizer``): ``encode``, ``decode``, ``n_vocab``,
``eot_id``, ``name``, ``fingerprint`` and ``save``. The rest of gptlab only ever talks to that interface.
Byte-level tokenizers also give the bytes of ids (``ByteLevelTokenizer.decode_bytes``), which lets
streaming decode each new token once.

- ``GPT2Tokenizer``: OpenAI's byte-level BPE through tiktoken, built from the vocabulary file shipped
  inside this package (``assets/gpt2.tiktoken``), so it never touches the network.
- ``SimpleTokenizerV1`` / ``SimpleTokenizerV2``: the word-level tokenizers of the LLMs-from-scratch
  book's chapter 2, which teach the idea before BPE.
- ``BPETokenizer`` (``gptlab.bpe``): byte-level BPE trained here; ``get_tokenizer`` loads it from its directory.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Protocol, runtime_checkable

# The BPE vocabulary concepts live in gptlab.bpe, below this module; they are re-exported from here.
from gptlab.bpe import (  # noqa: F401
    ENDOFTEXT,
    GPT2_PATTERN,
    TOKENIZER_FILE,
    AllowedSpecial,
    BPETokenizer,
    fingerprint_of,
    read_tiktoken_ranks,
    vocabulary_fingerprint,
)
from gptlab.errors import GptlabError

UNK = "<|unk|>"
GPT2_VOCAB_FILE = Path(__file__).parent / "assets" / "gpt2.tiktoken"
GPT2_EOT_ID = 50256


@runtime_checkable
class Tokenizer(Protocol):
    name: str

    @property
    def n_vocab(self) -> int: ...

    @property
    def eot_id(self) -> int | None: ...

    @property
    def fingerprint(self) -> str:
        """A short hex hash of what each id means (vocabulary and special tokens): equal means interchangeable ids."""
        ...

    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, directory: str | Path) -> None:
        """Write files from which ``get_tokenizer(directory)`` rebuilds this tokenizer."""
        ...


@runtime_checkable
class ByteLevelTokenizer(Tokenizer, Protocol):
    """A tokenizer whose ids stand for bytes: ``decode(ids)`` is ``decode_bytes(ids)`` read as UTF-8."""

    def decode_bytes(self, ids: Iterable[int]) -> bytes: ...


@lru_cache(maxsize=None)
def _gpt2_fingerprint() -> str:
    # read once per process: the encoder does not keep the ranks, and most runs never ask
    return vocabulary_fingerprint(read_tiktoken_ranks(GPT2_VOCAB_FILE), {ENDOFTEXT: GPT2_EOT_ID})


class GPT2Tokenizer:
    """GPT-2's byte-level BPE, encoded by tiktoken's Rust core from the shipped vocabulary."""

    name = "gpt2"
    pattern = GPT2_PATTERN  # its pre-tokenization, which says where a long text may be cut (gptlab.bpe.text_blocks)

    def __init__(self) -> None:
        import tiktoken

        self._enc = tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=read_tiktoken_ranks(GPT2_VOCAB_FILE),
            special_tokens={ENDOFTEXT: GPT2_EOT_ID},
        )

    @property
    def n_vocab(self) -> int:
        return self._enc.n_vocab

    @property
    def eot_id(self) -> int:
        return self._enc.eot_token

    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        # A special token's text that is not allowed is encoded as ordinary text, never as its id,
        # so training data that happens to contain "<|endoftext|>" cannot inject document breaks.
        return self._enc.encode(text, allowed_special=allowed_special, disallowed_special=())

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids), errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self._enc.decode_bytes(list(ids))

    @property
    def fingerprint(self) -> str:
        """The same as a ``BPETokenizer`` loaded from GPT-2's files: the ids mean the same bytes."""
        return _gpt2_fingerprint()

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / TOKENIZER_FILE).write_text(json.dumps({"type": "gpt2"}) + "\n")


class SimpleTokenizerV1:
    """Word-level tokenizer over a fixed vocabulary (book chapter 2): unknown words are an error."""

    name = "words-v1"
    _split = re.compile(r'([,.:;?_!"()\']|--|\s)')
    _specials: tuple[str, ...] = ()

    def __init__(self, vocab: dict[str, int]) -> None:
        self.str_to_int = dict(vocab)
        self.int_to_str = {i: s for s, i in vocab.items()}

    @classmethod
    def split_words(cls, text: str) -> list[str]:
        return [w.strip() for w in cls._split.split(text) if w.strip()]

    @classmethod
    def from_text(cls, text: str):
        """Build the vocabulary from every distinct word and punctuation mark in ``text``."""
        words = sorted(set(cls.split_words(text)) - set(cls._specials))
        return cls({w: i for i, w in enumerate([*words, *cls._specials])})

    @property
    def n_vocab(self) -> int:
        return len(self.str_to_int)

    @property
    def eot_id(self) -> int | None:
        return self.str_to_int.get(ENDOFTEXT)

    @cached_property
    def fingerprint(self) -> str:
        """``fingerprint_of`` the vocabulary: each id's word."""
        return fingerprint_of((i, b"word " + word.encode("utf-8")) for word, i in self.str_to_int.items())

    def _id(self, word: str, allowed: AllowedSpecial) -> int:
        if word not in self.str_to_int:
            raise GptlabError(f"word {word!r} is not in this tokenizer's vocabulary (use SimpleTokenizerV2 for <|unk|>)")
        return self.str_to_int[word]

    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        return [self._id(w, allowed_special) for w in self.split_words(text)]

    def decode(self, ids: Iterable[int]) -> str:
        text = " ".join(self.int_to_str[int(i)] for i in ids)
        return re.sub(r'\s+([,.:;?!"()\'])', r"\1", text)  # no space before punctuation

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        data = {"type": self.name, "vocab": self.str_to_int}
        (Path(directory) / TOKENIZER_FILE).write_text(json.dumps(data, ensure_ascii=False, indent=0) + "\n")


class SimpleTokenizerV2(SimpleTokenizerV1):
    """V1 plus ``<|unk|>`` for unknown words and ``<|endoftext|>`` to separate documents."""

    name = "words-v2"
    _specials = (ENDOFTEXT, UNK)

    def _id(self, word: str, allowed: AllowedSpecial) -> int:
        special_ok = allowed == "all" or word in allowed
        if word in self._specials and not special_ok:
            return self.str_to_int[UNK]
        return self.str_to_int.get(word, self.str_to_int[UNK])


# How each saved tokenizer type is rebuilt from its directory; other tokenizer modules register here.
TOKENIZER_LOADERS: dict[str, Callable[[Path, dict], Tokenizer]] = {
    "gpt2": lambda directory, meta: get_tokenizer("gpt2"),
    "words-v1": lambda directory, meta: SimpleTokenizerV1(meta["vocab"]),
    "words-v2": lambda directory, meta: SimpleTokenizerV2(meta["vocab"]),
    "bpe": lambda directory, meta: BPETokenizer.load(directory),
}


@lru_cache(maxsize=None)
def _gpt2() -> GPT2Tokenizer:
    return GPT2Tokenizer()


def get_tokenizer(name_or_path: str | Path, base_dir: str | Path | None = None) -> Tokenizer:
    """``"gpt2"`` for GPT-2's BPE, or a directory (or its ``tokenizer.json``) written by ``Tokenizer.save``.

    A relative path is looked up under ``base_dir`` first (a run directory keeps its tokenizer there).
    """
    if str(name_or_path) in ("gpt2", "r50k_base"):
        return _gpt2()
    path = Path(name_or_path)
    if base_dir is not None and not path.is_absolute() and (Path(base_dir) / path).exists():
        path = Path(base_dir) / path
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise GptlabError(f"tokenizer {str(name_or_path)!r} not found: give 'gpt2' or a directory with {TOKENIZER_FILE}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        kind = meta["type"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise GptlabError(f"{path}: not a gptlab tokenizer file ({e})") from None
    if kind not in TOKENIZER_LOADERS:
        raise GptlabError(f"{path}: unknown tokenizer type {kind!r}; known: {', '.join(TOKENIZER_LOADERS)}")
    return TOKENIZER_LOADERS[kind](path.parent, meta)
