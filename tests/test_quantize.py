"""int8 / int4 weight-only quantization: the layers against float32, the run format, every using command, the
fallback where torch lacks an op, and the bad inputs (README: Low precision)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import gptlab.quantize as quantize
from gptlab.cli import main
from gptlab.config import GPTConfig, QuantizeConfig
from gptlab.errors import GptlabError
from gptlab.model import GPTModel
from gptlab.pretrain import pretrain
from gptlab.quantize import Int4Linear, Int8Linear, QuantizedEmbedding, QuantizedKernels, quantize_model
from gptlab.run import WEIGHTS_FILE, read_run_config
from gptlab.weights import load, load_run, quantize_run

ROOT = Path(__file__).resolve().parent.parent
VERDICT = ROOT / "data" / "the-verdict.txt"
SPAM = ROOT / "data" / "SMSSpamCollection"
INT8, INT4 = QuantizeConfig("int8"), QuantizeConfig("int4", 32)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def linear(n_in: int = 96, n_out: int = 40) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    nn.init.normal_(layer.weight, std=0.02)
    return layer


@pytest.fixture
def no_kernels(monkeypatch):
    """As on a torch without the integer ops: every quantized layer dequantizes and runs F.linear."""
    monkeypatch.setattr(quantize, "_found", QuantizedKernels(None, None, None, None))


# ---- the layers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [INT8, INT4, QuantizeConfig("int4", 64)], ids=["int8", "int4-g32", "int4-g64"])
def test_a_quantized_layer_is_its_dequantized_weight_and_close_to_float(config):
    plain = linear(128)
    layer = quantize.LAYERS[config.to].of(plain, config)
    x = torch.randn(2, 5, 128)  # several rows (prefill) and one row (decoding) take different paths in the ops
    w = layer.weight  # (N, K) float32, dequantized
    with torch.no_grad():
        for rows in (x, x[:1, :1]):
            got, float32 = layer(rows), plain(rows)
            # the kernel's product equals the dequantize-matmul to bfloat16 rounding of the activations and
            # outputs (8 significant bits: 1% of the output's scale covers them)
            tolerance = 1e-2
            assert (got - F.linear(rows, w, plain.bias)).abs().max() <= tolerance * got.abs().max()
            # and the dequantized weight is within half a step of the float one, so the output is within
            # sum_k |x_k| * step / 2 of float32's
            step = layer.weight_scale if config.to == "int8" else layer.weight_scale.repeat_interleave(
                config.group_size, dim=1)
            assert ((w - plain.weight).abs() <= (step.reshape(40, -1) / 2 + 1e-7)).all()
            bound = rows.abs() @ (step.reshape(40, -1).expand(40, 128).t() / 2)  # (..., N)
            assert ((got - float32).abs() <= bound + tolerance * got.abs().max()).all()


@pytest.mark.parametrize("config", [INT8, INT4], ids=["int8", "int4"])
def test_bfloat16_activations_take_the_same_kernels_and_stay_bfloat16(config):
    layer = quantize.LAYERS[config.to].of(linear(64, 24), config)
    x = torch.randn(4, 64)
    with torch.no_grad():
        got, want = layer(x.bfloat16()), layer(x)  # the kernels round x to bf16 either way
    assert got.dtype == torch.bfloat16 and (got.float() - want).abs().max() <= 1e-2 * want.abs().max()


def test_int4_packs_two_values_per_byte_even_input_low():
    plain = linear(64, 16)
    layer = Int4Linear.of(plain, INT4)
    assert layer.weight_int.dtype == torch.uint8 and layer.weight_int.shape == (16, 32)
    q = layer.unpacked_rows(slice(None))
    assert torch.equal(layer.weight_int, q[:, 0::2] | (q[:, 1::2] << 4)) and int(q.max()) <= 15
    assert (q == 0).any(dim=1).all() and (q == 15).any(dim=1).all()  # each row's min and max use the whole range


def test_int4s_kernel_copy_replaces_its_weight_and_gives_it_back_exactly():
    plain = linear(64, 40)  # 40 rows: the op pads them to 48
    layer, head = Int4Linear.of(plain, INT4), Int4Linear.of(plain, INT4)
    head.rows_read = True  # as a tied head, whose rows the embedding looks up
    original, x = layer.weight_int.clone(), torch.randn(2, 64)
    before = layer.weight  # dequantized from gptlab's layout
    with torch.no_grad():
        y, _ = layer(x), head(x)
    assert layer.weight_int is None and head.weight_int is not None  # one copy of the bytes held, not two
    assert torch.equal(layer.state_dict()["weight_int"], original)  # rebuilt through the op, exactly
    assert torch.equal(layer.weight, before)
    assert torch.equal(layer.unpacked_rows(slice(3, 5)), head.unpacked_rows(slice(3, 5)))
    layer.to("cpu")  # a move takes gptlab's layout along; the kernel's copy is made again on the next call
    assert torch.equal(layer.weight_int, original) and layer._packed is None
    with torch.no_grad():
        assert torch.equal(layer(x), y)


def test_the_model_is_close_to_float32_and_the_tied_embedding_reads_the_head():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.preset("mini", vocab_size=512)).eval()
    idx = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        reference = model(idx)
        for config, bound in ((INT8, 0.02), (QuantizeConfig("int4", 64), 0.25)):
            import copy

            twin = quantize_model(copy.deepcopy(model), config)
            assert isinstance(twin.wte, QuantizedEmbedding) and twin.wte.head is twin.lm_head
            assert "wte.weight" not in twin.state_dict() and not any(k.startswith("wte") for k in twin.state_dict())
            assert torch.equal(twin.wte(idx), twin.lm_head.weight[idx])  # the looked-up rows, dequantized
            logits = twin(idx)
            # measured: int8 0.004, int4 0.08 of the float logits' largest magnitude (random mini weights)
            assert (logits - reference).abs().max() <= bound * reference.abs().max()
            assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= (0.95 if config.to == "int8" else 0.6)


def test_without_the_ops_the_layers_fall_back_and_say_so(monkeypatch, caplog):
    plain = linear(64, 24)
    x = torch.randn(3, 64)
    layers = [Int8Linear.of(plain, INT8), Int4Linear.of(plain, INT4)]
    with torch.no_grad():
        fast = [layer(x) for layer in layers]
        monkeypatch.setattr(quantize, "_found", None)  # looked up again, as in a fresh process
        monkeypatch.setattr(quantize, "_checked_op", lambda name, check, namespace: (
            None, f"torch.ops.{namespace}.{name} is missing (AttributeError)"))
        with caplog.at_level(logging.WARNING, logger="gptlab"):
            slow = [layer(x) for layer in layers]
    assert quantize._found == QuantizedKernels(None, None, None, None)
    assert "torch.ops.aten._weight_int8pack_mm is missing" in caplog.text
    assert "torch.ops.aten._int_mm is missing" in caplog.text and "int8 layers dequantize" in caplog.text
    assert "int4 layers dequantize" in caplog.text
    for layer, a, b in zip(layers, fast, slow):
        assert torch.allclose(b, F.linear(x, layer.weight, layer.bias))  # the fallback is the dequantize-matmul
        assert (a - b).abs().max() <= 1e-2 * b.abs().max()


def test_without_int8pack_int8_runs_on_int_mm_exactly(monkeypatch):
    """The second int8 route: torch._int_mm on two int8 digits per activation, float32-exact to ~1e-5."""
    layer = Int8Linear.of(linear(64, 24), INT8)
    x = torch.randn(3, 64) * torch.tensor([[1.0], [1e-3], [1e3]])  # rows of very different sizes: each its step
    op, problem = quantize._checked_op("_int_mm", quantize._check_int_mm, namespace="aten")
    assert op is not None, problem  # this torch has it (2.13 on the CPU)
    monkeypatch.setattr(quantize, "_found", QuantizedKernels(None, op, None, None))
    with torch.no_grad():
        got, want = layer(x), F.linear(x, layer.weight, layer.bias)
    # each activation is off by at most half a second-digit step, max|x| / (127 * 254 * 2), in its row
    bound = x.abs().amax(dim=1, keepdim=True) / (127 * 254 * 2) * layer.weight.abs().sum(dim=1)  # (3, N)
    assert ((got - want).abs() <= bound * 1.01 + 1e-6 * want.abs()).all()


def test_an_op_that_gives_other_numbers_is_refused():
    wrong = lambda a, b: torch.zeros(a.size(0), b.size(1), dtype=torch.int32)  # noqa: E731
    op, problem = quantize._checked_op("_int_mm", lambda op: quantize._check_int_mm(wrong), namespace="aten")
    assert op is None and "does not work as expected (ValueError: it differs from the dequantized" in problem
    op, problem = quantize._checked_op("_no_such_op", lambda op: None, namespace="aten")
    assert op is None and "torch.ops.aten._no_such_op is missing" in problem


# ---- runs: the format and every using command ------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantize")
    pretrain(VERDICT, root / "float", {"max_steps": 3, "eval_interval": 3}, preset="tiny", progress=False)
    for name, config in (("int8", INT8), ("int4", INT4)):
        quantize_run(root / "float", root / name, config)
    return {"float": root / "float", "int8": root / "int8", "int4": root / "int4", "root": root}


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_the_run_holds_integers_and_scales_and_loads_as_quantized_at_load(runs, kind):
    stored = load_file(runs[kind] / WEIGHTS_FILE)
    assert read_run_config(runs[kind])["quantization"] == QuantizeConfig(kind, 32 if kind == "int4" else None).to_dict()
    c_fc = stored["h.0.mlp.c_fc.weight_int"]
    assert c_fc.dtype == (torch.int8 if kind == "int8" else torch.uint8)
    assert c_fc.shape == ((128, 32) if kind == "int8" else (128, 16))  # int4: two inputs per byte
    assert stored["h.0.mlp.c_fc.weight_scale"].shape == ((128,) if kind == "int8" else (128, 1))
    assert ("h.0.mlp.c_fc.weight_zero" in stored) == (kind == "int4")
    assert not any(k.startswith("wte") for k in stored) and "lm_head.weight_int" in stored  # the tied matrix once
    assert not any(k.endswith(".weight") and "ln_" not in k and k != "wpe.weight" for k in stored)
    loaded, _, _ = load_run(runs[kind])
    at_load, _ = load(runs["float"], quantize=QuantizeConfig(kind))
    idx = torch.randint(0, 50257, (1, 20))
    with torch.no_grad():
        assert torch.equal(loaded(idx), at_load(idx))  # saved and reloaded = quantized as it loads
    assert loaded.quantization == at_load.quantization and isinstance(loaded.wte, QuantizedEmbedding)


def test_decoding_never_dequantizes_the_vocabulary_matrix(runs, monkeypatch):
    """A decoding call reads the model's dtype from wpe: reading the tied embedding's weight would dequantize
    50,257 rows (0.5-1.2 s at the 124M shape) per call."""
    from gptlab.generate import generate_text

    model, tokenizer, _ = load_run(runs["int4"])
    expected = generate_text(model, tokenizer, "Every effort", max_new_tokens=4, num_beams=2)
    monkeypatch.setattr(quantize.QuantizedLinear, "weight", property(lambda self: pytest.fail("dequantized")))
    assert generate_text(model, tokenizer, "Every effort", max_new_tokens=4, num_beams=2) == expected
    assert generate_text(model, tokenizer, "Every effort", max_new_tokens=4)


def test_every_using_command_takes_a_quantized_run_and_quantize_at_load(runs, capsys, tmp_path):
    prompt = ["--prompt", "Every effort moves", "--max-new-tokens", 6, "--temperature", 0]
    for kind in ("int8", "int4"):
        code, saved, err = run_cli(capsys, "generate", "--model", runs[kind], *prompt)
        assert code == 0, err
        code, at_load, err = run_cli(capsys, "generate", "--model", runs["float"], "--quantize", kind, *prompt)
        assert code == 0 and saved == at_load and saved.startswith("Every effort moves")  # the same greedy tokens
    records = [{"instruction": "Say hi.", "input": "", "output": "hi"}, {"instruction": "Say no.", "input": "",
                                                                         "output": "no"}]
    (tmp_path / "in.json").write_text(json.dumps(records))
    code, _, err = run_cli(capsys, "respond", "--model", runs["int4"], "--input", tmp_path / "in.json", "--output",
                           tmp_path / "answers.json", "--max-new-tokens", 3, "--quiet")
    assert code == 0, err
    assert [a["instruction"] for a in json.loads((tmp_path / "answers.json").read_text())] == ["Say hi.", "Say no."]
    code, _, err = run_cli(capsys, "respond", "--model", runs["float"], "--quantize", "int8", "--input",
                           tmp_path / "in.json", "--output", tmp_path / "answers8.json", "--max-new-tokens", 3,
                           "--quiet")
    assert code == 0, err

    # a classifier run: quantized by `gptlab quantize` (its 2-way head too) and at load
    clf = runs["root"] / "clf"
    code, _, err = run_cli(capsys, "finetune-classifier", "--data", SPAM, "--balance", "--init", runs["float"],
                           "--max-steps", 2, "--max-length", 16, "--out", clf, "--quiet")
    assert code == 0, err
    code, text, err = run_cli(capsys, "quantize", clf, "--to", "int8", "--out", runs["root"] / "clf8")
    assert code == 0 and "int8" in text, err
    assert read_run_config(runs["root"] / "clf8")["labels"] == read_run_config(clf)["labels"]
    code, saved, err = run_cli(capsys, "classify", "--model", runs["root"] / "clf8", "WIN a free prize now", "hi")
    assert code == 0, err
    code, at_load, err = run_cli(capsys, "classify", "--model", clf, "--quantize", "int8", "WIN a free prize now", "hi")
    assert code == 0 and saved == at_load and saved.split()[0] in ("ham", "spam")


def test_chat_and_serve_take_a_quantized_run(runs, capsys, monkeypatch):
    import io

    import openai

    from gptlab.generate import generate_text
    from gptlab.serve import BackgroundServer, ServedModel, create_app

    monkeypatch.setattr("sys.stdin", io.StringIO("Say hi.\n"))
    code, out, err = run_cli(capsys, "chat", "--model", runs["int4"], "--max-new-tokens", 3, "--temperature", 0)
    assert code == 0, err
    served = ServedModel.load(runs["float"], quantize=INT8)
    assert served.model.quantization == INT8
    model, tokenizer, _ = load_run(runs["int8"])
    expected = generate_text(model, tokenizer, "Every effort", max_new_tokens=5)
    with BackgroundServer(create_app(served, api_key="k")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0, timeout=30)
        reply = client.completions.create(model="float", prompt="Every effort", max_tokens=5, temperature=0)
    assert reply.choices[0].text == expected


def test_export_dequantizes_to_float32(runs, tmp_path, capsys):
    code, text, err = run_cli(capsys, "export", "--format", "hf", runs["int8"], tmp_path / "hf")
    assert code == 0 and "dequantized to float32" in text, err
    exported, _ = load(tmp_path / "hf")
    quantized, _ = load(runs["int8"])
    assert not hasattr(exported, "quantization") or exported.quantization is None
    idx = torch.randint(0, 50257, (1, 12))
    with torch.no_grad():  # the float model the int8 one computes, to the kernel's bfloat16 activation rounding
        a, b = exported(idx), quantized(idx)
    assert (a - b).abs().max() <= 1e-2 * a.abs().max()
    code, _, err = run_cli(capsys, "export", "--format", "run", runs["int4"], tmp_path / "run")
    assert code == 0 and "quantization" not in read_run_config(tmp_path / "run"), err
    assert load_file(tmp_path / "run" / WEIGHTS_FILE)["h.0.mlp.c_fc.weight"].dtype == torch.float32


# ---- bad input: one clear line ----------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["quantize", "{int8}", "--to", "int4", "--out", "{tmp}/x"], "is already quantized (int8); quantize the float"),
    (["generate", "--model", "{int4}", "--quantize", "int8", "--prompt", "hi"], "is already quantized (int4, groups"),
    (["quantize", "{float}", "--to", "int4", "--group-size", "64", "--out", "{tmp}/x"],
     "--group-size 64 does not divide h.0.attn.c_attn's 32 inputs; choose 32"),
    (["quantize", "{float}", "--to", "int4", "--group-size", "48", "--out", "{tmp}/x"],
     "--group-size must be one of 32, 64, 128, got 48"),
    (["quantize", "{float}", "--to", "int8", "--group-size", "32", "--out", "{tmp}/x"], "--group-size applies to int4"),
    (["generate", "--model", "{float}", "--group-size", "32", "--prompt", "hi"], "add --quantize int4 or leave it out"),
    (["pretrain", "--data", str(VERDICT), "--init", "{int8}", "--out", "{tmp}/x", "--max-steps", "1"],
     "is quantized (int8): its weights are integers, which do not train"),
    (["finetune-classifier", "--data", str(SPAM), "--init", "{int4}", "--out", "{tmp}/x", "--max-steps",
      "1"], "is quantized (int4, groups of 32): its weights are integers, which do not train; add --lora"),
])
def test_bad_input_is_one_clear_line(runs, tmp_path, capsys, args, message):
    paths = {k: str(v) for k, v in runs.items()} | {"tmp": str(tmp_path)}
    code, _, err = run_cli(capsys, *[a.format(**paths) for a in args])
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 or "INFO" in err
    assert not (tmp_path / "x").exists()


def test_a_group_size_that_divides_no_layer_points_to_int8():
    model = GPTModel(GPTConfig.preset("tiny", n_embd=48, n_head=2, vocab_size=64))  # 48 = 16 x 3
    with pytest.raises(GptlabError, match="no group size of 128, 64, 32 divides every layer's inputs.*--to int8"):
        quantize_model(model, QuantizeConfig("int4"))


# ---- CUDA: the same flags where a GPU exists ---------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it)")
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_cuda_runs_a_quantized_run_like_the_cpu(runs, kind):
    idx = torch.randint(0, 50257, (1, 16))
    cpu, _ = load(runs[kind])
    gpu, _ = load(runs[kind], device="cuda")
    with torch.no_grad():
        want, got = cpu(idx), gpu(idx.cuda()).cpu()
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()  # the CPU's int4 runs bf16 activations
