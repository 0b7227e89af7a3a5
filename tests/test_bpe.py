"""The from-scratch byte-level BPE: exact agreement with tiktoken's GPT-2, training, file formats, errors."""
import json
from collections import Counter
from pathlib import Path

import pytest
import regex
import tiktoken.load
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptlab.bpe import (
    BPETokenizer,
    bytes_to_unicode,
    count_pretokens,
    train_bpe,
    train_bpe_files,
    train_bpe_from_counts,
)
from gptlab.errors import GptlabError
from gptlab.tokenizer import GPT2_PATTERN, GPT2_VOCAB_FILE, get_tokenizer

HERE = Path(__file__).resolve().parent
GPT2_ENCODER = HERE / "data" / "gpt2" / "encoder.json"
GPT2_MERGES = HERE / "data" / "gpt2" / "vocab.bpe"
DATA = HERE.parent / "data"

# Pieces that stress pre-tokenization: whitespace runs, digits, contractions, emoji, control characters.
TRICKY = [" ", "  ", "   ", "\n", "\n\n", "\t", " \n ", "\r\n", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\xa0",
          "\u2028", "\u3000", "\x00", "\x7f", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "n't", "'", "''",
          "0", "123", "4567", " 89", "½", "٣", "Ⅻ", "🙂", "👍🏽", "🇺🇸", "👨‍👩‍👧", "\ufe0f", "é", "e\u0301", "日本語",
          "Ελλάδα", "Привет", "。", "、", "a1", "1a", "x'", "—", "...", "!?", "<|endoftext|>", "<|", "|>", "hello", " Hello", "ALL CAPS", "x"]
# Any code point assigned in Python's Unicode tables (14.0 on Python 3.11). The `regex` module classifies code
# points assigned later by newer tables than tiktoken's Rust regex does; see the note in gptlab.bpe.
ASSIGNED = st.characters(exclude_categories=("Cs", "Cn"))
texts = st.lists(st.one_of(st.sampled_from(TRICKY), st.text(ASSIGNED, max_size=6)), max_size=25).map("".join)


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert message and "\n" not in message
    return message


@pytest.fixture(scope="module")
def gpt2_scratch() -> BPETokenizer:
    return BPETokenizer.from_gpt2_files(GPT2_ENCODER, GPT2_MERGES, backend="python")


@pytest.fixture(scope="module")
def verdict_bpe() -> BPETokenizer:
    return train_bpe_files([DATA / "the-verdict.txt"], 700)


# --- GPT-2's own vocabulary through the from-scratch encoder ---------------------------------------------------

@pytest.mark.parametrize("corpus", ["the-verdict.txt", "tinyshakespeare.txt"])
def test_gpt2_files_give_tiktoken_ids_on_corpora(gpt2_scratch, corpus):
    text = (DATA / corpus).read_text(encoding="utf-8")
    expected = get_tokenizer("gpt2").encode(text)
    assert gpt2_scratch.backend == "python"
    assert gpt2_scratch.encode(text) == expected
    assert gpt2_scratch.n_vocab == 50257 and gpt2_scratch.eot_id == 50256


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_gpt2_files_give_tiktoken_ids_on_any_text(gpt2_scratch, text):
    gpt2 = get_tokenizer("gpt2")
    assert gpt2_scratch.encode(text) == gpt2.encode(text)
    assert gpt2_scratch.encode(text, allowed_special="all") == gpt2.encode(text, allowed_special="all")
    assert gpt2_scratch.decode(gpt2_scratch.encode(text)) == text


def test_special_tokens_only_when_allowed(gpt2_scratch):
    text = "a<|endoftext|>b"
    assert gpt2_scratch.encode(text, allowed_special={"<|endoftext|>"}) == [64, 50256, 65]
    assert 50256 not in gpt2_scratch.encode(text)
    assert gpt2_scratch.encode(text, allowed_special={"<|nope|>"}) == get_tokenizer("gpt2").encode(text)


def test_gpt2_files_written_back_unchanged(gpt2_scratch, tmp_path):
    gpt2_scratch.save(tmp_path)
    assert json.loads((tmp_path / "encoder.json").read_text()) == json.loads(GPT2_ENCODER.read_text())
    assert (tmp_path / "vocab.bpe").read_text().splitlines() == GPT2_MERGES.read_text(encoding="utf-8").splitlines()
    assert tiktoken.load.load_tiktoken_bpe(str(tmp_path / "bpe.tiktoken")) == gpt2_scratch.ranks


