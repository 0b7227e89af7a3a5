"""Pretrained-weight import and export, proven against the reference implementations.

Every format is checked by logits: gptlab's model holding imported weights must compute what
``transformers.GPT2LMHeadModel`` (or the LLMs-from-scratch book's ``GPTModel``) computes with them.

The TensorFlow test needs TensorFlow, which the dev extra leaves out (too heavy for CI). Run it with
``pip install -e '.[tf]'`` (or ``pip install tensorflow-cpu``), then ``python -m pytest tests/test_weights.py -k tf``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gptlab
from gptlab.cli import main
from gptlab.errors import GptlabError
from gptlab.generate import generate, generate_text
from gptlab.model import GPTConfig, GPTModel
from gptlab.run import save_model
from gptlab.tokenizer import get_tokenizer
from gptlab.weights import export_hf

transformers = pytest.importorskip("transformers")  # in the dev extra; a clear skip elsewhere
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

book_ch04 = pytest.importorskip("llms_from_scratch.ch04")  # the book's package, installed by `make test`

TOL = 1e-4
REPO = Path(__file__).resolve().parent.parent


def perturb_(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Random weights everywhere, biases and LayerNorms included, so that no mapped tensor goes untested."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def random_hf(vocab_size: int, n_positions: int, n_embd: int, n_layer: int, n_head: int, dropout: float = 0.0,
              tie: bool = True) -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None)
    return perturb_(GPT2LMHeadModel(config))


def batches(vocab_size: int, context_length: int) -> list[torch.Tensor]:
    """Batches of several sequence lengths, up to the full context."""
    return [torch.randint(0, vocab_size, (3, t)) for t in sorted({1, 7, context_length})]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def assert_same_logits(ours: GPTModel, reference, vocab_size: int, context_length: int, hf: bool) -> None:
    for ids in batches(vocab_size, context_length):
        expected = reference(ids).logits if hf else reference(ids)
        got = ours(ids)
        assert got.shape == expected.shape
        assert max_diff(got, expected) <= TOL, f"T={ids.shape[1]}: max abs diff {max_diff(got, expected)}"


# ---- Hugging Face ------------------------------------------------------------------------------

HF_CONFIGS = [  # widths, depths, head counts, vocabularies; dropout on and off (compared in eval mode)
    dict(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=2, dropout=0.0),
    dict(vocab_size=257, n_positions=48, n_embd=48, n_layer=3, n_head=4, dropout=0.1),
    dict(vocab_size=64, n_positions=16, n_embd=24, n_layer=1, n_head=3, dropout=0.0),
    dict(vocab_size=500, n_positions=40, n_embd=64, n_layer=4, n_head=8, dropout=0.1, tie=False),
]


@pytest.mark.parametrize("cfg", HF_CONFIGS, ids=lambda c: f"C{c['n_embd']}-L{c['n_layer']}-H{c['n_head']}")
def test_logits_equal_transformers(tmp_path, cfg):
    hf = random_hf(**cfg)
    hf.save_pretrained(tmp_path)
    model, _ = gptlab.load(tmp_path)
    assert model.config == GPTConfig(cfg["vocab_size"], cfg["n_positions"], cfg["n_embd"], cfg["n_layer"],
                                     cfg["n_head"], cfg["dropout"], True, cfg.get("tie", True))
    assert not model.training
    assert (model.lm_head.weight is model.wte.weight) == cfg.get("tie", True)
    assert_same_logits(model, hf, cfg["vocab_size"], cfg["n_positions"], hf=True)


def test_pytorch_model_bin_and_old_checkpoint_names(tmp_path):
    """A folder with only ``pytorch_model.bin`` (read with weights_only), keys without the ``transformer.``
    prefix and the causal-mask buffers old GPT-2 checkpoints carry, as openai-community/gpt2's do."""
    hf = random_hf(vocab_size=80, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    hf.config.save_pretrained(tmp_path)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    model, _ = gptlab.load(tmp_path)
    assert_same_logits(model, hf, 80, 16, hf=True)


def test_unsupported_hf_config_names_the_field(tmp_path):
    hf = random_hf(vocab_size=50, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    hf.config.layer_norm_epsilon = 1e-6
    hf.save_pretrained(tmp_path)
    with pytest.raises(GptlabError, match="layer_norm_epsilon"):
        gptlab.load(tmp_path)


def test_requested_config_mismatch_names_the_fields(tmp_path):
    random_hf(vocab_size=50, n_positions=8, n_embd=16, n_layer=2, n_head=2, dropout=0.1).save_pretrained(tmp_path)
    with pytest.raises(GptlabError, match="n_layer 2 \\(requested 3\\), n_head 2 \\(requested 4\\)") as e:
        gptlab.load(tmp_path, expect=GPTConfig(vocab_size=50, context_length=8, n_embd=16, n_layer=3, n_head=4))
    assert "n_embd" not in str(e.value) and "vocab_size" not in str(e.value)
    # dropout holds no weights: a requested one is taken, not an error
    model, _ = gptlab.load(tmp_path, expect=GPTConfig(50, 8, 16, 2, 2, dropout=0.25))
    assert model.config.dropout == 0.25 and model.drop.p == 0.25


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(GptlabError, match="no such file or directory"):
        gptlab.load(tmp_path / "missing")
    with pytest.raises(GptlabError, match="not a model folder"):
        gptlab.load(tmp_path)


# ---- the LLMs-from-scratch book ----------------------------------------------------------------

def random_book(vocab_size: int = 50257, context_length: int = 24, emb_dim: int = 32, n_heads: int = 4,
                n_layers: int = 2, drop_rate: float = 0.0, qkv_bias: bool = True):
    cfg = dict(vocab_size=vocab_size, context_length=context_length, emb_dim=emb_dim, n_heads=n_heads,
               n_layers=n_layers, drop_rate=drop_rate, qkv_bias=qkv_bias)
    return perturb_(book_ch04.GPTModel(cfg)), cfg


BOOK_CONFIGS = [
    dict(emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True),
    dict(emb_dim=48, n_heads=3, n_layers=3, qkv_bias=False, drop_rate=0.1),
    dict(vocab_size=50304, context_length=12, emb_dim=16, n_heads=1, n_layers=1),
]


@pytest.mark.parametrize("cfg", BOOK_CONFIGS, ids=lambda c: f"C{c['emb_dim']}-L{c['n_layers']}-H{c['n_heads']}")
def test_logits_equal_book_gptmodel(tmp_path, cfg):
    book, book_cfg = random_book(**cfg)
    torch.save(book.state_dict(), tmp_path / "model.pth")
    (tmp_path / "model.json").write_text(json.dumps(book_cfg))  # the book's GPT_CONFIG, for the head count
    model, tokenizer = gptlab.load(tmp_path / "model.pth")
    assert tokenizer.name == "gpt2"
    assert model.config == GPTConfig(book_cfg["vocab_size"], book_cfg["context_length"], cfg["emb_dim"],
                                     cfg["n_layers"], cfg["n_heads"], book_cfg["drop_rate"],
                                     book_cfg["qkv_bias"], tie_weights=False)  # the book's out_head is its own
    assert_same_logits(model, book, book_cfg["vocab_size"], book_cfg["context_length"], hf=False)


def test_book_checkpoint_forms(tmp_path):
    """GPT-2's head count for the book's widths; ``expect``; model_and_optimizer.pth; a classifier head."""
    book, cfg = random_book(vocab_size=100, context_length=8, emb_dim=768, n_heads=12, n_layers=1)
    torch.save(book.state_dict(), tmp_path / "gpt2-width.pth")
    model, _ = gptlab.load(tmp_path / "gpt2-width.pth")
    assert model.config.n_head == 12
    assert_same_logits(model, book, 100, 8, hf=False)

    book, cfg = random_book(emb_dim=32, n_heads=8, n_layers=1)
    optimizer = torch.optim.AdamW(book.parameters())
    torch.save({"model_state_dict": book.state_dict(), "optimizer_state_dict": optimizer.state_dict()},
               tmp_path / "model_and_optimizer.pth")
    with pytest.raises(GptlabError, match="number of attention heads"):
        gptlab.load(tmp_path / "model_and_optimizer.pth")
    expect = GPTConfig(50257, 24, 32, 1, 8, tie_weights=False)
    model, _ = gptlab.load(tmp_path / "model_and_optimizer.pth", expect=expect)
    assert_same_logits(model, book, 50257, 24, hf=False)

    book.out_head = torch.nn.Linear(32, 2)  # chapter 6: a spam classifier
    perturb_(book)
    torch.save(book.state_dict(), tmp_path / "classifier.pth")
    model, _ = gptlab.load(tmp_path / "classifier.pth", expect=expect)
    assert model.lm_head.out_features == 2
    assert_same_logits(model, book, 50257, 24, hf=False)
    with pytest.raises(GptlabError, match="classifier head"):
        export_hf(model, tmp_path / "hf")


class _Exploit:
    """Unpickling this would create a file: proof that a .pth is never unpickled as arbitrary objects."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pth_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"tok_emb.weight": torch.zeros(3, 2), "payload": _Exploit(marker)}, tmp_path / "evil.pth")
    with pytest.raises(GptlabError, match="not a plain state dict"):
        gptlab.load(tmp_path / "evil.pth")
    assert not marker.exists()
    torch.save({"encoder.weight": torch.zeros(3, 2)}, tmp_path / "other.pth")
    with pytest.raises(GptlabError, match="unrecognised keys \\['encoder.weight'\\]"):
        gptlab.load(tmp_path / "other.pth")


# ---- export, and the round trip through transformers ------------------------------------------

@pytest.mark.parametrize("qkv_bias,tie", [(True, True), (False, False)])
def test_round_trip_through_transformers(tmp_path, qkv_bias, tie):
    ours = perturb_(GPTModel(GPTConfig.preset("tiny", vocab_size=50257, qkv_bias=qkv_bias, tie_weights=tie)), 0.5)
    tokenizer = get_tokenizer("gpt2")
    export_hf(ours, tmp_path / "hf", tokenizer)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]

    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert_same_logits(ours, hf, 50257, 64, hf=True)

    back, back_tokenizer = gptlab.load(tmp_path / "hf")
    assert back.config == ours.config and back_tokenizer.name == "gpt2"
    with torch.no_grad():
        for ids in batches(50257, 64):
            assert torch.equal(back(ids), ours(ids))

    prompt = torch.tensor([tokenizer.encode("Every effort moves you")])
    greedy = generate(ours, prompt, max_new_tokens=12)
    assert torch.equal(generate(back, prompt, max_new_tokens=12), greedy)
    hf_greedy = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                            pad_token_id=tokenizer.eot_id, eos_token_id=None)
    assert torch.equal(hf_greedy, greedy)
    assert generate_text(back, back_tokenizer, "Every effort moves you", 12) == \
        generate_text(ours, tokenizer, "Every effort moves you", 12)


def test_export_keeps_a_custom_tokenizer(tmp_path):
    from gptlab.tokenizer import SimpleTokenizerV2

    tokenizer = SimpleTokenizerV2.from_text("the cat sat on the mat .")
    ours = GPTModel(GPTConfig.preset("tiny", vocab_size=tokenizer.n_vocab)).eval()
    export_hf(ours, tmp_path / "hf", tokenizer)
    back, back_tokenizer = gptlab.load(tmp_path / "hf")
    assert back_tokenizer.encode("the cat sat") == tokenizer.encode("the cat sat")


def test_cli_export_and_generate(tmp_path, capsys):
    ours = perturb_(GPTModel(GPTConfig.preset("tiny", vocab_size=50257)), 0.5)
    tokenizer = get_tokenizer("gpt2")
    save_model(tmp_path / "run", ours, tokenizer)
    assert main(["export", "--format", "hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert_same_logits(ours, hf, 50257, 64, hf=True)

    capsys.readouterr()
    args = ["generate", "--model", str(tmp_path / "hf"), "--prompt", "Hello", "--max-new-tokens", "8", "--device", "cpu"]
    assert main(args) == 0
    assert capsys.readouterr().out == "Hello" + generate_text(ours, tokenizer, "Hello", 8) + "\n"

    assert main(["export", "--format", "hf", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


# ---- the Hugging Face hub, offline from a cache in the hub's own layout ------------------------

def put_in_hub_cache(cache: Path, repo_id: str, model_dir: Path, revision: str = "a1" * 20) -> None:
    """Lay out ``model_dir``'s files as huggingface_hub's cache does: blobs, a snapshot of links, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in model_dir.iterdir():
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, repo / "blobs" / blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF_HOME at an empty folder and HF_HUB_OFFLINE=1, as a user would set them. huggingface_hub reads
    both when it is imported, so its module constants get the values the environment gives them."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home / "hub"


def test_hub_ids_load_from_the_cache_offline(tmp_path, offline_hub):
    hf = random_hf(vocab_size=50257, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    hf.save_pretrained(tmp_path / "saved")
    for extra in ("generation_config.json",):
        (tmp_path / "saved" / extra).unlink(missing_ok=True)
    put_in_hub_cache(offline_hub, "openai-community/gpt2", tmp_path / "saved")
    put_in_hub_cache(offline_hub, "someone/tiny-gpt2", tmp_path / "saved")

    for source in ("gpt2", "openai-community/gpt2", "someone/tiny-gpt2"):
        model, tokenizer = gptlab.load(source)
        assert tokenizer.name == "gpt2"
        assert_same_logits(model, hf, 50257, 16, hf=True)

    with pytest.raises(GptlabError, match="needs internet"):
        gptlab.load("gpt2-medium")


def test_cli_generate_from_hub_cache_in_a_fresh_process(tmp_path):
    """The environment variables themselves, read by a new process: what a user's shell does."""
    ours = perturb_(GPTModel(GPTConfig.preset("tiny", vocab_size=50257)), 0.5)
    export_hf(ours, tmp_path / "exported")
    put_in_hub_cache(tmp_path / "home" / "hub", "someone/tiny-gpt2", tmp_path / "exported")
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run(
        [sys.executable, "-m", "gptlab.cli", "generate", "--model", "someone/tiny-gpt2", "--prompt", "Hello",
         "--max-new-tokens", "8", "--device", "cpu"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello" + generate_text(ours, get_tokenizer("gpt2"), "Hello", 8) + "\n"


# ---- OpenAI's TensorFlow checkpoint ------------------------------------------------------------

def test_tf_checkpoint_without_tensorflow_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "hparams.json").write_text(json.dumps(dict(n_vocab=50257, n_ctx=8, n_embd=16, n_head=2, n_layer=1)))
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` now raises ImportError
    with pytest.raises(GptlabError, match=r"pip install 'gptlab\[tf\]'"):
        gptlab.load(tmp_path)


def write_openai_tf_checkpoint(tf, folder: Path, model: GPTModel) -> None:
    """A checkpoint with OpenAI's variable names and shapes (Conv1D weights as (1, in, out))."""
    c = model.config
    folder.mkdir()
    (folder / "hparams.json").write_text(json.dumps(dict(n_vocab=c.vocab_size, n_ctx=c.context_length,
                                                         n_embd=c.n_embd, n_head=c.n_head, n_layer=c.n_layer)))
    variables = {"model/wte": model.wte.weight, "model/wpe": model.wpe.weight,
                 "model/ln_f/g": model.ln_f.weight, "model/ln_f/b": model.ln_f.bias}
    for i, block in enumerate(model.h):
        for name, module in (("attn/c_attn", block.attn.c_attn), ("attn/c_proj", block.attn.c_proj),
                             ("mlp/c_fc", block.mlp.c_fc), ("mlp/c_proj", block.mlp.c_proj)):
            variables[f"model/h{i}/{name}/w"] = module.weight.t().unsqueeze(0)
            variables[f"model/h{i}/{name}/b"] = module.bias
        for name, module in (("ln_1", block.ln_1), ("ln_2", block.ln_2)):
            variables[f"model/h{i}/{name}/g"] = module.weight
            variables[f"model/h{i}/{name}/b"] = module.bias
    names = sorted(variables)
    tf.raw_ops.SaveV2(prefix=str(folder / "model.ckpt"), tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(variables[n].detach().numpy()) for n in names])
    (folder / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n')


def test_tf_checkpoint(tmp_path):
    tf = pytest.importorskip(
        "tensorflow", reason="TensorFlow is not installed: pip install -e '.[tf]' to run the TF checkpoint test"
    )
    from llms_from_scratch.ch05 import load_gpt2_params_from_tf_ckpt, load_weights_into_gpt

    source = perturb_(GPTModel(GPTConfig.preset("tiny", vocab_size=50257, context_length=16)), 0.5)
    write_openai_tf_checkpoint(tf, tmp_path / "124M", source)
    model, tokenizer = gptlab.load(tmp_path / "124M")
    assert model.config == source.config and tokenizer.name == "gpt2"
    with torch.no_grad():
        for ids in batches(50257, 16):
            assert torch.equal(model(ids), source(ids))

    # The book's own reader of the same files (chapter 5) agrees.
    settings = json.loads((tmp_path / "124M" / "hparams.json").read_text())
    params = load_gpt2_params_from_tf_ckpt(tf.train.latest_checkpoint(str(tmp_path / "124M")), settings)
    book, _ = random_book(vocab_size=50257, context_length=16, emb_dim=32, n_heads=2, n_layers=2)
    load_weights_into_gpt(book, params)
    assert_same_logits(model, book.eval(), 50257, 16, hf=False)
