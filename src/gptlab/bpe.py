"""Byte-level BPE from scratch: train a vocabulary, encode, decode, and read or write GPT-2's and tiktoken's files.

How GPT-2 turns text into token ids:

1. Special tokens (``<|endoftext|>``) that the caller allows are cut out of the text first and become their ids.
2. Pre-tokenization: a regex (``GPT2_PATTERN``) splits the rest into words, numbers, punctuation runs and
   whitespace, so that no token ever spans two words.
3. Each piece becomes its UTF-8 bytes, one token per byte: 256 base tokens, so any text can be encoded.
4. Merges by rank: join the adjacent pair whose joined bytes form the lowest-ranked token (the earliest
   learned), again and again, until no adjacent pair forms a token. A token's rank is its id.

Training learns those tokens: count how often each adjacent pair of tokens occurs in the corpus, turn the most
frequent pair into a new token, repeat until the vocabulary has the requested size.

On disk, GPT-2 writes bytes as printable characters (``bytes_to_unicode``): ``encoder.json`` maps each token's
string to its id and ``vocab.bpe`` lists the merges in the order they were learned. tiktoken's ``.tiktoken`` file
has one ``base64(token bytes) rank`` line per token. ``BPETokenizer`` reads and writes both.

``BPETokenizer.encode`` hands the work to tiktoken's Rust core (which accepts any ranks) when tiktoken is
installed; ``encode_python`` is the from-scratch reference that it must agree with, id for id. One known gap:
pre-tokenization needs Unicode's letter and digit classes, and the ``regex`` module ships newer Unicode tables
than tiktoken's Rust regex. Checked over all 1.1M code points with GPT-2's vocabulary, the two differ on exactly
the 17,480 code points that were still unassigned in Unicode 14 (newly added CJK ideographs, scripts, digits);
on every character assigned by then they give the same ids.

Streaming: ``text_blocks`` re-cuts a text that arrives in pieces (a file read block by block) only where
pre-tokenization cannot tell, so BPE training and ``gptlab prepare`` see exactly the pre-tokens of the whole text
while holding one block in memory.

This module holds the BPE vocabulary concepts that ``gptlab.tokenizer`` builds on (``ENDOFTEXT``, ``GPT2_PATTERN``,
the ``.tiktoken`` rank reader, the vocabulary fingerprint), so it imports nothing above ``gptlab.files``.
"""
from __future__ import annotations

import base64
import hashlib
import heapq
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property, lru_cache
from pathlib import Path
from typing import AbstractSet, Literal

import regex

from gptlab.errors import GptlabError
from gptlab.files import READ_CHUNK_BYTES, atomic_write_text, read_text_chunks  # noqa: F401  (re-exported)

ENDOFTEXT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"  # the file that names a saved tokenizer's type
# tiktoken's pre-tokenisation pattern for GPT-2 (r50k_base): contractions, letters, digits, punctuation, spaces.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
TIKTOKEN_FILE = "bpe.tiktoken"
ENCODER_FILE = "encoder.json"
MERGES_FILE = "vocab.bpe"
MERGES_HEADER = "#version: 0.2"
FINGERPRINT_HEX_DIGITS = 16  # 64 bits: tells vocabularies apart, short enough to read in an error message
Backend = Literal["auto", "tiktoken", "python"]
AllowedSpecial = AbstractSet[str] | Literal["all"]


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a ``.tiktoken`` rank file (one ``base64-token rank`` pair a line)."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise GptlabError(f"{path}:{lineno}: not a 'base64-token rank' line ({e})") from None
    return ranks


def fingerprint_of(meanings: Iterable[tuple[int, bytes]]) -> str:
    """A short sha256 hex over what each id means, ``(id, meaning)`` pairs in any order.

    Two tokenizers with one fingerprint turn every id into the same text, so ids written with one are read
    correctly by the other (a token file checks this against the model's tokenizer).
    """
    digest = hashlib.sha256(b"gptlab vocabulary v1\n")
    for i, meaning in sorted(meanings):
        digest.update(b"%d %s\n" % (i, base64.b64encode(meaning)))
    return digest.hexdigest()[:FINGERPRINT_HEX_DIGITS]