def test_merges_recovered_from_tiktoken_ranks_match_vocab_bpe(gpt2_scratch):
    from_ranks = BPETokenizer.from_tiktoken_file(GPT2_VOCAB_FILE, {"<|endoftext|>": 50256}, backend="python")
    assert from_ranks.ranks == gpt2_scratch.ranks
    assert from_ranks.merges == gpt2_scratch.merges


def test_byte_map_is_gpt2s():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"


# --- training ----------------------------------------------------------------------------------------------------

def test_training_is_deterministic_and_independent_of_chunking(verdict_bpe):
    text = (DATA / "the-verdict.txt").read_text(encoding="utf-8")
    again = train_bpe(text, 700)
    chunked = train_bpe((text[i : i + 97] for i in range(0, len(text), 97)), 700)
    assert verdict_bpe.n_vocab == 700 and len(verdict_bpe.merges) == 700 - 256 - 1
    assert again.merges == verdict_bpe.merges == chunked.merges
    assert again.ranks == verdict_bpe.ranks
    assert verdict_bpe.eot_id == 699


def test_merges_pick_the_most_frequent_pair_and_break_ties_by_bytes():
    # "aaab" x3 holds a-a 6 times. Then aa-a and a-b tie at 3 (a-b sorts first), and later " "-x and c-d at 2.
    tok = train_bpe_from_counts({"aaab": 3, "cd": 2, " x": 2}, 256 + 5 + 1)
    assert tok.merges == [(b"a", b"a"), (b"a", b"b"), (b"aa", b"ab"), (b" ", b"x"), (b"c", b"d")]
    assert tok.encode("aaab cd x") == tok.encode_python("aaab cd x")
    assert tok.decode(tok.encode("aaab")) == "aaab"


def test_merging_stops_when_no_pair_is_left():
    tok = train_bpe("ab ab", 1000)  # pre-tokens "ab" and " ab": a-b (twice), then " "-ab, then nothing
    assert [left + right for left, right in tok.merges] == [b"ab", b" ab"]
    assert tok.n_vocab == 256 + 2 + 1 and tok.encode("ab ab") == [256, 257]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_trained_vocabulary_round_trips_and_backends_agree(verdict_bpe, text):
    ids = verdict_bpe.encode(text)
    assert verdict_bpe.backend == "tiktoken"
    assert ids == verdict_bpe.encode_python(text)
    assert verdict_bpe.decode(ids) == text
    assert verdict_bpe.encode(text, allowed_special="all") == verdict_bpe.encode_python(text, allowed_special="all")


@settings(max_examples=200, deadline=None)
@given(text=texts, cuts=st.lists(st.integers(0, 400), max_size=6))
def test_streamed_pretoken_counts_equal_whole_text(text, cuts):
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    pieces = regex.split(r"<\|endoftext\|>", text)
    expected = Counter(t for piece in pieces for t in regex.findall(GPT2_PATTERN, piece))
    assert count_pretokens(chunks) == expected


def test_streaming_memory_does_not_grow_with_the_corpus(tmp_path):
    import tracemalloc

    from gptlab.bpe import read_text_chunks

    corpus = tmp_path / "corpus.txt"
    corpus.write_text((DATA / "the-verdict.txt").read_text(encoding="utf-8") * 60, encoding="utf-8")  # 1.2 MB
    tracemalloc.start()
    try:
        counts = count_pretokens(read_text_chunks(corpus, chunk_bytes=1 << 14))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert counts[" the"] == 60 * Counter(regex.findall(GPT2_PATTERN, (DATA / "the-verdict.txt").read_text()))[" the"]
    assert peak < corpus.stat().st_size / 2  # holding the corpus's pre-tokens at once would take ~10x its size


# --- saving, loading and the run directory -----------------------------------------------------------------------

