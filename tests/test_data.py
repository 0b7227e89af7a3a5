import numpy as np
import pytest
import torch

from gptlab.data import (EpochBatchSampler, TokenWindowDataset, encode_path, iter_text_blocks, load_tokens,
                         open_token_file, prepare_token_file, read_text, split_tokens)
from gptlab.errors import GptlabError
from gptlab.tokenizer import SimpleTokenizerV2, get_tokenizer

from conftest import DATA


@pytest.fixture(scope="module")
def gpt2():
    return get_tokenizer("gpt2")


def test_sliding_windows_match_the_book(gpt2, verdict_path):
    ids = np.array(gpt2.encode(verdict_path.read_text(encoding="utf-8")))
    ds = TokenWindowDataset(ids, max_length=4, stride=1)
    x, y = ds[0]
    assert x.tolist() == [40, 367, 2885, 1464] and y.tolist() == [367, 2885, 1464, 1807]
    assert x.dtype == torch.int64
    assert len(ds) == 5145 - 4
    ds4 = TokenWindowDataset(ids, max_length=4, stride=4)
    assert ds4[1][0].tolist() == ids[4:8].tolist()
    assert len(ds4) == len(range(0, 5145 - 4, 4))


@pytest.mark.parametrize("max_length,stride", [(0, 1), (4, 0), (-1, 4)])
def test_window_arguments_must_be_positive(max_length, stride):
    with pytest.raises(GptlabError, match="must be positive"):
        TokenWindowDataset(np.arange(100), max_length, stride)


def test_text_shorter_than_a_window_says_how_long():
    with pytest.raises(GptlabError, match="is 10 tokens long; one training window needs max_length \\+ 1 = 65"):
        TokenWindowDataset(np.arange(10), 64, 64)


def test_split_keeps_order():
    train, val = split_tokens(np.arange(100), 0.1)
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))


def test_prepare_memory_maps_the_same_ids(gpt2, verdict_path, tmp_path):
    out = tmp_path / "verdict.tokens"
    header = prepare_token_file(verdict_path, out, gpt2)
    ids, header2 = open_token_file(out)
    assert header == header2 and header["n_tokens"] == 5145 and header["dtype"] == "uint16"
    assert isinstance(ids, np.memmap)
    assert ids.tolist() == gpt2.encode(verdict_path.read_text(encoding="utf-8"))
    assert load_tokens(out, gpt2).tolist() == ids.tolist()
    assert out.stat().st_size == 4096 + 2 * 5145
    assert not list(tmp_path.glob("*.tmp"))


def test_prepare_a_folder_joins_documents_with_endoftext(gpt2, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("Hello, world")
    (tmp_path / "docs" / "b.txt").write_text("Hello, I am")
    prepare_token_file(tmp_path / "docs", tmp_path / "docs.tokens", gpt2)
    ids, _ = open_token_file(tmp_path / "docs.tokens")
    assert ids.tolist() == [15496, 11, 995, 50256, 15496, 11, 314, 716]


def test_large_vocabularies_use_uint32(tmp_path):
    class Wide(SimpleTokenizerV2):
        n_vocab = 70_000
    tok = Wide.from_text("a b c")
    (tmp_path / "t.txt").write_text("a b c a")
    assert prepare_token_file(tmp_path / "t.txt", tmp_path / "t.tokens", tok)["dtype"] == "uint32"
    assert open_token_file(tmp_path / "t.tokens")[0].tolist() == tok.encode("a b c a")


def test_block_reading_tokenizes_exactly_like_the_whole_text(gpt2, tmp_path):
    text = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:60_000]
    path = tmp_path / "s.txt"
    path.write_text(text + "\n\n  end  \n", encoding="utf-8")
    blocks = list(iter_text_blocks(path, block_bytes=997))
    assert len(blocks) > 30 and "".join(b for b, _ in blocks) == path.read_text(encoding="utf-8")
    chunked = [i for b, _ in blocks for i in gpt2.encode(b)]
    assert chunked == gpt2.encode(path.read_text(encoding="utf-8"))


