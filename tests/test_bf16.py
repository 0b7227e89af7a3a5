"""bfloat16: ``--dtype bf16`` inference (weights held in bf16), bf16 autocast training, ``--precision auto``, and
the one-line errors on a device without native bf16.

Where a test needs a CPU with or without native bf16, ``gptlab.device.cpu_bf16_instructions`` (what
/proc/cpuinfo says) is replaced, so the test means the same on every machine; bf16 arithmetic itself runs
everywhere (emulated, slowly, where the CPU lacks it). Bounds: bf16 keeps 8 bits of mantissa, so logits and
gradients are compared at a few parts in a hundred of their largest magnitude.
"""
from __future__ import annotations

import logging

import pytest
import torch

import gptlab.device
import gptlab.loss
from gptlab.classify import Classifier
from gptlab.cli import main
from gptlab.device import AUTO_BF16_MIN_PARAMETERS, inference_dtype, resolve_precision
from gptlab.errors import GptlabError
from gptlab.generate import generate, generate_text
from gptlab.linear import CPULinear, packed_weights
from gptlab.model import GPTConfig, GPTModel, KVCache
from gptlab.run import save_model
from gptlab.serve import ServedModel
from gptlab.surgery import add_classifier_head
from gptlab.tokenizer import GPT2Tokenizer
from gptlab.train import lm_loss
from gptlab.weights import load

CPU = torch.device("cpu")


@pytest.fixture
def no_bf16_cpu(monkeypatch):
    monkeypatch.setattr(gptlab.device, "cpu_bf16_instructions", lambda: None)


@pytest.fixture
def bf16_cpu(monkeypatch):
    monkeypatch.setattr(gptlab.device, "cpu_bf16_instructions", lambda: "avx512_bf16")


def test_cpuinfo_detection_names_a_flag_this_cpu_has():
    found = gptlab.device.cpu_bf16_instructions()
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        flags = []
    assert found is None or found in flags
    assert (found is None) == (not {"amx_bf16", "avx512_bf16", "bf16"} & set(flags))


@pytest.mark.usefixtures("no_bf16_cpu")
def test_bf16_on_a_cpu_without_it_is_a_one_line_error(tiny_lm_run, tmp_path, verdict_path, capsys):
    with pytest.raises(GptlabError, match=r"--precision bf16 on cpu: this CPU has no native bfloat16 .*use --precision fp32"):
        resolve_precision("bf16", CPU)
    with pytest.raises(GptlabError, match=r"--dtype bf16 on cpu: .*use --dtype fp32"):
        inference_dtype("bf16", CPU)
    for argv in (["generate", "--model", str(tiny_lm_run), "--prompt", "Hi", "--dtype", "bf16", "--device", "cpu"],
                 ["pretrain", "--data", str(verdict_path), "--out", str(tmp_path / "run"), "--preset", "tiny",
                  "--precision", "bf16", "--device", "cpu", "--max-steps", "1", "--quiet"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "has no native bfloat16" in err and "fp32" in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written
    assert resolve_precision("fp16", CPU) == torch.float16  # torch's CPU autocast runs fp16: not refused


def test_auto_picks_bf16_only_on_a_bf16_cpu_for_a_model_where_it_measured_faster(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="gptlab")
    monkeypatch.setattr(gptlab.device, "cpu_bf16_instructions", lambda: "avx512_bf16")
    assert resolve_precision("auto", CPU, AUTO_BF16_MIN_PARAMETERS) == torch.bfloat16
    assert "precision auto: bf16 (the CPU has avx512_bf16" in caplog.text
    assert resolve_precision("auto", CPU, AUTO_BF16_MIN_PARAMETERS - 1) is None
    assert resolve_precision("auto", CPU) is None  # no model size given: float32
    monkeypatch.setattr(gptlab.device, "cpu_bf16_instructions", lambda: None)
    assert resolve_precision("auto", CPU, 10**9) is None
    assert "precision auto: fp32 (no native bfloat16 here" in caplog.text


def bf16_copy(model: GPTModel) -> GPTModel:
    copy = GPTModel(model.config).to(torch.bfloat16).eval()
    copy.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    return copy


def test_bf16_weights_give_float32_logits_within_bounds_on_every_decoding_path():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.preset("tiny")).eval()
    low = bf16_copy(model)
    ids = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids)  # (B, T, V) float32
        full = low(ids)
        assert full.dtype == torch.bfloat16
        assert (full.float() - ref).abs().max() < 0.03 * ref.abs().max()
        # the KV cache holds bf16 keys and values; one-token steps (packed weights, as decoding runs) match
        # the full forward at every position
        cache = KVCache(low.config, 2, 20, CPU, torch.bfloat16)
        with packed_weights(low, 2):
            steps = [low(ids[:, :12], cache=cache)[:, -1]] + [low(ids[:, t : t + 1], cache=cache)[:, -1]
                                                              for t in range(12, 20)]
        assert cache.k[0].dtype == torch.bfloat16
        cached = torch.stack(steps, dim=1).float()  # (B, 9, V)
        assert (cached - full[:, 11:].float()).abs().max() < 0.03 * ref.abs().max()
        # one row through oneDNN's packed bf16 layout equals one row through the plain weights
        row = ids[:1, :5]
        plain = low(row)
        with packed_weights(low, 1):
            assert low.h[0].attn.c_attn.packed is not None
            torch.testing.assert_close(low(row), plain, rtol=2e-2, atol=2e-2 * plain.abs().max().item())
    assert low.h[0].attn.c_attn.packed is None  # the copies are dropped after