def vocabulary_fingerprint(ranks: dict[bytes, int], special_tokens: dict[str, int]) -> str:
    """``fingerprint_of`` a byte-level vocabulary: each token's bytes and each special token's text, by id."""
    meanings = [(i, b"bytes " + token) for token, i in ranks.items()]
    meanings += [(i, b"special " + text.encode("utf-8")) for text, i in special_tokens.items()]
    return fingerprint_of(meanings)


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character, so merges can be written as plain text.

    Printable Latin-1 bytes stand for themselves; the other 68 (control characters, space, ...) are shifted to
    U+0100 onwards, which is why a leading space shows up as ``Ġ`` in GPT-2's files.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in mapping)
    mapping.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return mapping


@lru_cache(maxsize=None)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def token_to_str(token: bytes) -> str:
    """A token's bytes as GPT-2 writes them in ``encoder.json`` and ``vocab.bpe``."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def str_to_token(text: str) -> bytes | None:
    """Inverse of ``token_to_str``; ``None`` when ``text`` has a character outside GPT-2's byte map."""
    table = unicode_to_bytes()
    try:
        return bytes(table[c] for c in text)
    except KeyError:
        return None


class BPETokenizer:
    """A byte-level BPE vocabulary: ``ranks`` (token bytes -> id, all 256 single bytes included),
    ``special_tokens`` (text -> id) and the pre-tokenization ``pattern``.

    ``merges`` (the pair each multi-byte token was made from, in rank order) is only needed to write
    ``vocab.bpe``; when not given it is recovered from the ranks.
    """

    name = "bpe"

    def __init__(
        self,
        ranks: dict[bytes, int],
        special_tokens: dict[str, int] | None = None,
        *,
        pattern: str = GPT2_PATTERN,
        merges: Sequence[tuple[bytes, bytes]] | None = None,
        backend: Backend = "auto",
    ) -> None:
        self.ranks = dict(ranks)
        self.special_tokens = dict(special_tokens or {})
        self.pattern = pattern
        self._merges = list(merges) if merges is not None else None
        _check_vocabulary(self.ranks, self.special_tokens)
        try:
            self._pretokenizer = regex.compile(pattern)
        except regex.error as e:
            raise GptlabError(f"pre-tokenization pattern {pattern!r} is not a valid regex ({e})") from None
        self._decoder = {i: token for token, i in self.ranks.items()}
        self._decoder.update({i: text.encode("utf-8") for text, i in self.special_tokens.items()})
        self._cache: dict[str, list[int]] = {}
        self._fast = None
        if backend not in ("auto", "tiktoken", "python"):
            raise GptlabError(f"unknown BPE backend {backend!r}: use auto, tiktoken or python")
        if backend != "python":
            try:
                import tiktoken
            except ImportError:
                if backend == "tiktoken":
                    raise GptlabError("backend='tiktoken' needs tiktoken: pip install tiktoken") from None
            else:
                self._fast = tiktoken.Encoding(
                    name="gptlab-bpe", pat_str=pattern, mergeable_ranks=self.ranks, special_tokens=self.special_tokens
                )

    # --- the Tokenizer interface -------------------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return max(self._decoder) + 1

    @property
    def eot_id(self) -> int | None:
        return self.special_tokens.get(ENDOFTEXT)

    @cached_property
    def fingerprint(self) -> str:
        """``vocabulary_fingerprint`` of the ranks and special tokens (computed once)."""
        return vocabulary_fingerprint(self.ranks, self.special_tokens)

    @property
    def backend(self) -> str:
        return "python" if self._fast is None else "tiktoken"

    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        """Token ids of ``text``. Special-token text that is not in ``allowed_special`` is encoded as plain text."""
        if self._fast is not None:
            return self._fast.encode(text, allowed_special=allowed_special, disallowed_special=())
        return self.encode_python(text, allowed_special)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json``, tiktoken's ``bpe.tiktoken`` and GPT-2's ``encoder.json`` + ``vocab.bpe``."""
        directory = Path(directory)
        atomic_write_text(directory / TIKTOKEN_FILE, self.tiktoken_text())
        encoder_text, merges_text = self.gpt2_texts()
        atomic_write_text(directory / ENCODER_FILE, encoder_text)
        atomic_write_text(directory / MERGES_FILE, merges_text)
        meta = {
            "type": self.name,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "files": {"tiktoken": TIKTOKEN_FILE, "encoder": ENCODER_FILE, "merges": MERGES_FILE},
        }
        atomic_write_text(directory / TOKENIZER_FILE, json.dumps(meta, ensure_ascii=False, indent=2) + "\n")

    # --- the from-scratch encoder --------------------------------------------------------------------------------
    def encode_python(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        """The readable reference encoder; gives exactly tiktoken's ids for the same ranks."""
        # Names this tokenizer does not have are ignored, as tiktoken does.
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special) & set(self.special_tokens)
        ids: list[int] = []
        # Longest first, so that a special token that is a prefix of another never wins over it.
        specials = sorted(allowed, key=len, reverse=True)
        segments = regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text) if specials else [text]
        for n, segment in enumerate(segments):
            if n % 2:  # odd positions are the captured special tokens
                ids.append(self.special_tokens[segment])
                continue
            for piece in self._pretokenizer.findall(segment):
                cached = self._cache.get(piece)
                if cached is None:
                    cached = self._bpe(piece.encode("utf-8"))
                    if len(self._cache) >= 100_000:  # memory stays bounded on endless streams of new words
                        self._cache.clear()
                    self._cache[piece] = cached
                ids.extend(cached)
        return ids

    def _bpe(self, piece: bytes) -> list[int]:
        ranks = self.ranks
        # Like tiktoken: a piece that is itself a token is one id, even if merging would not reach it.
        if piece in ranks:
            return [ranks[piece]]
        parts = [piece[i : i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            best_rank, best_at = None, -1
            for i in range(len(parts) - 1):
                rank = ranks.get(parts[i] + parts[i + 1])
                if rank is not None and (best_rank is None or rank < best_rank):  # leftmost wins a tie
                    best_rank, best_at = rank, i
            if best_rank is None:
                break
            parts[best_at : best_at + 2] = [parts[best_at] + parts[best_at + 1]]
        return [ranks[part] for part in parts]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of ``ids``, joined (``decode`` is this, read as UTF-8)."""
        try:
            return b"".join(self._decoder[int(i)] for i in ids)
        except KeyError as e:
            raise GptlabError(f"token id {e.args[0]} is not in this tokenizer's vocabulary (ids 0..{self.n_vocab - 1})") from None

    # --- file formats -------------------------------------------------------------------------------------------
    @property
    def merges(self) -> list[tuple[bytes, bytes]]:
        """The pair each multi-byte token was made from, in rank order (what ``vocab.bpe`` lists)."""
        if self._merges is None:
            self._merges = _recover_merges(self.ranks)
        return self._merges

    def tiktoken_text(self) -> str:
        lines = (f"{base64.b64encode(token).decode('ascii')} {rank}" for token, rank in sorted(self.ranks.items(), key=lambda kv: kv[1]))
        return "\n".join(lines) + "\n"

    def gpt2_texts(self) -> tuple[str, str]:
        """The contents of ``encoder.json`` and ``vocab.bpe``."""
        encoder = {token_to_str(token): rank for token, rank in sorted(self.ranks.items(), key=lambda kv: kv[1])}
        encoder.update(self.special_tokens)
        merges = [f"{token_to_str(left)} {token_to_str(right)}" for left, right in self.merges]
        return json.dumps(encoder), "\n".join([MERGES_HEADER, *merges]) + "\n"

    @classmethod
    def from_gpt2_files(
        cls, encoder_path: str | Path, merges_path: str | Path, *, pattern: str = GPT2_PATTERN, backend: Backend = "auto"
    ) -> "BPETokenizer":
        """Load GPT-2's ``encoder.json`` + ``vocab.bpe``. Entries of ``encoder.json`` that are neither a single byte
        nor made by a merge (GPT-2's ``<|endoftext|>``) become special tokens."""
        encoder = _read_encoder_json(encoder_path)
        merges: list[tuple[bytes, bytes]] = []
        made: set[str] = set()
        last_id = -1
        with open(merges_path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line or (lineno == 1 and line.startswith("#version")):
                    continue
                halves = line.split(" ")
                where = f"{merges_path}:{lineno}"
                if len(halves) != 2 or not all(halves):
                    raise GptlabError(f"{where}: expected two tokens separated by one space, got {line!r}")
                for half in (*halves, halves[0] + halves[1]):
                    if half not in encoder:
                        raise GptlabError(f"{where}: token {half!r} is not in {encoder_path}; the two files do not belong together")
                joined_id = encoder[halves[0] + halves[1]]
                if joined_id <= last_id or joined_id <= max(encoder[halves[0]], encoder[halves[1]]):
                    raise GptlabError(f"{where}: merge {line!r} makes id {joined_id}, out of rank order (ids must grow line by line)")
                last_id = joined_id
                pair = (str_to_token(halves[0]), str_to_token(halves[1]))
                if None in pair:
                    raise GptlabError(f"{where}: {line!r} has a character outside GPT-2's byte-to-unicode map")
                merges.append(pair)
                made.add(halves[0] + halves[1])
        ranks: dict[bytes, int] = {}
        specials: dict[str, int] = {}
        for text, i in encoder.items():
            token = str_to_token(text)
            if token is not None and (len(token) == 1 or text in made):
                ranks[token] = i
            else:
                specials[text] = i
        return cls(ranks, specials, pattern=pattern, merges=merges, backend=backend)

    @classmethod
    def from_tiktoken_file(
        cls, path: str | Path, special_tokens: dict[str, int] | None = None, *, pattern: str = GPT2_PATTERN, backend: Backend = "auto"
    ) -> "BPETokenizer":
        return cls(read_tiktoken_ranks(path), special_tokens, pattern=pattern, backend=backend)

    @classmethod
    def load(cls, path: str | Path, *, backend: Backend = "auto") -> "BPETokenizer":
        """Load a directory written by ``save``, a directory with GPT-2's ``encoder.json`` + ``vocab.bpe``, or a
        ``.tiktoken`` file (with ``<|endoftext|>`` as the id after the last rank)."""
        path = Path(path)
        if path.is_file() and path.suffix == ".tiktoken":
            ranks = read_tiktoken_ranks(path)
            return cls(ranks, {ENDOFTEXT: max(ranks.values(), default=-1) + 1}, backend=backend)
        meta: dict = {}
        if (path / TOKENIZER_FILE).is_file():
            try:
                meta = json.loads((path / TOKENIZER_FILE).read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise GptlabError(f"{path / TOKENIZER_FILE}:{e.lineno}: not valid JSON ({e.msg})") from None
        files = meta.get("files", {})
        pattern = meta.get("pattern", GPT2_PATTERN)
        encoder, merges = path / files.get("encoder", ENCODER_FILE), path / files.get("merges", MERGES_FILE)
        if encoder.is_file() and merges.is_file():
            return cls.from_gpt2_files(encoder, merges, pattern=pattern, backend=backend)
        ranks_file = path / files.get("tiktoken", TIKTOKEN_FILE)
        if ranks_file.is_file():
            return cls.from_tiktoken_file(ranks_file, meta.get("special_tokens", {}), pattern=pattern, backend=backend)
        raise GptlabError(f"{path}: no BPE vocabulary here (need {ENCODER_FILE} + {MERGES_FILE}, or {TIKTOKEN_FILE})")


def _check_vocabulary(ranks: dict[bytes, int], specials: dict[str, int]) -> None:
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise GptlabError(f"byte-level BPE vocabulary lacks {len(missing)} of the 256 single bytes (first: 0x{missing[0]:02x})")
    if len(set(ranks.values())) != len(ranks):
        raise GptlabError("two tokens of the vocabulary share one id")
    ids = {i: token for token, i in ranks.items()}
    for text, i in specials.items():
        if not text:
            raise GptlabError("a special token must not be empty")
        if text.encode("utf-8") in ranks:
            raise GptlabError(f"special token {text!r} collides with learned token id {ranks[text.encode('utf-8')]}; choose another text")
        if i in ids:
            raise GptlabError(f"special token {text!r} has id {i}, which already belongs to token {ids[i]!r}")
        ids[i] = text.encode("utf-8")


def _read_encoder_json(path: str | Path) -> dict[str, int]:
    try:
        encoder = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise GptlabError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GptlabError(f"{path}: cannot read ({e})") from None
    if not isinstance(encoder, dict) or not all(isinstance(i, int) for i in encoder.values()):
        raise GptlabError(f"{path}: expected one JSON object mapping token strings to integer ids")
    return encoder


def _recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The pair each multi-byte token is made from: encode its bytes with the lower-ranked tokens only."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pairs = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
            best, i = min(pairs)
            if best >= rank:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:  # no merge path: take the split whose halves are the earliest tokens
            splits = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks]
            if not splits:
                raise GptlabError(f"token {token!r} (rank {rank}) cannot be written as a merge of two other tokens")
            parts = list(min(splits, key=lambda s: max(ranks[s[0]], ranks[s[1]])))
        merges.append((parts[0], parts[1]))
    return merges


# --- streaming: cutting a long text where pre-tokenization cannot tell ----------------------------------------------

# The last place where the text may be cut without changing GPT-2's pre-tokenization: before a whitespace character
# that follows a non-whitespace one, or where a run of letters or of digits ends in something other than
# whitespace (text without spaces, like Chinese). No pre-token spans such a boundary, and the one before it ends
# there whatever follows: the pattern's only lookahead, ``(?!\S)``, belongs to whitespace runs, and a
# contraction starts at its apostrophe. ``(?r)`` searches backwards.
GPT2_SAFE_CUT = regex.compile(r"(?r)(?<=\S)\s|(?<=\p{L})(?=[^\p{L}\s])|(?<=\p{N})(?=[^\p{N}\s])")
# Any other splitting (the word-level tokenizers, a BPE with a pattern of its own): only after a lone newline
# between two printable ASCII characters, where every common pre-tokenizer splits. The letter rule above would
# split a word like "a-b" that a word-level tokenizer keeps whole.
LINE_SAFE_CUT = regex.compile(r"(?r)(?<=[!-~]\n)(?=[!-~])")


def safe_cut_rule(pattern: str | None) -> regex.Pattern:
    """Where a text pre-tokenized by ``pattern`` may be cut (``None``: a tokenizer that is not regex-split)."""
    return GPT2_SAFE_CUT if pattern == GPT2_PATTERN else LINE_SAFE_CUT


def text_blocks(chunks: Iterable[str], pattern: str | None = GPT2_PATTERN, keep_whole: Sequence[str] = ()) -> Iterator[str]:
    """The text that ``chunks`` form together, re-cut into blocks only where its pre-tokenization cannot tell.

    Tokenizing each block gives exactly the ids of the whole text, yet memory stays at one chunk plus the longest
    stretch without a safe cut (``safe_cut_rule(pattern)``; GPT-2's finds one in any text but a single endless
    word or whitespace run). No block ends inside one of the ``keep_whole`` texts (special tokens, which the
    caller splits out), nor inside one that may still be arriving.
    """
    cut_rule = safe_cut_rule(pattern)
    keep_re = _alternation(keep_whole)
    holdback = max(map(len, keep_whole), default=1) - 1  # a special token may still be arriving
    carry = ""
    for chunk in chunks:
        text = carry + chunk
        at = _last_safe_cut(text, len(text) - holdback, cut_rule, keep_re)
        if at:
            yield text[:at]
        carry = text[at:]
    if carry:
        yield carry


def _last_safe_cut(text: str, end: int, cut_rule: regex.Pattern, keep_re: regex.Pattern | None) -> int:
    """The last place before ``end`` where ``text`` may be cut, outside every ``keep_re`` match; 0 if none."""
    start = 0  # just after the last special token: a safe cut, the caller splits it out
    if keep_re is not None:
        for m in keep_re.finditer(text):
            if m.start() >= end:
                break
            if m.end() > end:  # reaches past ``end``: the last safe place is just before it
                return m.start()
            start = m.end()
    cut = cut_rule.search(text, start, max(start, end))
    return cut.start() if cut else start


def _alternation(texts: Sequence[str]) -> regex.Pattern | None:
    """A regex matching any of ``texts``, longest first (so a text that is a prefix of another never wins)."""
    if not texts:
        return None
    return regex.compile("|".join(map(regex.escape, sorted(texts, key=len, reverse=True))))


# --- training --------------------------------------------------------------------------------------------------

def count_pretokens(chunks: Iterable[str], special_tokens: Sequence[str] = (ENDOFTEXT,)) -> Counter[str]:
    """How often each GPT-2 pre-token occurs in the text that ``chunks`` form together (special tokens removed).

    The chunks are re-cut by ``text_blocks``, so the counts equal those of the whole text at once, while memory
    stays at one chunk plus one entry per distinct pre-token (plus the longest stretch without a safe boundary).
    """
    pretokenizer = regex.compile(GPT2_PATTERN)
    special_re = _alternation(special_tokens)
    counts: Counter[str] = Counter()
    for block in text_blocks(chunks, GPT2_PATTERN, keep_whole=special_tokens):
        for piece in special_re.split(block) if special_re else (block,):
            counts.update(pretokenizer.findall(piece))
    return counts


def train_bpe(
    text: str | Iterable[str],
    vocab_size: int,
    *,
    special_tokens: Sequence[str] = (ENDOFTEXT,),
    progress: bool = False,
    backend: Backend = "auto",
) -> BPETokenizer:
    """Learn a byte-level BPE vocabulary of ``vocab_size`` tokens (256 bytes + merges + ``special_tokens``) from
    ``text``: a string, or an iterable of chunks of one text (a file read piece by piece)."""
    chunks = [text] if isinstance(text, str) else text
    _check_size(vocab_size, special_tokens)
    return train_bpe_from_counts(count_pretokens(chunks, special_tokens), vocab_size, special_tokens=special_tokens,
                                 progress=progress, backend=backend)


def train_bpe_files(
    paths: Sequence[str | Path],
    vocab_size: int,
    *,
    special_tokens: Sequence[str] = (ENDOFTEXT,),
    progress: bool = False,
    backend: Backend = "auto",
) -> BPETokenizer:
    """``train_bpe`` over files, streamed in 1 MiB chunks; each file is its own text."""
    from tqdm import tqdm

    _check_size(vocab_size, special_tokens)
    for path in paths:
        if not Path(path).is_file():
            raise GptlabError(f"{path}: corpus file not found")
    counts: Counter[str] = Counter()
    for path in map(Path, paths):
        with tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"reading {path.name}",
                  disable=not progress) as bar:
            counts.update(count_pretokens(read_text_chunks(path, on_read=bar.update), special_tokens))
    if not any(word.strip() for word in counts):  # whitespace alone has nothing to merge worth learning
        raise GptlabError(f"corpus {', '.join(map(str, paths))} is empty (or only whitespace): nothing to learn merges from")
    return train_bpe_from_counts(counts, vocab_size, special_tokens=special_tokens, progress=progress, backend=backend)


def _check_size(vocab_size: int, special_tokens: Sequence[str]) -> None:
    if len(set(special_tokens)) != len(special_tokens):
        raise GptlabError(f"special tokens are listed twice: {list(special_tokens)}")
    smallest = 256 + len(special_tokens)
    if vocab_size < smallest:
        raise GptlabError(f"vocabulary size {vocab_size} is below 256 bytes + {len(special_tokens)} special tokens = {smallest}")


def train_bpe_from_counts(
    counts: dict[str, int],
    vocab_size: int,
    *,
    special_tokens: Sequence[str] = (ENDOFTEXT,),
    progress: bool = False,
    backend: Backend = "auto",
) -> BPETokenizer:
    """Learn merges from pre-token frequencies.

    Each distinct pre-token is processed once, weighted by its count. Pair counts and a pair -> pre-tokens index
    are updated after each merge for the pre-tokens it touched only, and a heap finds the most frequent pair;
    its entries go stale when a count drops, so a popped entry whose count is out of date is pushed back with the
    current count (counts of existing pairs only ever fall, so the first up-to-date entry is the true maximum).
    Ties go to the pair whose token bytes sort first, so the result never depends on dictionary order.
    """
    from tqdm import tqdm

    _check_size(vocab_size, special_tokens)
    if not any(word.strip() for word in counts):
        raise GptlabError("the corpus is empty (or only whitespace): nothing to learn merges from")
    for special in special_tokens:
        if len(special.encode("utf-8")) == 1:
            raise GptlabError(f"special token {special!r} collides with the byte token {special.encode()!r}; choose a longer text")
    n_tokens = vocab_size - len(special_tokens)
    vocab = [bytes([b]) for b in range(256)]
    token_id = {token: i for i, token in enumerate(vocab)}
    words = [list(w.encode("utf-8")) for w in counts]
    freqs = list(counts.values())
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for i, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freq
            where[pair].add(i)
    heap = [(-n, vocab[a], vocab[b], a, b) for (a, b), n in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[bytes, bytes]] = []
    with tqdm(total=n_tokens - len(vocab), desc="learning merges", unit="merge", disable=not progress) as bar:
        while len(vocab) < n_tokens and heap:
            neg_count, _, _, a, b = heapq.heappop(heap)
            count = pair_counts.get((a, b), 0)
            if count != -neg_count:
                if count > 0:
                    heapq.heappush(heap, (-count, vocab[a], vocab[b], a, b))
                continue
            joined = vocab[a] + vocab[b]
            new = token_id.get(joined)
            if new is None:  # rarely, two different pairs spell the same bytes: reuse the token, as tiktoken would
                new = len(vocab)
                vocab.append(joined)
                token_id[joined] = new
                merges.append((vocab[a], vocab[b]))
                bar.update(1)
            delta: dict[tuple[int, int], int] = defaultdict(int)
            for i in where.pop((a, b)):
                word = words[i]
                merged = _merge_pair(word, a, b, new)
                if len(merged) == len(word):  # the index is lazy too: this word lost the pair to an earlier merge
                    continue
                freq = freqs[i]
                for pair in zip(word, word[1:]):
                    delta[pair] -= freq
                for pair in zip(merged, merged[1:]):
                    delta[pair] += freq
                    if new in pair:
                        where[pair].add(i)
                words[i] = merged
            for pair, change in delta.items():
                if change:
                    n = pair_counts[pair] + change
                    if n:
                        pair_counts[pair] = n
                    else:
                        del pair_counts[pair]
                        where.pop(pair, None)
                    if new in pair and n:
                        heapq.heappush(heap, (-n, vocab[pair[0]], vocab[pair[1]], pair[0], pair[1]))
    if len(vocab) < n_tokens:  # every pre-token is one token already: the corpus has no pair left to merge
        logging.getLogger("gptlab").warning(
            "vocabulary size %d not reached: the corpus has no more pairs to merge, so the tokenizer has %d tokens "
            "(256 bytes + %d merges + %d special); a larger corpus gives more", vocab_size,
            len(vocab) + len(special_tokens), len(merges), len(special_tokens))
    ranks = {token: i for i, token in enumerate(vocab)}
    specials = {text: len(vocab) + k for k, text in enumerate(special_tokens)}
    return BPETokenizer(ranks, specials, merges=merges, backend=backend)


def _merge_pair(word: list[int], a: int, b: int, new: int) -> list[int]:
    """``word`` with every non-overlapping ``a b``, left to right, replaced by ``new``."""
    out = []
    i, n = 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out
