"""QLoRA: LoRA adapters over a frozen int8 / int4 base. Only the adapters train and the loss falls, the base's bytes
stay as they were, a step's logits are float LoRA's over the dequantized base, and the run loads, resumes and
exports like any LoRA run."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptlab.cli import main
from gptlab.config import LoRAConfig, QuantizeConfig
from gptlab.lora import LoRAAdapter, LoRAOverLayer
from gptlab.pretrain import pretrain
from gptlab import quantize
from gptlab.quantize import QuantizedLinear, dequantize_model
from gptlab.run import ADAPTER_FILE, read_run_config
from gptlab.surgery import add_lora, weights_fingerprint
from gptlab.weights import build_model, load, load_run, quantize_run

ROOT = Path(__file__).resolve().parents[1]
VERDICT = ROOT / "data" / "the-verdict.txt"
SPAM = ROOT / "data" / "SMSSpamCollection"
LORA = LoRAConfig(rank=4, alpha=8.0, targets=("attn.c_attn", "mlp.c_fc", "head"))
# A training step's logits against float LoRA over the dequantized base: only the first layer, whose input needs no
# gradient, runs on the integer kernels (bf16 activations); every later layer dequantizes and runs F.linear.
LOGITS_RTOL = 3e-3  # measured: 6e-4 (int8), 4e-4 (int4) of the largest logit
# Without gradients every layer runs on the kernels, each rounding its input to bf16 (README: Low precision).
KERNELS_RTOL = 2e-2  # measured: 4.6e-3 (int8)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qlora")
    pretrain(VERDICT, root / "float", {"max_steps": 3, "eval_interval": 3}, preset="tiny", progress=False)
    for kind in ("int8", "int4"):
        quantize_run(root / "float", root / kind, QuantizeConfig(kind))
    return {"float": root / "float", "int8": root / "int8", "int4": root / "int4"}


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 1000, (2, 17), generator=g)  # (B, T + 1)
    return tokens[:, :-1], tokens[:, 1:]


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_the_gradient_reaches_the_input_without_keeping_the_float_weight(kind):
    torch.manual_seed(0)
    plain = torch.nn.Linear(64, 48)
    layer = quantize.LAYERS[kind].of(plain, QuantizeConfig(kind, 32 if kind == "int4" else None))
    with torch.no_grad():
        layer(torch.randn(3, 64))  # the kernel's path first: int4 swaps its integers for the kernel's copy
    x = torch.randn(2, 5, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    ref = x.detach().clone().requires_grad_(True)
    want = torch.nn.functional.linear(ref, layer.weight, layer.bias)
    want.backward(grad)
    assert torch.allclose(y, want, atol=1e-6) and torch.allclose(x.grad, ref.grad, atol=1e-6)
    assert not {(48, 64), (64, 48)} & set(saved)  # no float copy of the weight kept from forward to backward


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_only_the_adapters_train_the_base_bytes_stay_and_the_loss_falls(runs, kind):
    torch.manual_seed(0)
    model, _ = build_model("tiny", str(runs[kind]), None, {}, lora=LORA)
    base_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert all(isinstance(m.base_layer, QuantizedLinear) for m in model.modules() if isinstance(m, LoRAAdapter))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = batch()
    losses = []
    for _ in range(8):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_training_step_computes_float_lora_over_the_dequantized_base(runs, kind):
    qlora, _ = build_model("tiny", str(runs[kind]), None, {}, lora=LORA)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in qlora.modules():
            if isinstance(m, LoRAAdapter):
                m.lora_B.normal_(0, 0.1)
    reference, _ = load(runs[kind])
    add_lora(dequantize_model(reference), LORA, {"source": "test", "fingerprint": "test"})
    reference.load_state_dict({k: v for k, v in qlora.state_dict().items() if "lora_" in k}, strict=False)
    x, _ = batch(1)
    qlora.eval(), reference.eval()  # the same forward, without dropout's draws
    got, want = qlora(x), reference(x)  # a training step's forward: gradients reach the adapters
    assert got.requires_grad
    assert (got - want).abs().max() <= LOGITS_RTOL * want.abs().max()


def test_a_qlora_run_holds_the_adapters_loads_in_the_using_commands_and_exports(runs, tmp_path, capsys):
    out = tmp_path / "lm"
    code, _, err = run_cli(capsys, "pretrain", "--data", VERDICT, "--init", runs["int8"], "--lora", "--lora-rank", 4,
                           "--max-steps", 3, "--out", out, "--quiet")
    assert code == 0, err
    config = read_run_config(out)
    base, _ = load(runs["int8"])
    assert config["base"] == {"source": str(runs["int8"].resolve()), "fingerprint": weights_fingerprint(base)}
    assert config["lora"]["rank"] == 4 and all("lora_" in k for k in load_file(out / ADAPTER_FILE))
    model, _, _ = load_run(out)
    assert isinstance(model.h[0].attn.c_attn, LoRAOverLayer) and model.quantization.to == "int8"
    code, text, err = run_cli(capsys, "generate", "--model", out, "--prompt", "Every effort", "--max-new-tokens", 4,
                              "--temperature", 0)
    assert code == 0 and text.startswith("Every effort"), err

    code, requantized, err = run_cli(capsys, "generate", "--model", out, "--quantize", "int4", "--prompt",
                                     "Every effort", "--max-new-tokens", 4, "--temperature", 0)
    assert code == 0 and requantized.startswith("Every effort"), err  # dequantized, merged, then int4

    code, text, err = run_cli(capsys, "export", "--format", "peft", out, tmp_path / "peft")
    assert code == 0, err
    peft = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft["base_model_name_or_path"] == str(runs["int8"].resolve())
    code, text, err = run_cli(capsys, "export", "--merge", "--format", "hf", out, tmp_path / "hf")
    assert code == 0 and "LoRA merged, dequantized to float32" in text, err
    merged, _ = load(tmp_path / "hf")
    x, _ = batch(2)
    with torch.no_grad():
        want, got = model(x), merged(x)
    assert (got - want).abs().max() <= KERNELS_RTOL * want.abs().max()

    clf = tmp_path / "clf"
    code, _, err = run_cli(capsys, "finetune-classifier", "--data", SPAM, "--balance", "--init", runs["int4"],
                           "--lora", "--max-steps", 2, "--max-length", 16, "--out", clf, "--quiet")
    assert code == 0, err
    assert {k for k in load_file(clf / ADAPTER_FILE) if "lora_" not in k} == {"lm_head.weight", "lm_head.bias"}
    code, text, err = run_cli(capsys, "classify", "--model", clf, "WIN a free prize now")
    assert code == 0 and text.split("\t")[0].strip() in read_run_config(clf)["labels"], (text, err)


def test_resume_of_a_qlora_run_is_exact(runs, tmp_path, monkeypatch):
    import gptlab.pretrain as stage

    def train(out: Path):
        return pretrain(VERDICT, out, {"max_steps": 4, "eval_interval": 2, "lr": 1e-2}, init=str(runs["int4"]),
                        lora=True, lora_rank=4, progress=False)

    train(tmp_path / "whole")
    sample, interrupts = stage.generate_text, [signal.SIGINT]

    def sample_then_stop(*args, **kwargs):  # Ctrl-C at the first evaluation (step 2), once
        for sig in interrupts[:1]:
            interrupts.clear()
            signal.raise_signal(sig)
        return sample(*args, **kwargs)

    monkeypatch.setattr(stage, "generate_text", sample_then_stop)
    stopped = train(tmp_path / "split")
    assert stopped.interrupted and stopped.step == 2
    pretrain(None, tmp_path / "split", resume=True, progress=False)
    a, b = load_file(tmp_path / "whole" / ADAPTER_FILE), load_file(tmp_path / "split" / ADAPTER_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_a_quantized_base_without_lora_is_refused(runs, tmp_path, capsys):
    code, _, err = run_cli(capsys, "pretrain", "--data", VERDICT, "--init", runs["int8"], "--out", tmp_path / "x",
                           "--max-steps", 1)
    assert code == 2 and "which do not train; add --lora to train adapters over them (QLoRA)" in err
    assert "Traceback" not in err and not (tmp_path / "x").exists()
