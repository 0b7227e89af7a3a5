"""LoRA: the layer against the book's, merged against unmerged, runs that hold only the adapters, every stage
and using command, exact resume, and a one-line error for each bad input."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptlab.cli import main
from gptlab.config import DEFAULT_LORA_TARGETS, LORA_LR, GPTConfig, LoRAConfig
from gptlab.errors import GptlabError
from gptlab.lora import LoRALinear
from gptlab.model import GPTModel
from gptlab.pretrain import pretrain
from gptlab.run import ADAPTER_FILE, WEIGHTS_FILE, read_run_config, save_model
from gptlab.surgery import add_classifier_head, add_lora, merge_lora, select_trainable, weights_fingerprint
from gptlab.tokenizer import get_tokenizer
from gptlab.weights import load, load_run

book_e = pytest.importorskip("llms_from_scratch.appendix_e")  # the book's package, installed by `make test`
book_ch04 = pytest.importorskip("llms_from_scratch.ch04")

ROOT = Path(__file__).resolve().parents[1]
VERDICT = ROOT / "data" / "the-verdict.txt"
SPAM = ROOT / "data" / "SMSSpamCollection"
BASE_REF = {"source": "test", "fingerprint": "sha256:test"}


def tiny_model(seed: int = 0, **overrides) -> GPTModel:
    torch.manual_seed(seed)
    config = GPTConfig(**{**dict(vocab_size=97, context_length=16, n_embd=32, n_layer=2, n_head=4), **overrides})
    model = GPTModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # biases and norms away from their 0/1 init
    return model.eval()


def randomize_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(0, 0.1)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- the layer -------------------------------------------------------------------------------------

@pytest.mark.parametrize("targets", [DEFAULT_LORA_TARGETS, ("attn.c_attn", "head")], ids=["blocks", "qkv+head"])
def test_a_fresh_adapter_changes_nothing_and_merged_equals_unmerged(targets, tmp_path):
    model = tiny_model()
    idx = torch.randint(0, 97, (3, 16))
    before = model(idx)
    add_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=targets), BASE_REF)
    assert torch.equal(model(idx), before)  # B = 0: exactly the base
    randomize_adapters(model)
    unmerged = model(idx)
    assert (unmerged - before).abs().max() > 1e-3  # the adapters do act
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules()) and model.lora is None
    assert (model(idx) - unmerged).abs().max() <= 1e-5
    if "head" in targets:  # the head's adapter made it differ from the embedding: saved untied
        assert model.config.tie_weights is False and model.lm_head.weight is not model.wte.weight
    save_model(tmp_path / "merged", model, get_tokenizer("gpt2"))
    again, _, _ = load_run(tmp_path / "merged")
    assert (again(idx) - unmerged).abs().max() <= 1e-5


def test_only_the_adapters_train_and_the_base_stays_as_it_was():
    model = tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, LoRAConfig(rank=4), BASE_REF)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    # 2 layers x (4 x (32 + 96) + 4 x (32 + 32) + 4 x (32 + 128) + 4 x (128 + 32))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 4 * (128 + 64 + 160 + 160)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16)))
        loss.backward()
        opt.step()
        opt.zero_grad()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())


def test_a_classifier_head_trains_in_full_beside_the_adapters():
    model = add_classifier_head(tiny_model(), 3)
    add_lora(model, LoRAConfig(rank=2), BASE_REF)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"lm_head.weight", "lm_head.bias"} <= trainable
    assert all(n.startswith("lm_head.") or n.endswith(("lora_A", "lora_B")) for n in trainable)
    with pytest.raises(GptlabError, match="a model with LoRA adapters trains its adapters"):
        select_trainable(model, "all")
    with pytest.raises(GptlabError, match="leave 'head' out"):
        add_lora(add_classifier_head(tiny_model(), 2), LoRAConfig(targets=("head",)), BASE_REF)


@pytest.mark.parametrize("scaling", ["alpha/rank"])
def test_equal_to_the_books_appendix_e_lora(scaling, tmp_path):
    """The book's LinearWithLoRA stores A^T and B^T and multiplies by alpha; ours is PEFT's: alpha / rank.

    So the book's alpha is ours / rank. The fused q/k/v projection with rank 3r holds the book's three separate
    rank-r adapters (W_query, W_key, W_value) exactly: A stacks their A's, B is block diagonal.
    """
    rank, alpha = 2, 6.0
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True)
    book = book_ch04.GPTModel(cfg).eval()
    torch.save(book.state_dict(), tmp_path / "book.pth")
    (tmp_path / "book.json").write_text(json.dumps(cfg))
    ours_blocks, _ = load(tmp_path / "book.pth")
    ours_qkv, _ = load(tmp_path / "book.pth")
    book_e.replace_linear_with_lora(book, rank, alpha / rank)  # every Linear, the head too
    torch.manual_seed(1)
    with torch.no_grad():
        for m in book.modules():
            if isinstance(m, book_e.LoRALayer):
                m.B.normal_(0, 0.1)

    # the per-layer adapters: out_proj, both feed-forward layers and the head, one to one
    add_lora(ours_blocks, LoRAConfig(rank=rank, alpha=alpha, targets=("attn.c_proj", "mlp.c_fc", "mlp.c_proj",
                                                                        "head")), BASE_REF)
    pairs = [("lm_head", book.out_head)]
    for i, block in enumerate(book.trf_blocks):
        pairs += [(f"h.{i}.attn.c_proj", block.att.out_proj), (f"h.{i}.mlp.c_fc", block.ff.layers[0]),
                  (f"h.{i}.mlp.c_proj", block.ff.layers[2])]
    # the fused projection: our rank 3r, alpha scaled to keep alpha / rank
    add_lora(ours_qkv, LoRAConfig(rank=3 * rank, alpha=3 * alpha, targets=("attn.c_attn",)), BASE_REF)
    with torch.no_grad():
        for name, wrapped in pairs:
            layer = ours_blocks.get_submodule(name)
            layer.lora_A.copy_(wrapped.lora.A.t())
            layer.lora_B.copy_(wrapped.lora.B.t())
        for i, block in enumerate(book.trf_blocks):
            layer = ours_qkv.get_submodule(f"h.{i}.attn.c_attn")
            parts = (block.att.W_query.lora, block.att.W_key.lora, block.att.W_value.lora)
            layer.lora_A.copy_(torch.cat([p.A.t() for p in parts]))  # (3r, C)
            layer.lora_B.copy_(torch.block_diag(*[p.B.t() for p in parts]))  # (3C, 3r)

    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        reference = book(idx)
        # the book's model with only the q/k/v adapters acting: switch the others off
        for _, wrapped in pairs:
            wrapped.lora.alpha = 0.0
        qkv_only = book(idx)
        for _, wrapped in pairs:
            wrapped.lora.alpha = alpha / rank
        for block in book.trf_blocks:
            for layer in (block.att.W_query, block.att.W_key, block.att.W_value):
                layer.lora.alpha = 0.0
        blocks_only = book(idx)
        assert (ours_blocks(idx) - blocks_only).abs().max() <= 1e-5
        assert (ours_qkv(idx) - qkv_only).abs().max() <= 1e-5
        assert (qkv_only - reference).abs().max() > 1e-3 and (blocks_only - reference).abs().max() > 1e-3


@pytest.mark.parametrize("bad, message", [
    (dict(rank=0), "lora-rank must be a positive whole number"),
    (dict(alpha=0.0), "lora-alpha must be positive"),
    (dict(alpha=math.inf), "lora-alpha"),
    (dict(dropout=1.0), r"lora-dropout must be in \[0, 1\)"),
    (dict(dropout=-0.1), r"lora-dropout must be in \[0, 1\)"),
    (dict(targets=("attn.c_attn", "q_proj")), "unknown 'q_proj'; choose from attn.c_attn"),
    (dict(targets=()), "unknown \\(none given\\)"),
])
def test_bad_lora_settings_are_one_line_errors(bad, message):
    with pytest.raises(GptlabError, match=message):
        LoRAConfig(**bad)


def test_a_rank_above_a_layers_smaller_dimension_is_refused():
    with pytest.raises(GptlabError, match="--lora-rank 33 is larger than h.0.attn.c_attn's smaller dimension"):
        add_lora(tiny_model(), LoRAConfig(rank=33), BASE_REF)


def test_the_fingerprint_follows_the_weights_not_the_format(tmp_path):
    model = tiny_model()
    save_model(tmp_path / "run", model, get_tokenizer("gpt2"))
    loaded, _, _ = load_run(tmp_path / "run")
    assert weights_fingerprint(loaded) == weights_fingerprint(model)
    with torch.no_grad():
        loaded.h[0].mlp.c_fc.weight[0, 0] += 1e-6
    assert weights_fingerprint(loaded) != weights_fingerprint(model)


# ---- runs -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "base"
    pretrain(VERDICT, out, {"max_steps": 3, "eval_interval": 3}, preset="tiny", progress=False)
    return out


def test_a_lora_run_holds_only_the_adapters_and_names_its_base(base, tmp_path, capsys):
    out = tmp_path / "lora"
    pretrain(VERDICT, out, {"max_steps": 3, "eval_interval": 3, "lr": 1e-2}, init=base, lora=True, lora_rank=4,
             progress=False)
    assert (out / ADAPTER_FILE).is_file() and not (out / WEIGHTS_FILE).exists()
    config = read_run_config(out)
    assert config["lora"] == {"rank": 4, "alpha": 16.0, "dropout": 0.0, "targets": list(DEFAULT_LORA_TARGETS)}
    base_model, _ = load(base)
    assert config["base"] == {"source": str(base.resolve()), "fingerprint": weights_fingerprint(base_model)}
    stored = load_file(out / ADAPTER_FILE)
    assert sorted(stored) == sorted(f"h.{i}.{t}.lora_{m}" for i in range(2) for t in DEFAULT_LORA_TARGETS
                                    for m in "AB")
    model, _, _ = load_run(out)
    idx = torch.randint(0, 50257, (1, 16))
    # the run is the base plus the stored adapters, computed unmerged
    add_lora(base_model, LoRAConfig(rank=4), BASE_REF)
    with torch.no_grad():
        for name, tensor in stored.items():
            base_model.get_parameter(name).copy_(tensor)
    assert torch.equal(model(idx), base_model(idx))
    code, text, _ = run_cli(capsys, "generate", "--model", out, "--prompt", "Every effort", "--max-new-tokens", 4)
    assert code == 0 and text.splitlines()[-1].startswith("Every effort")


def test_a_changed_or_missing_base_is_a_clear_error(base, tmp_path, capsys):
    import shutil

    copy = tmp_path / "base"
    shutil.copytree(base, copy)
    out = tmp_path / "lora"
    pretrain(VERDICT, out, {"max_steps": 2, "eval_interval": 2}, init=copy, lora=True, lora_rank=2, progress=False)
    model, _, _ = load_run(copy)
    with torch.no_grad():
        model.wte.weight[0, 0] += 1.0
    save_model(copy, model, get_tokenizer("gpt2"), {k: v for k, v in read_run_config(copy).items()
                                                     if k not in ("model", "tokenizer")})
    with pytest.raises(GptlabError, match="the weights there are not the ones they were trained on"):
        load_run(out)
    shutil.rmtree(copy)
    code, _, err = run_cli(capsys, "generate", "--model", out, "--prompt", "hi")
    assert code != 0 and "holds LoRA adapters for the base" in err and "does not load" in err
    assert "Traceback" not in err


def test_resume_of_a_lora_run_is_exact_and_ctrl_c_saves(base, tmp_path, monkeypatch):
    import signal

    import gptlab.pretrain as stage

    settings = dict(init=base, lora=True, lora_rank=4, lora_dropout=0.1, dropout=0.1)
    config = {"max_steps": 4, "eval_interval": 2, "lr": 1e-2}
    pretrain(VERDICT, tmp_path / "whole", config, progress=False, **settings)
    sample = stage.generate_text

    def ctrl_c_at_the_first_sample(*args, **kwargs):
        monkeypatch.setattr(stage, "generate_text", sample)
        signal.raise_signal(signal.SIGINT)
        return sample(*args, **kwargs)

    monkeypatch.setattr(stage, "generate_text", ctrl_c_at_the_first_sample)
    stopped = pretrain(VERDICT, tmp_path / "split", config, progress=False, **settings)
    assert stopped.interrupted and stopped.step == 2 and (tmp_path / "split" / ADAPTER_FILE).is_file()
    pretrain(None, tmp_path / "split", resume=True, progress=False)
    a, b = load_file(tmp_path / "whole" / ADAPTER_FILE), load_file(tmp_path / "split" / ADAPTER_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "whole" / "metrics.csv").read_text() == (tmp_path / "split" / "metrics.csv").read_text()


def test_resume_must_keep_lora_on_or_off(base, tmp_path, capsys):
    full, adapted = tmp_path / "full", tmp_path / "adapted"
    pretrain(VERDICT, full, {"max_steps": 1}, init=base, progress=False)
    pretrain(VERDICT, adapted, {"max_steps": 1}, init=base, lora=True, progress=False)
    code, _, err = run_cli(capsys, "pretrain", "--out", full, "--resume", "--lora", "--max-steps", 2, "--quiet")
    assert code == 2 and "--lora on (the run has off)" in err
    with pytest.raises(GptlabError, match="--lora off \\(the run has on\\)"):
        pretrain(None, adapted, resume=True, lora=False, progress=False)
    code, _, err = run_cli(capsys, "pretrain", "--out", adapted, "--resume", "--lora-rank", 4, "--max-steps", 2,
                           "--quiet")
    assert code == 2 and "--lora-rank 4 (the run has 8)" in err


def test_lora_needs_a_trained_model_to_adapt(capsys, tmp_path):
    code, _, err = run_cli(capsys, "pretrain", "--data", VERDICT, "--preset", "tiny", "--lora", "--out", tmp_path / "x")
    assert code == 2 and "--lora adapts a trained model: give --init SOURCE" in err
    code, _, err = run_cli(capsys, "finetune-classifier", "--data", SPAM, "--init", "x", "--lora", "--trainable", "all",
                           "--out", tmp_path / "x")
    assert code == 2 and "--trainable all and --lora both choose what trains" in err
    code, _, err = run_cli(capsys, "finetune-instruct", "--init", "x", "--lora", "--lora-targets", "attn.c_attn,fc",
                           "--out", tmp_path / "x")
    assert code == 2 and "unknown 'fc'" in err and not (tmp_path / "x").exists()


def test_classifier_instruct_and_dpo_stages_take_lora_and_the_using_commands_read_it(base, tmp_path, capsys):
    clf = tmp_path / "clf"
    code, _, err = run_cli(capsys, "finetune-classifier", "--data", SPAM, "--balance", "--init", base, "--lora",
                           "--lora-targets", "attn.c_attn,mlp.c_fc", "--max-steps", 3, "--max-length", 16,
                           "--out", clf, "--quiet")
    assert code == 0, err
    stored = load_file(clf / ADAPTER_FILE)
    assert {"lm_head.weight", "lm_head.bias"} <= stored.keys() and len(stored) == 2 + 2 * 2 * 2
    assert read_run_config(clf)["train"]["lr"] == LORA_LR["classifier"]  # the adapters' default rate
    code, text, _ = run_cli(capsys, "classify", "--model", clf, "WIN a free prize now")
    assert code == 0 and text.split()[0] in ("ham", "spam")

    sft = tmp_path / "sft"
    records = [{"instruction": f"Say {w}.", "input": "", "output": w, "chosen": w, "rejected": f"no {w}"}
               for w in ("hi", "yes", "no", "maybe", "soon", "later", "now", "never", "always", "ok")]
    (tmp_path / "records.json").write_text(json.dumps(records))
    code, _, err = run_cli(capsys, "finetune-instruct", "--data", tmp_path / "records.json", "--init", base, "--lora",
                           "--lora-rank", 2, "--max-steps", 2, "--out", sft, "--quiet")
    assert code == 0, err
    assert read_run_config(sft)["lora"]["rank"] == 2 and read_run_config(sft)["train"]["lr"] == LORA_LR["instruct"]
    (tmp_path / "in.json").write_text(json.dumps(records[:2]))
    code, _, err = run_cli(capsys, "respond", "--model", sft, "--input", tmp_path / "in.json", "--output",
                           tmp_path / "answers.json", "--max-new-tokens", 3, "--quiet")
    assert code == 0, err and len(json.loads((tmp_path / "answers.json").read_text())) == 2

    # DPO on the LoRA instruct run: its adapters are folded into the base, new ones train on top
    dpo = tmp_path / "dpo"
    code, _, err = run_cli(capsys, "finetune-dpo", "--data", tmp_path / "records.json", "--init", sft, "--lora",
                           "--lora-rank", 2, "--max-steps", 2, "--out", dpo, "--quiet")
    assert code == 0, err
    config = read_run_config(dpo)
    assert config["base"]["source"] == str(sft.resolve()) and (dpo / ADAPTER_FILE).is_file()
    code, text, err = run_cli(capsys, "generate", "--model", dpo, "--prompt", "Hello", "--max-new-tokens", 3)
    assert code == 0, err


def test_a_lora_run_is_served_as_it_generates(base, tmp_path):
    import openai

    from gptlab.generate import generate_text
    from gptlab.serve import BackgroundServer, ServedModel, create_app

    out = tmp_path / "lora"
    pretrain(VERDICT, out, {"max_steps": 2, "eval_interval": 2, "lr": 1e-2}, init=base, lora=True, progress=False)
    served = ServedModel.load(out)
    assert served.model.lora is not None  # served with its adapters, on the base named in the run
    model, tokenizer, _ = load_run(out)
    expected = generate_text(model, tokenizer, "Every effort", max_new_tokens=6)
    with BackgroundServer(create_app(served, api_key="k")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0, timeout=30)
        reply = client.completions.create(model="lora", prompt="Every effort", max_tokens=6, temperature=0)
    assert reply.choices[0].text == expected
