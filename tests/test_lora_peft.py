"""LoRA adapters to and from Hugging Face PEFT (issue 16), proven with the real ``peft`` package by logits.

gptlab's LoRA run -> ``gptlab export --format peft`` -> ``peft.PeftModel.from_pretrained`` on the base exported
with ``--format hf`` computes what gptlab's unmerged model computes; PEFT's own ``save_pretrained`` folder ->
``gptlab.load`` (and so ``generate --model``, ``--init``) computes what PEFT computes; ``export --merge`` writes
models that need no base; and every input gptlab cannot take is one line naming the fix.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import gptlab
from gptlab.cli import main
from gptlab.config import LoRAConfig
from gptlab.errors import GptlabError
from gptlab.generate import generate_text
from gptlab.model import GPTConfig, GPTModel
from gptlab.run import read_run_config, save_model
from gptlab.surgery import add_classifier_head, add_lora
from gptlab.tokenizer import get_tokenizer
from gptlab.weights import base_reference, export_hf, export_peft, load_base

transformers = pytest.importorskip("transformers")  # both in the dev extra
peft = pytest.importorskip("peft")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "data"
TOL = 1e-4  # gptlab against transformers/PEFT: two implementations
MERGE_TOL = 1e-5  # merged against unmerged: one implementation, the same numbers summed in another order
VOCAB = 50257


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def randomize_lora_B_(model: torch.nn.Module, scale: float = 0.1) -> None:
    """B starts at zero (an adapter that changes nothing); random values make every adapter count."""
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * scale)


def gptlab_lora_run(root: Path, name: str, targets: tuple[str, ...], tie: bool = True, qkv_bias: bool = True,
                    classes: int | None = None) -> tuple[Path, Path]:
    """A base run (random weights) and a LoRA run on it with nonzero B, as the stages write them."""
    torch.manual_seed(3)
    base = GPTModel(GPTConfig.preset("tiny", vocab_size=VOCAB, tie_weights=tie, qkv_bias=qkv_bias))
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tokenizer = get_tokenizer("gpt2")
    save_model(root / f"{name}-base", base, tokenizer, {"stage": "pretrain"})
    model, _ = gptlab.load(root / f"{name}-base")
    base_ref = base_reference(root / f"{name}-base", model)  # of the base as loaded, before any surgery
    meta = {"stage": "pretrain"}
    if classes:
        add_classifier_head(model, classes)
        meta = {"stage": "classifier", "labels": ["ham", "spam"], "classifier": {"max_length": 16}}
    add_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=targets), base_ref)
    randomize_lora_B_(model)
    save_model(root / name, model, tokenizer, meta)
    return root / f"{name}-base", root / name


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("peft")


@pytest.fixture(scope="module")
def peft_folder(root) -> tuple[Path, Path, torch.Tensor]:
    """PEFT's own adapter: get_peft_model on a random GPT2LMHeadModel, B randomized, save_pretrained.
    Returns (base folder, adapter folder, PEFT's logits on ``ids()``)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    hf.save_pretrained(root / "hf-base")
    hf = GPT2LMHeadModel.from_pretrained(root / "hf-base")  # so that PEFT records where the base is
    config = LoraConfig(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, r=4, lora_alpha=8,
                        lora_dropout=0.1, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(hf, config)
    randomize_lora_B_(model)
    model.eval()
    model.save_pretrained(root / "peft")
    with torch.no_grad():
        logits = model(ids()).logits
    return root / "hf-base", root / "peft", logits


# ---- gptlab -> PEFT ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("targets,tie,qkv_bias", [
    (("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), True, True),
    (("attn.c_attn", "mlp.c_fc", "head"), True, False),  # a tied head's adapter: PEFT's on lm_head alone too
    (("attn.c_proj", "head"), False, True),
])
def test_a_gptlab_lora_run_loads_in_peft(root, capsys, targets, tie, qkv_bias):
    from peft import PeftModel

    name = "lm-" + "-".join(t.replace(".", "") for t in targets)
    base_run, lora_run = gptlab_lora_run(root, name, targets, tie=tie, qkv_bias=qkv_bias)
    peft_dir, hf_base = root / f"{name}-peft", root / f"{name}-hf"
    assert run_cli(["export", "--format", "peft", lora_run, peft_dir], capsys)[0] == 0
    assert run_cli(["export", "--format", "hf", base_run, hf_base], capsys)[0] == 0
    assert sorted(p.name for p in peft_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    config = json.loads((peft_dir / "adapter_config.json").read_text())
    expected_modules = ["lm_head" if t == "head" else t for t in targets]
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8, expected_modules)
    assert config["fan_in_fan_out"] is True and config["inference_mode"] is True
    assert config["base_model_name_or_path"] == read_run_config(lora_run)["base"]["source"] == str(base_run.resolve())
    keys = load_file(peft_dir / "adapter_model.safetensors")
    assert "base_model.model.transformer.h.1.%s.lora_A.weight" % targets[0] in keys
    assert ("base_model.model.lm_head.lora_B.weight" in keys) == ("head" in targets)

    ours, _ = gptlab.load(lora_run)
    plain, _ = gptlab.load(base_run)
    with torch.no_grad():
        assert max_diff(ours(ids()), plain(ids())) > 1e-2  # the adapters do act
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(hf_base), peft_dir).eval()
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()], messages
    with torch.no_grad():
        expected = ours(ids())
        assert max_diff(theirs(ids()).logits, expected) <= TOL
        back, _ = gptlab.load(peft_dir)  # and back: the base named in the folder, the same adapters
        assert max_diff(back(ids()), expected) == 0.0
    assert back.lora == ours.lora


