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