def test_save_and_load_both_formats(verdict_bpe, tmp_path):
    verdict_bpe.save(tmp_path / "tok")
    sample = "The Verdict, by Edith Wharton: 1908!\n\n  <|endoftext|> 😀"
    expected = verdict_bpe.encode(sample, allowed_special="all")
    from_dir = get_tokenizer(tmp_path / "tok")
    from_gpt2 = BPETokenizer.from_gpt2_files(tmp_path / "tok" / "encoder.json", tmp_path / "tok" / "vocab.bpe")
    from_ranks = BPETokenizer.from_tiktoken_file(tmp_path / "tok" / "bpe.tiktoken", verdict_bpe.special_tokens)
    for tok in (from_dir, from_gpt2, from_ranks):
        assert isinstance(tok, BPETokenizer)
        assert tok.ranks == verdict_bpe.ranks and tok.special_tokens == verdict_bpe.special_tokens
        assert tok.encode(sample, allowed_special="all") == expected
    assert from_gpt2.merges == verdict_bpe.merges
    assert from_ranks.merges == verdict_bpe.merges  # recovering the merges from ranks gives the trained pairs
    assert tiktoken.load.load_tiktoken_bpe(str(tmp_path / "tok" / "bpe.tiktoken")) == verdict_bpe.ranks


def test_cli_trains_a_tokenizer_that_pretraining_and_generation_pick_up(tmp_path, capsys):
    from gptlab.cli import main
    from gptlab.generate import stream_text
    from gptlab.weights import load_run

    tok_dir, run_dir = tmp_path / "tok", tmp_path / "run"
    assert main(["train-tokenizer", "--input", str(DATA / "the-verdict.txt"), "--vocab-size", "500",
                 "--out", str(tok_dir), "--quiet"]) == 0
    assert "500 tokens" in capsys.readouterr().out
    assert main(["pretrain", "--data", str(DATA / "the-verdict.txt"), "--out", str(run_dir), "--preset", "tiny",
                 "--tokenizer", str(tok_dir), "--max-steps", "1", "--eval-batches", "1", "--sample-prompt", "",
                 "--device", "cpu", "--quiet"]) == 0
    model, tokenizer, config = load_run(run_dir)
    assert config["tokenizer"] == "tokenizer" and model.config.vocab_size == 500
    assert isinstance(tokenizer, BPETokenizer)
    assert tokenizer.ranks == get_tokenizer(tok_dir).ranks
    text = "".join(stream_text(model, tokenizer, "I had always", max_new_tokens=3))
    assert isinstance(text, str)


# --- bad input: one-line GptlabError each --------------------------------------------------------------------------

def test_vocabulary_size_below_bytes_plus_specials():
    with pytest.raises(GptlabError, match="below 256 bytes"):
        train_bpe("hello", 256)
    assert train_bpe("hello", 257).n_vocab == 257