def test_bf16_linear_runs_on_onednn_without_gradients_and_on_torch_with_them():
    layer = CPULinear(64, 48).to(torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert layer._kernel_for(x, layer.weight) == ("onednn" if CPULinear.use_onednn else "torch")
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias),
                                   rtol=1e-2, atol=1e-2)
    assert layer._kernel_for(x, layer.weight) == "torch"  # training bf16 weights: autograd through F.linear


def test_greedy_sampling_and_top_p_on_bf16_weights_run_in_float32():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.preset("tiny")).eval()
    low = bf16_copy(model)
    ids = torch.tensor([[11, 22, 33, 44]])
    greedy = generate(low, ids, 10)
    assert torch.equal(greedy, generate(low, ids, 10, use_cache=False))  # cached and recomputed agree
    sampled = generate(low, ids, 10, temperature=0.8, top_p=0.9, seed=5)
    assert torch.equal(sampled, generate(low, ids, 10, temperature=0.8, top_p=0.9, seed=5))
    assert sampled.shape == (1, 14) and int(sampled.max()) < 50257


def test_load_and_the_commands_hold_the_weights_in_bf16(tiny_lm_run, bf16_cpu, capsys):
    model, tokenizer = load(tiny_lm_run, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.wte.weight  # the tied head stays one matrix
    want = generate_text(model, tokenizer, "Every effort", 8)
    assert main(["generate", "--model", str(tiny_lm_run), "--prompt", "Every effort", "--max-new-tokens", "8",
                 "--dtype", "bf16", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == f"Every effort{want}\n"
    served = ServedModel.load(tiny_lm_run, dtype=inference_dtype("bf16", CPU))
    assert served.model.wte.weight.dtype == torch.bfloat16
    assert generate_text(served.model, served.tokenizer, "Every effort", 8) == want


def test_a_bf16_classifier_predicts_as_the_float32_one(tmp_path, bf16_cpu, capsys):
    torch.manual_seed(0)
    run = tmp_path / "clf"
    model = add_classifier_head(GPTModel(GPTConfig.preset("tiny")), 2)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # confident classes: bf16's rounding cannot swap them
    save_model(run, model, GPT2Tokenizer(), {"stage": "classifier", "labels": ["ham", "spam"],
                                             "classifier": {"max_length": 64}})
    texts = ["WINNER!! Claim your prize now", "See you at lunch?", "call 0906 now", "ok"]
    ref = Classifier.load(run).predict_proba(texts)
    low = Classifier.load(run, dtype=torch.bfloat16)
    assert low.model.lm_head.weight.dtype == torch.bfloat16
    probs = low.predict_proba(texts)
    assert probs.dtype == torch.float32 and (probs - ref).abs().max() < 0.03
    assert main(["classify", "--model", str(run), "--dtype", "bf16", "--device", "cpu", *texts]) == 0
    labels = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert labels == [["ham", "spam"][i] for i in ref.argmax(-1).tolist()]


def test_the_fused_loss_under_bf16_autocast_matches_the_logits_path(monkeypatch):
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.preset("tiny", vocab_size=97))
    inputs, targets = torch.randint(0, 97, (3, 40)), torch.randint(0, 97, (3, 40))
    targets[0, :7] = -100

    def loss_and_grads(fused: bool):
        model.zero_grad(set_to_none=True)
        if not fused:
            monkeypatch.setattr(gptlab.loss, "fused_loss_applies", lambda *a: False)
        else:  # the fused loss must not write the whole logits
            monkeypatch.setattr(model.lm_head, "forward", lambda *a: pytest.fail("full logits under bf16"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_loss(model, (inputs, targets))
        loss.backward()
        monkeypatch.undo()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    fused, fused_grads = loss_and_grads(True)
    ref, ref_grads = loss_and_grads(False)
    assert fused.dtype == torch.float32 and abs(fused.item() - ref.item()) < 1e-3 * ref.item()
    for name, grad in ref_grads.items():  # bf16 operands: a few parts in a hundred of the largest entry
        assert (fused_grads[name] - grad).abs().max() <= 0.03 * grad.abs().max(), name


def test_bf16_training_loss_follows_float32(tmp_path, verdict_path, bf16_cpu):
    from gptlab.config import TrainConfig
    from gptlab.pretrain import pretrain

    def run(precision):
        config = TrainConfig(max_steps=8, batch_size=4, lr=1e-3, eval_interval=4, precision=precision, device="cpu")
        return pretrain(verdict_path, tmp_path / precision, config, preset="tiny", progress=False, sample_prompt=None)

    fp32, bf16 = run("fp32"), run("bf16")
    for result in (fp32, bf16):
        assert float(result.history[-1]["val_loss"]) < float(result.history[0]["val_loss"])  # both learn
    assert abs(bf16.val_loss - fp32.val_loss) < 0.01 * fp32.val_loss


def test_bf16_weights_and_quantized_weights_do_not_combine(tiny_lm_run, bf16_cpu, capsys):
    argv = ["generate", "--model", str(tiny_lm_run), "--prompt", "Hi", "--device", "cpu", "--dtype", "bf16"]
    assert main([*argv, "--quantize", "int8"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--dtype bf16 does not combine with int8/int4" in err, err
    from gptlab.config import QuantizeConfig

    with pytest.raises(GptlabError, match="drop --dtype"):
        load(tiny_lm_run, quantize=QuantizeConfig("int4"), dtype=torch.bfloat16)
    model, _ = load(tiny_lm_run, quantize=QuantizeConfig("int8"), dtype=torch.float32)  # fp32 is the default
    assert model.quantization is not None