def test_bad_text_input_errors(gpt2, tmp_path):
    with pytest.raises(GptlabError, match="no such file"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(GptlabError, match="empty"):
        encode_path(tmp_path / "empty.txt", gpt2)
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 ok".encode("utf-8") + b"\nna\xefve\n")
    with pytest.raises(GptlabError, match=r"latin1.txt: not UTF-8 text \(invalid byte 0xef at byte offset 11\)"):
        encode_path(tmp_path / "latin1.txt", gpt2)


def test_truncated_token_file_is_detected(gpt2, verdict_path, tmp_path):
    out = tmp_path / "v.tokens"
    prepare_token_file(verdict_path, out, gpt2)
    with open(out, "r+b") as f:
        f.truncate(5000)
    with pytest.raises(GptlabError, match="truncated token file"):
        open_token_file(out)
    prepare_token_file(verdict_path, out, gpt2)
    with pytest.raises(GptlabError, match="prepared with tokenizer 'gpt2'"):
        load_tokens(out, SimpleTokenizerV2.from_text("a b"))


def test_batch_sampler_resumes_mid_epoch():
    sampler = EpochBatchSampler(10, 3, shuffle=True, seed=7)
    sampler.set_position(2)
    epoch2 = list(sampler)
    assert sorted(i for b in epoch2 for i in b) == list(range(10)) and len(epoch2) == 4
    sampler.set_position(2, 2)
    assert list(sampler) == epoch2[2:]
    sampler.set_position(3)
    assert list(sampler) != epoch2


# --- one streaming reader, cut where tokenization cannot tell --------------------------------------------------

import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gptlab.bpe import GPT2_PATTERN, train_bpe  # noqa: E402
from gptlab.data import HEADER_BYTES, _pack_header  # noqa: E402

PIECES = ["a", "word", " word", "Hello", " ", "  ", "     ", "\t", "\n", "\n\n", " \n ", "\r\n", "\xa0", "\u3000",
          "'s", "'t", "'re", "'ll", "n't", "'", "123", " 45", "½", "é", "e\u0301", "日本語", "。", "Привет", "🙂",
          "👍🏽", "—", "...", "!?", "a-b", "<|endoftext|>", "<|", "|>", "x"]
texts = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=5)), max_size=40).map("".join)
no_newlines = texts.map(lambda t: t.replace("\n", " ").replace("\r", " "))


def _blocks(text: str, block_bytes: int, pattern) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.txt"
        path.write_text(text, encoding="utf-8", newline="")
        blocks = list(iter_text_blocks(path, block_bytes=block_bytes, pattern=pattern))
    assert all(n == len(b.encode("utf-8")) for b, n in blocks)
    return [b for b, _ in blocks]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(texts, no_newlines), block_bytes=st.integers(1, 24))
def test_tiny_blocks_tokenize_exactly_like_the_whole_text(gpt2, text, block_bytes):
    blocks = _blocks(text, block_bytes, gpt2.pattern)
    assert "".join(blocks) == text
    assert [i for b in blocks for i in gpt2.encode(b)] == gpt2.encode(text)


@settings(max_examples=100, deadline=None)
@given(text=texts, block_bytes=st.integers(1, 24))
def test_word_level_tokenizers_are_cut_only_at_lone_newlines(text, block_bytes):
    tok = SimpleTokenizerV2.from_text(text + " a-b")
    blocks = _blocks(text, block_bytes, None)
    assert [i for b in blocks for i in tok.encode(b)] == tok.encode(text)
    assert all(b.endswith("\n") for b in blocks[:-1])


def test_text_without_newlines_streams_in_bounded_blocks(gpt2, tmp_path):
    path = tmp_path / "one-line.txt"
    path.write_text("It's a long line, with 日本語 and numbers 12345 — " * 2000, encoding="utf-8")  # ~100 kB
    blocks = list(iter_text_blocks(path, block_bytes=4096, pattern=gpt2.pattern))
    assert len(blocks) > 20 and max(n for _, n in blocks) <= 4096 + 100  # one read plus a part word
    assert [i for b, _ in blocks for i in gpt2.encode(b)] == gpt2.encode(path.read_text(encoding="utf-8"))
    assert encode_path(path, gpt2).tolist() == gpt2.encode(path.read_text(encoding="utf-8"))