# ---- PEFT -> gptlab ---------------------------------------------------------------------------------------

def test_a_peft_adapter_loads_in_gptlab(peft_folder, root, tmp_path, capsys, monkeypatch):
    hf_base, peft_dir, expected = peft_folder
    model, tokenizer = gptlab.load(peft_dir)
    assert model.lora == LoRAConfig(rank=4, alpha=8.0, dropout=0.1, targets=("attn.c_attn", "attn.c_proj",
                                                                           "mlp.c_fc", "mlp.c_proj"))
    assert model.base_ref["source"] == str(hf_base.resolve()) and not model.training
    with torch.no_grad():
        assert max_diff(model(ids()), expected) <= TOL

    # a relative base is found from the adapter folder; PEFT's pickle format is read as tensors only
    relative = tmp_path / "adapters" / "peft"
    relative.parent.mkdir()
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    (relative).mkdir()
    (relative / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "../../hf-base"}))
    shutil.copytree(hf_base, tmp_path / "hf-base")
    torch.save(load_file(peft_dir / "adapter_model.safetensors"), relative / "adapter_model.bin")
    monkeypatch.chdir(root)  # where "../../hf-base" means nothing
    again, _ = gptlab.load(relative)
    with torch.no_grad():
        assert max_diff(again(ids()), expected) <= TOL

    # every command that uses a model takes the folder
    code, out, err = run_cli(["generate", "--model", peft_dir, "--prompt", "Hello", "--max-new-tokens", "5",
                              "--device", "cpu"], capsys)
    assert code == 0, err
    assert out == "Hello" + generate_text(model, tokenizer, "Hello", 5) + "\n"

    # --init merges it: a stage starts from the adapted weights
    merged, _ = load_base(peft_dir)
    assert getattr(merged, "lora", None) is None
    with torch.no_grad():
        assert max_diff(merged(ids()), expected) <= TOL
    code, _, err = run_cli(["pretrain", "--data", DATA / "the-verdict.txt", "--init", peft_dir, "--out",
                            tmp_path / "run", "--max-steps", "1", "--batch-size", "2", "--quiet",
                            "--sample-prompt", ""], capsys)
    assert code == 0, err
    run = read_run_config(tmp_path / "run")
    assert "lora" not in run and run["model"]["n_embd"] == 32
    gptlab.load(tmp_path / "run")


