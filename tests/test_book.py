"""The LLMs-from-scratch book's chapter-5 settings: its model, its initialisation, its optimizer."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from llms_from_scratch.ch04 import GPTModel as BookGPTModel

from gptlab.cli import main
from gptlab.config import GPTConfig, TrainConfig
from gptlab.model import GPTModel
from gptlab.pretrain import pretrain
from gptlab.train import make_optimizer

BOOK_124M = {"vocab_size": 50257, "context_length": 256, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
             "drop_rate": 0.1, "qkv_bias": False}  # the book's GPT_CONFIG_124M


def book_weights_as_gptlab(book: BookGPTModel) -> dict[str, torch.Tensor]:
    """The book model's tensors under gptlab's names (q, k, v fused as GPT-2 stores them)."""
    state = {"wte.weight": book.tok_emb.weight, "wpe.weight": book.pos_emb.weight,
             "ln_f.weight": book.final_norm.scale, "ln_f.bias": book.final_norm.shift,
             "lm_head.weight": book.out_head.weight}
    for i, b in enumerate(book.trf_blocks):
        state.update({
            f"h.{i}.ln_1.weight": b.norm1.scale, f"h.{i}.ln_1.bias": b.norm1.shift,
            f"h.{i}.ln_2.weight": b.norm2.scale, f"h.{i}.ln_2.bias": b.norm2.shift,
            f"h.{i}.attn.c_attn.weight": torch.cat([b.att.W_query.weight, b.att.W_key.weight, b.att.W_value.weight]),
            f"h.{i}.attn.c_proj.weight": b.att.out_proj.weight, f"h.{i}.attn.c_proj.bias": b.att.out_proj.bias,
            f"h.{i}.mlp.c_fc.weight": b.ff.layers[0].weight, f"h.{i}.mlp.c_fc.bias": b.ff.layers[0].bias,
            f"h.{i}.mlp.c_proj.weight": b.ff.layers[2].weight, f"h.{i}.mlp.c_proj.bias": b.ff.layers[2].bias,
        })
    return state


def test_book_preset_is_the_books_gpt_config_124m():
    config = GPTConfig.preset("book-124m")
    assert (config.context_length, config.n_embd, config.n_head, config.n_layer, config.dropout) == (256, 768, 12, 12, 0.1)
    assert not config.qkv_bias and not config.tie_weights and config.init_style == "book"
    with torch.device("meta"):
        gptlab_count = GPTModel(config).num_parameters()
        book_count = sum(p.numel() for p in BookGPTModel(BOOK_124M).parameters())
    assert gptlab_count == book_count == 162_419_712  # the book's 163,009,536 is at context 1024


@pytest.mark.parametrize("seed", [123, 124])
def test_book_init_draws_the_books_initial_weights(seed):
    # a small shape of the same model: the draws, layer by layer, are what the book's GPTModel makes
    shape = dict(BOOK_124M, emb_dim=48, n_heads=4, n_layers=3, context_length=32)
    torch.manual_seed(seed)
    book = BookGPTModel(shape)
    torch.manual_seed(seed)
    ours = GPTModel(GPTConfig(context_length=32, n_embd=48, n_head=4, n_layer=3, dropout=0.1, qkv_bias=False,
                              tie_weights=False, init_style="book"))
    expected = book_weights_as_gptlab(book)
    got = ours.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    book.eval(), ours.eval()
    ids = torch.randint(0, 50257, (2, 16))
    torch.testing.assert_close(ours(ids), book(ids), atol=1e-5, rtol=1e-5)


def test_gpt2_init_is_the_default_and_differs():
    torch.manual_seed(0)
    w = GPTModel(GPTConfig.preset("tiny")).wte.weight
    assert abs(w.std().item() - 0.02) < 0.002  # GPT-2's N(0, 0.02); the book's draws N(0, 1)
    torch.manual_seed(0)
    assert abs(GPTModel(GPTConfig.preset("tiny", init_style="book")).wte.weight.std().item() - 1.0) < 0.05


def test_book_optimizer_settings_from_the_command_line(tmp_path, verdict_path):
    out = tmp_path / "run"
    code = main(["pretrain", "--data", str(verdict_path), "--out", str(out), "--preset", "tiny", "--max-steps", "1",
                 "--init-style", "book", "--no-tie-weights", "--no-qkv-bias", "--adam-betas", "0.9", "0.999",
                 "--quiet", "--sample-prompt", ""])
    assert code == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["init_style"] == "book" and not saved["model"]["tie_weights"] and not saved["model"]["qkv_bias"]
    assert saved["train"]["betas"] == [0.9, 0.999]
    model = GPTModel(GPTConfig.from_dict(saved["model"]))
    assert model.lm_head.weight is not model.wte.weight and model.h[0].attn.c_attn.bias is None
    optimizer = make_optimizer(model, TrainConfig(betas=(0.9, 0.999)), torch.device("cpu"))
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999)


def test_tokens_per_second_after_resume_counts_only_this_invocation(tmp_path, verdict_path, caplog):
    out = tmp_path / "run"
    first = pretrain(verdict_path, out, TrainConfig(max_steps=2, batch_size=2, eval_interval=2), preset="tiny",
                     progress=False, sample_prompt=None)
    with caplog.at_level(logging.INFO, logger="gptlab"):
        second = pretrain(verdict_path, out, TrainConfig(max_steps=5, batch_size=2, eval_interval=2), preset="tiny",
                          progress=False, sample_prompt=None, resume=True)
    line = [r.getMessage() for r in caplog.records if "tokens in this run" in r.getMessage()][-1]
    in_this_run = second.tokens_seen - first.tokens_seen
    assert in_this_run == 3 * 2 * 64 and f", {in_this_run} tokens in this run" in line