def test_characters_split_between_reads_and_bad_bytes_far_in(gpt2, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("日本語 🙂 " * 50, encoding="utf-8")
    blocks = [b for b, _ in iter_text_blocks(path, block_bytes=5, pattern=GPT2_PATTERN)]  # reads split characters
    assert len(blocks) > 40 and "".join(blocks) == "日本語 🙂 " * 50
    offset = path.stat().st_size
    path.write_bytes(path.read_bytes() + b"\xff")
    with pytest.raises(GptlabError, match=rf"t.txt: not UTF-8 text \(invalid byte 0xff at byte offset {offset}\)"):
        list(iter_text_blocks(path, block_bytes=5))
    path.write_bytes(b"abc \xe6\x97")  # cut short inside a character
    with pytest.raises(GptlabError, match=r"invalid byte 0xe6 at byte offset 4"):
        list(iter_text_blocks(path, block_bytes=2))


# --- token files know their tokenizer --------------------------------------------------------------------------

def test_token_file_prepared_with_one_trained_bpe_is_refused_by_another_of_the_same_size(tmp_path):
    verdict = (DATA / "the-verdict.txt").read_text(encoding="utf-8")
    shakespeare = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:50_000]
    one, other = train_bpe(verdict, 400), train_bpe(shakespeare, 400)
    assert one.name == other.name == "bpe" and one.n_vocab == other.n_vocab == 400
    assert one.fingerprint != other.fingerprint
    (tmp_path / "t.txt").write_text(verdict[:5000], encoding="utf-8")
    header = prepare_token_file(tmp_path / "t.txt", tmp_path / "t.tokens", one)
    assert header["version"] == 2 and header["fingerprint"] == one.fingerprint
    assert load_tokens(tmp_path / "t.tokens", one).tolist() == one.encode(verdict[:5000])
    with pytest.raises(GptlabError) as e:
        load_tokens(tmp_path / "t.tokens", other)
    message = str(e.value)
    assert "\n" not in message and "t.tokens: prepared with tokenizer 'bpe' (400 tokens, fingerprint" in message
    assert one.fingerprint[:8] in message and other.fingerprint[:8] in message and "gptlab prepare" in message


def test_version_1_token_files_are_checked_by_name_and_size(gpt2, tmp_path):
    out = tmp_path / "v1.tokens"
    prepare_token_file(DATA / "the-verdict.txt", out, gpt2)
    _, header = open_token_file(out)
    del header["fingerprint"]
    header["version"] = 1
    with open(out, "r+b") as f:
        f.write(_pack_header(header))
    assert len(_pack_header(header)) == HEADER_BYTES
    assert load_tokens(out, gpt2).tolist() == gpt2.encode((DATA / "the-verdict.txt").read_text(encoding="utf-8"))
    with pytest.raises(GptlabError, match=r"prepared with tokenizer 'gpt2' \(50257 tokens\), but the model uses "
                                          r"'words-v2' \(4 tokens\); prepare it again"):
        load_tokens(out, SimpleTokenizerV2.from_text("a b"))


def test_gpt2_token_file_loads_with_a_bpe_of_gpt2s_vocabulary(gpt2, tmp_path):
    from gptlab.bpe import BPETokenizer
    from gptlab.tokenizer import GPT2_VOCAB_FILE

    same = BPETokenizer.from_tiktoken_file(GPT2_VOCAB_FILE, {"<|endoftext|>": 50256})
    prepare_token_file(DATA / "the-verdict.txt", tmp_path / "v.tokens", gpt2)
    assert load_tokens(tmp_path / "v.tokens", same).tolist()[:4] == [40, 367, 2885, 1464]  # same ids mean the same