@pytest.mark.parametrize("targets,layers", [(["c_attn", "lm_head"], None), (["c_fc"], [1])])
def test_peft_adapters_on_the_tied_head_and_on_some_layers(peft_folder, tmp_path, targets, layers):
    """A tied lm_head among the targets (PEFT then saves a copy of it beside the adapters), and an adapter on
    some layers only (gptlab gives the others zeros: no change)."""
    from peft import LoraConfig, get_peft_model

    hf = GPT2LMHeadModel.from_pretrained(peft_folder[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(hf, LoraConfig(target_modules=targets, layers_to_transform=layers, r=4, lora_alpha=16,
                                              fan_in_fan_out=True, task_type="CAUSAL_LM"))
        randomize_lora_B_(model)
        model.eval().save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = model(ids()).logits
        ours, _ = gptlab.load(tmp_path / "peft")
        assert max_diff(ours(ids()), expected) <= TOL
    if "lm_head" in targets:
        saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
        assert "base_model.model.lm_head.base_layer.weight" in saved
        assert ours.lm_head.weight is ours.wte.weight  # still tied: the adapter changes the head's output alone


# ---- export --merge: models that need no base -------------------------------------------------------------

@pytest.mark.parametrize("source", ["gptlab", "peft"])
def test_merged_exports_stand_alone(root, peft_folder, tmp_path, capsys, source):
    if source == "gptlab":
        base, lora = gptlab_lora_run(tmp_path, "lm", ("attn.c_attn", "mlp.c_proj", "head"))
    else:
        lora = tmp_path / "peft"
        shutil.copytree(peft_folder[1], lora)
        base = tmp_path / "hf-base"
        shutil.copytree(peft_folder[0], base)
        config = json.loads((lora / "adapter_config.json").read_text())
        (lora / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    unmerged, _ = gptlab.load(lora)
    with torch.no_grad():
        expected = unmerged(ids())
    assert run_cli(["export", "--format", "hf", "--merge", lora, tmp_path / "hf"], capsys)[0] == 0
    assert run_cli(["export", "--format", "run", "--merge", lora, tmp_path / "run"], capsys)[0] == 0
    shutil.rmtree(base)  # neither needs it
    assert "lora" not in read_run_config(tmp_path / "run")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert max_diff(hf(ids()).logits, expected) <= TOL
        for folder in ("hf", "run"):
            model, _ = gptlab.load(tmp_path / folder)
            assert getattr(model, "lora", None) is None
            assert max_diff(model(ids()), expected) <= MERGE_TOL
    with pytest.raises(GptlabError, match="which does not load"):
        gptlab.load(lora)  # the LoRA source itself needs its base


def test_a_merged_classifier_run_keeps_its_labels(tmp_path, capsys):
    from gptlab.classify import Classifier

    _, lora = gptlab_lora_run(tmp_path, "clf", ("attn.c_attn",), classes=2)
    unmerged, _ = gptlab.load(lora)
    code, _, err = run_cli(["export", "--format", "peft", lora, tmp_path / "peft"], capsys)
    assert code == 2 and "PEFT export covers language models" in err and "export --merge --format run" in err
    assert run_cli(["export", "--format", "run", "--merge", lora, tmp_path / "run"], capsys)[0] == 0
    classifier = Classifier.load(tmp_path / "run")
    assert classifier.labels == ["ham", "spam"] and classifier.max_length == 16
    with torch.no_grad():
        assert max_diff(classifier.model(ids()), unmerged(ids())) <= MERGE_TOL


def test_export_hf_refuses_adapters(tmp_path):
    _, lora = gptlab_lora_run(tmp_path, "lm", ("attn.c_attn",))
    model, _ = gptlab.load(lora)
    with pytest.raises(GptlabError, match="cannot hold: merge them"):
        export_hf(model, tmp_path / "hf")
    plain, _ = gptlab.load(tmp_path / "lm-base")
    with pytest.raises(GptlabError, match="has no LoRA adapters"):
        export_peft(plain, tmp_path / "peft", "base")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "peft").exists()


# ---- one line for each input gptlab cannot take -----------------------------------------------------------

def edit_config(**changes):
    def edit(folder: Path) -> None:
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(changes)
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return edit


def rename_keys(old: str, new: str):
    def edit(folder: Path) -> None:
        state = load_file(folder / "adapter_model.safetensors")
        save_file({k.replace(old, new): v for k, v in state.items()}, folder / "adapter_model.safetensors")
    return edit


def other_base(folder: Path) -> None:  # a wider GPT-2 than the one the adapter was trained on
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=48, n_layer=2, n_head=2)).save_pretrained(
        folder / "wider")
    edit_config(base_model_name_or_path=str(folder / "wider"))(folder)