def test_empty_corpus(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(GptlabError, match="empty") as e:
        train_bpe_files([empty], 300)
    one_line(e)
    with pytest.raises(GptlabError, match="empty"):
        train_bpe("<|endoftext|>", 300)


def test_corpus_that_is_not_utf8(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9 au lait")
    with pytest.raises(GptlabError, match="offset 3") as e:
        train_bpe_files([bad], 300)
    one_line(e)


def test_corrupt_vocabulary_files_name_the_line(tmp_path, verdict_bpe):
    verdict_bpe.save(tmp_path)
    merges = (tmp_path / "vocab.bpe").read_text().splitlines()
    (tmp_path / "vocab.bpe").write_text("\n".join([*merges[:3], "Ġt", *merges[4:]]) + "\n")
    with pytest.raises(GptlabError, match=r"vocab\.bpe:4: expected two tokens") as e:
        BPETokenizer.load(tmp_path)
    one_line(e)
    (tmp_path / "vocab.bpe").write_text("\n".join([*merges[:3], "Ġ zzzq", *merges[4:]]) + "\n")
    with pytest.raises(GptlabError, match=r"vocab\.bpe:4: token 'zzzq' is not in"):
        BPETokenizer.load(tmp_path)
    (tmp_path / "vocab.bpe").write_text("\n".join([merges[0], merges[2], merges[1], *merges[3:]]) + "\n")
    with pytest.raises(GptlabError, match=r"vocab\.bpe:3: .*out of rank order"):
        BPETokenizer.load(tmp_path)
    (tmp_path / "encoder.json").write_text('{"a": 0,\n "b": }')
    with pytest.raises(GptlabError, match=r"encoder\.json:2: not valid JSON"):
        BPETokenizer.load(tmp_path)
    lines = (tmp_path / "bpe.tiktoken").read_text().splitlines()
    (tmp_path / "bpe.tiktoken").write_text("\n".join([*lines[:9], "not-base64!", *lines[10:]]) + "\n")
    with pytest.raises(GptlabError, match=r"bpe\.tiktoken:10: ") as e:
        BPETokenizer.from_tiktoken_file(tmp_path / "bpe.tiktoken")
    one_line(e)


def test_special_tokens_that_collide_with_learned_tokens(verdict_bpe):
    learned = next(t for t in verdict_bpe.ranks if len(t) > 3)
    with pytest.raises(GptlabError, match="collides with learned token") as e:
        BPETokenizer(verdict_bpe.ranks, {learned.decode(): 5000})
    one_line(e)
    with pytest.raises(GptlabError, match="has id 300, which already belongs"):
        BPETokenizer(verdict_bpe.ranks, {"<|endoftext|>": 300})
    with pytest.raises(GptlabError, match="collides with the byte token"):
        train_bpe("hello", 300, special_tokens=["h"])
    with pytest.raises(GptlabError, match="listed twice"):
        train_bpe("hello", 300, special_tokens=["<|a|>", "<|a|>"])


def test_cli_reports_errors_on_one_line(tmp_path, capsys):
    from gptlab.cli import main

    code = main(["train-tokenizer", "--input", str(DATA / "the-verdict.txt"), "--vocab-size", "100",
                 "--out", str(tmp_path / "t"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "below 256 bytes" in err
    assert not (tmp_path / "t").exists()


def test_whitespace_only_corpus_is_empty(tmp_path):
    from gptlab.bpe import train_bpe_files

    corpus = tmp_path / "blank.txt"
    corpus.write_text("\n \n\t\n")
    with pytest.raises(GptlabError, match="empty \\(or only whitespace\\)"):
        train_bpe_files([corpus], vocab_size=300)


# --- layering, streaming blocks, fingerprints ------------------------------------------------------------------

def test_bpe_imports_nothing_above_files():
    import subprocess
    import sys

    import gptlab.bpe

    source = Path(gptlab.bpe.__file__).read_text(encoding="utf-8")
    imported = set(regex.findall(r"^\s*(?:from|import) (gptlab[\w.]*)", source, flags=regex.M))
    assert imported <= {"gptlab.errors", "gptlab.files"}, imported
    loaded = subprocess.run([sys.executable, "-c", "import gptlab.bpe, sys; print(*sys.modules)"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert "gptlab.tokenizer" not in loaded and "torch" not in loaded


@settings(max_examples=200, deadline=None)
@given(text=texts, size=st.integers(1, 30))
def test_blocks_rejoin_and_never_cut_a_special_token(text, size):
    from gptlab.bpe import text_blocks

    chunks = [text[i : i + size] for i in range(0, len(text), size)]
    blocks = list(text_blocks(chunks, keep_whole=["<|endoftext|>"]))
    assert "".join(blocks) == text
    assert sum(b.count("<|endoftext|>") for b in blocks) == text.count("<|endoftext|>")


def test_pretoken_counts_stream_a_corpus_without_newlines_in_bounded_blocks(tmp_path):
    from gptlab.bpe import read_text_chunks, text_blocks

    corpus = tmp_path / "line.txt"
    line = (DATA / "the-verdict.txt").read_text(encoding="utf-8").replace("\n", " ")
    corpus.write_text(line, encoding="utf-8")
    blocks = list(text_blocks(read_text_chunks(corpus, chunk_bytes=1 << 10)))
    assert len(blocks) > 15 and max(map(len, blocks)) < 1100  # one read plus a part word
    assert count_pretokens(read_text_chunks(corpus, chunk_bytes=1 << 10)) == Counter(regex.findall(GPT2_PATTERN, line))


def test_missing_corpus_file():
    with pytest.raises(GptlabError, match="nope.txt: corpus file not found"):
        train_bpe_files([DATA / "nope.txt"], 300)


def test_fingerprints_tell_vocabularies_apart(gpt2_scratch, verdict_bpe, tmp_path):
    gpt2 = get_tokenizer("gpt2")
    assert gpt2_scratch.fingerprint == gpt2.fingerprint  # the same ids mean the same bytes
    assert len(verdict_bpe.fingerprint) == 16 and int(verdict_bpe.fingerprint, 16) >= 0
    verdict_bpe.save(tmp_path / "tok")
    assert get_tokenizer(tmp_path / "tok").fingerprint == verdict_bpe.fingerprint
    other_specials = BPETokenizer(verdict_bpe.ranks, {"<|end|>": 699})
    assert other_specials.fingerprint != verdict_bpe.fingerprint
    shorter = train_bpe_files([DATA / "the-verdict.txt"], 699)
    assert shorter.fingerprint != verdict_bpe.fingerprint