def llama_base(folder: Path) -> None:
    (folder / "llama").mkdir()
    (folder / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    edit_config(base_model_name_or_path=str(folder / "llama"))(folder)


def own_head(folder: Path) -> None:  # PEFT saved the (tied) head beside the adapters, and it is not the base's
    state = load_file(folder / "adapter_model.safetensors")
    state["base_model.model.lm_head.base_layer.weight"] = torch.zeros(VOCAB, 32)
    save_file(state, folder / "adapter_model.safetensors")


BAD_ADAPTERS = [
    (edit_config(peft_type="IA3"), "peft_type 'IA3': gptlab loads LoRA adapters only"),
    (edit_config(use_dora=True), "gptlab's LoRA does not implement use_dora=true"),
    (edit_config(use_rslora=True), "does not implement use_rslora=true"),
    (edit_config(rank_pattern={"c_attn": 8}), 'does not implement rank_pattern={"c_attn": 8}'),
    (edit_config(alpha_pattern={"c_fc": 32}), 'does not implement alpha_pattern={"c_fc": 32}'),
    (edit_config(init_lora_weights="pissa"), "init_lora_weights=\"pissa\" (it changes the base's weights)"),
    (edit_config(task_type="SEQ_CLS"), "task_type 'SEQ_CLS': gptlab loads adapters of language models"),
    (edit_config(base_model_name_or_path=None), "no base_model_name_or_path; set it to the base model"),
    (rename_keys("transformer.h.", "model.layers."), "a PEFT folder for another architecture"),
    (rename_keys("h.0.attn.c_attn", "wte"), "an adapter on wte (lora_A.weight), which gptlab cannot map"),
    (other_base, "needs (4, 48): a PEFT folder for another architecture (or another base)"),
    (llama_base, "model_type 'llama' is not 'gpt2'"),
    (own_head, "holds its own lm_head weights, unlike those of the base"),
    (edit_config(bias="all"), 'does not implement bias="all"'),
]


@pytest.mark.parametrize("edit,message", BAD_ADAPTERS, ids=[m[:30] for _, m in BAD_ADAPTERS])
def test_a_peft_folder_gptlab_cannot_take_is_one_line(peft_folder, tmp_path, capsys, edit, message):
    folder = tmp_path / "peft"
    shutil.copytree(peft_folder[1], folder)
    edit(folder)
    capsys.readouterr()  # what making the bad folder printed
    code, out, err = run_cli(["generate", "--model", folder, "--prompt", "hi", "--device", "cpu"], capsys)
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("gptlab generate: error: ")


def test_export_options_that_do_not_fit_are_one_line(root, tmp_path, capsys):
    base, lora = gptlab_lora_run(tmp_path, "lm", ("attn.c_attn",))
    out_dir = tmp_path / "out"
    cases = [
        (["--format", "hf", lora, out_dir], "holds LoRA adapters, which a Hugging Face GPT-2 folder cannot keep "
                                            "apart from the weights: pass --merge"),
        (["--format", "hf", lora, out_dir], "or write the adapters alone for PEFT with --format peft"),
        (["--format", "run", lora, out_dir], "which a standalone run cannot keep apart from the weights: pass --merge"),
        (["--format", "peft", base, out_dir], "has no LoRA adapters; --format peft writes the adapters of a LoRA run"),
        (["--format", "peft", "--merge", lora, out_dir], "leave out --merge, or use --format hf / run"),
        (["--format", "peft", lora, lora], "is where the model is read from"),
    ]
    for args, message in cases:
        code, out, err = run_cli(["export", *args], capsys)
        assert code == 2 and out == "", err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not out_dir.exists()
