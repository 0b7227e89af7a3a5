"""Read a model from wherever it lives, and write it where the rest of the ecosystem can read it.

``load(source)`` returns ``(model, tokenizer)`` for any of these sources:

    run directory   what gptlab's stages write (``config.json`` with a "model" section, see ``gptlab.run``);
                    a LoRA run's base is loaded from where it names and checked against its fingerprint
    gpt2, gpt2-medium, gpt2-large, gpt2-xl
                    OpenAI's GPT-2 from the Hugging Face hub (``openai-community/gpt2`` ...)
    org/name        any GPT-2 model on the Hugging Face hub (a local path of that name wins)
    HF folder       ``config.json`` (model_type gpt2) + ``model.safetensors`` or ``pytorch_model.bin``
    TF folder       OpenAI's original TensorFlow checkpoint: ``hparams.json`` + ``model.ckpt.*``
                    (as the LLMs-from-scratch book's ``gpt_download.py`` leaves it; needs ``gptlab[tf]``)
    book .pth       a state dict of the LLMs-from-scratch book's ``GPTModel`` (``tok_emb``, ``trf_blocks.N.att.W_query``)
    PEFT folder     Hugging Face PEFT's LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``): its
                    base (``base_model_name_or_path``, any of these sources) with the adapters added, unmerged

Every format is a small key map onto gptlab's names, which already are OpenAI's (``wte``, ``h.N.attn.c_attn``).
The configuration is read from the checkpoint; ``expect=`` turns a mismatch into an error naming the fields.

Memory: the model is built on the meta device (no storage at all) and the checkpoint's tensors are
assigned into it, read one at a time; OpenAI/HF's Conv1D weights, stored (in, out), are transposed as
they arrive. Loading gpt2-xl so holds one copy of the weights plus one tensor, never two copies.
Nothing is ever unpickled: safetensors, or ``torch.load(weights_only=True)``.

``export_hf(model, out_dir)`` writes ``config.json`` + ``model.safetensors`` that
``transformers.GPT2LMHeadModel.from_pretrained(out_dir)`` loads; ``export_peft`` writes a LoRA model's adapters
as a PEFT folder, ``export_run`` a gptlab run, and ``export_model`` is ``gptlab export`` (``--merge`` first).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import save_file

from gptlab.config import LoRAConfig, QuantizeConfig
from gptlab.errors import GptlabError
from gptlab.model import GPTConfig, GPTModel
from gptlab.files import atomic_write, atomic_write_text, check_writable_dir, same_path
from gptlab.surgery import add_classifier_head, add_lora, is_classifier, merge_lora, rebuild_head, weights_fingerprint
from gptlab.lora import LoRAAdapter
from gptlab.quantize import (
    QuantizedLinear, dequantize_model, describe, is_quantized, quantize_model, quantized_skeleton,
)
from gptlab.run import (
    ADAPTER_FILE, BUILTIN_TOKENIZERS, CONFIG_FILE, TOKENIZER_DIR, WEIGHTS_FILE, clear_run, load_model_weights,
    load_torch_file, read_run_config, read_run_weights, run_file, save_model, source_metadata,
)
from gptlab.tokenizer import Tokenizer, get_tokenizer

log = logging.getLogger("gptlab")

State = dict[str, torch.Tensor]

GPT2_HUB_IDS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
# What a checkpoint fixes. Dropout is not among them: it holds no weights, so `expect` may change it.
ARCHITECTURE_FIELDS = ("vocab_size", "context_length", "n_embd", "n_layer", "n_head", "qkv_bias", "tie_weights")
GPT2_VOCAB_SIZE = 50257

HF_WEIGHTS = "model.safetensors"
HF_SHARD_INDEX = "model.safetensors.index.json"
HF_TORCH_WEIGHTS = "pytorch_model.bin"
HF_TOKENIZER_DIR = "gptlab_tokenizer"  # not "tokenizer.json" at the top: that name is Hugging Face's
# Hugging Face PEFT's adapter folder (``export_peft``, ``_load_peft_folder``); it wins over a config.json beside it,
# as in transformers, which loads such a folder's base from base_model_name_or_path.
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_TORCH_WEIGHTS = "adapter_model.bin"
PEFT_FILES = (PEFT_CONFIG, PEFT_WEIGHTS, PEFT_TORCH_WEIGHTS)
# OpenAI (and so Hugging Face) store these as Conv1D weights, (in, out); a Linear's weight is (out, in).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# ---- the public entry points --------------------------------------------------------------------

def load(
    source: str | Path, device: str | torch.device = "cpu", expect: GPTConfig | None = None,
    quantize: QuantizeConfig | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[GPTModel, Tokenizer]:
    """Load a model and its tokenizer from ``source`` (see the module docstring), in eval mode on ``device``.

    ``expect``: the config the caller needs; an architecture that differs raises ``GptlabError`` naming the
    fields, and the model takes ``expect.dropout``. ``quantize``: quantize it as it loads (``quantize_loaded``).
    ``dtype``: hold the weights in it (``torch.bfloat16`` for ``--dtype bf16``: half the bytes read per decoded
    token; ``gptlab.device.inference_dtype`` checks it). The two do not combine (``in_precision``).
    """
    text = str(source)
    path = Path(source)
    if text in GPT2_HUB_IDS:  # a short name always means the hub; write ./gpt2 for a folder of that name
        model, tokenizer = _load_hf_folder(download_from_hub(GPT2_HUB_IDS[text]), expect)
    elif path.exists():
        model, tokenizer = _load_local(path, expect)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith("."):
        model, tokenizer = _load_hf_folder(download_from_hub(text), expect)
    else:
        raise GptlabError(
            f"cannot load {text!r}: no such file or directory, and not a hub id "
            f"({', '.join(GPT2_HUB_IDS)} or org/name)"
        )
    if expect is not None:
        check_config(model.config, expect, source)
        model.set_dropout(expect.dropout)
    return in_precision(model, device, quantize, dtype, source).eval(), tokenizer


def in_precision(model: GPTModel, device: str | torch.device, quantize: QuantizeConfig | None,
                 dtype: torch.dtype | None, source: str | Path) -> GPTModel:
    """The loaded ``model`` on ``device``, its weights in ``dtype`` or quantized with ``quantize``.

    bf16 weights and int8/int4 weights are two answers to one question, and the integer kernels already take
    bf16 activations; casting a quantized model would cast its scales too. So the two are refused together.
    """
    if dtype not in (None, torch.float32) and (quantize is not None or is_quantized(model)):
        raise GptlabError(f"{source}: --dtype bf16 does not combine with int8/int4 weights (their kernels already "
                          "run in bf16); drop --dtype, or load the float run without --quantize")
    return quantize_loaded(model.to(device=device, dtype=dtype), quantize, source)


def quantize_loaded(model: GPTModel, quantize: QuantizeConfig | None, source: str | Path) -> GPTModel:
    """``--quantize``: the loaded ``model`` with int8/int4 linears (LoRA adapters merged in first); as it is for None."""
    if quantize is None:
        return model
    merge_adapters(model)
    return quantize_model(model, quantize, str(source))


def merge_adapters(model: GPTModel) -> GPTModel:
    """A LoRA ``model``'s adapters folded into its weights, in place; over an int8 / int4 base (QLoRA) the base is
    dequantized first, so the merged model is float32 throughout. A model without adapters is left as it is."""
    if getattr(model, "lora", None) is None:
        return model
    return merge_lora(dequantize_model(model))


def check_config(found: GPTConfig, requested: GPTConfig, source: str | Path) -> None:
    """Raise ``GptlabError`` naming every architecture field in which ``found`` differs from ``requested``."""
    differing = [
        f"{name} {getattr(found, name)!r} (requested {getattr(requested, name)!r})"
        for name in ARCHITECTURE_FIELDS
        if getattr(found, name) != getattr(requested, name)
    ]
    if differing:
        raise GptlabError(f"{source}: the checkpoint's config differs from the requested one: {', '.join(differing)}")


def download_from_hub(repo_id: str) -> Path:
    """The local snapshot folder of a hub model: downloaded once (with a progress bar), then from the cache.

    Honours ``HF_HOME`` / ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE=1`` as every Hugging Face tool does.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=[CONFIG_FILE, "model*.safetensors*"]))
        if not _hf_weight_files(folder):  # an older repo with only PyTorch pickles (read with weights_only)
            folder = Path(snapshot_download(repo_id, allow_patterns=[CONFIG_FILE, HF_TORCH_WEIGHTS]))
    except LocalEntryNotFoundError:
        raise GptlabError(
            f"{repo_id}: not a local path, not in the Hugging Face cache, and the hub cannot be reached; "
            "downloading needs internet once (and HF_HUB_OFFLINE unset), or point HF_HOME at a cache that holds it"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise GptlabError(f"{repo_id}: cannot download from the Hugging Face hub ({type(e).__name__}: {e})") from None
    return folder


MODEL_FOLDER_FILES = (HF_WEIGHTS, HF_TORCH_WEIGHTS, "hparams.json", *PEFT_FILES)  # a path to one means its folder
# Files in a folder that a loader would read in place of (or beside) what export_hf writes: --overwrite removes them.
SHADOWING_FILES = (HF_SHARD_INDEX, HF_TORCH_WEIGHTS, *PEFT_FILES)


def check_export_dir(out_dir: str | Path, overwrite: bool = False, source: str | Path | None = None) -> Path:
    """Where ``export_hf`` may write: never the ``source`` folder itself, a non-empty folder only with
    ``overwrite``, and a place that can be written (checked before any model is read)."""
    out_dir = Path(out_dir)
    source = Path(source) if source is not None else None
    if source is not None and source.exists():  # a folder model, or one of its files, is read from its folder
        folder = source if source.is_dir() else source.parent if source.name in MODEL_FOLDER_FILES else None
        if folder is not None and same_path(out_dir, folder):
            raise GptlabError(f"{out_dir} is where the model is read from; export to another folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise GptlabError(f"{out_dir} is not empty; pass --overwrite to replace the model files in it, or export to "
                          "a new folder")
    check_writable_dir(out_dir, "OUT_DIR")
    return out_dir


def export_hf(model: GPTModel, out_dir: str | Path, tokenizer: Tokenizer | None = None,
              overwrite: bool = False) -> None:
    """Write ``config.json`` + ``model.safetensors`` in Hugging Face's GPT-2 layout to ``out_dir``.

    A tokenizer other than GPT-2's is saved under ``gptlab_tokenizer/`` so that ``load`` finds it again.
    A folder that is not empty is refused unless ``overwrite``, which replaces those files (and removes a
    shard index, its shards and a ``pytorch_model.bin``, which loaders would read instead); other files stay.
    """
    if getattr(model, "lora", None) is not None:
        raise GptlabError("this model has LoRA adapters, which a Hugging Face GPT-2 folder cannot hold: merge them "
                          "into the weights first (gptlab export --merge; gptlab.surgery.merge_lora), or write the "
                          "adapters alone with --format peft")
    out_dir = check_export_dir(out_dir, overwrite)
    config = model.config
    head = model.lm_head.weight
    if head.shape[0] != config.vocab_size:
        raise GptlabError(
            f"this model has a {head.shape[0]}-way classifier head; --format hf exports language models only"
        )
    state: State = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            if config.tie_weights:
                continue  # Hugging Face ties it to transformer.wte.weight itself
            state[name] = tensor
        else:
            state[f"transformer.{name}"] = tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor
        if name.endswith("attn.c_attn.weight") and not config.qkv_bias:
            # Hugging Face's GPT-2 always has a qkv bias: zeros compute the same thing.
            state[f"transformer.{name[:-len('weight')]}bias"] = tensor.new_zeros(3 * config.n_embd)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}

    eos = tokenizer.eot_id if tokenizer is not None else GPT2_VOCAB_SIZE - 1  # <|endoftext|>
    if overwrite and out_dir.is_dir():
        _remove_shadowing_files(out_dir)
    hf_config = hf_config_dict(config, eos, _export_tokenizer(tokenizer, Path(out_dir)))
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / HF_WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write_text(out_dir / CONFIG_FILE, json.dumps(hf_config, indent=2) + "\n")


def hf_config_dict(config: GPTConfig, eos_id: int | None = GPT2_VOCAB_SIZE - 1, tokenizer_ref: str = "gpt2") -> dict:
    """Hugging Face's ``GPT2Config`` fields for ``config`` (the ``config.json`` that ``export_hf`` writes)."""
    eos_id = eos_id if eos_id is not None and eos_id < config.vocab_size else None
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "tie_word_embeddings": config.tie_weights,
        "dtype": "float32",
        # What Hugging Face's config cannot say; transformers keeps unknown keys and ignores them.
        "gptlab": {"qkv_bias": config.qkv_bias, "tokenizer": tokenizer_ref},
    }


def _remove_shadowing_files(out_dir: Path) -> None:
    index = out_dir / HF_SHARD_INDEX
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            shards = set()
        for name in shards:
            if "/" not in name and name != HF_WEIGHTS:
                (out_dir / name).unlink(missing_ok=True)
    for name in SHADOWING_FILES:
        (out_dir / name).unlink(missing_ok=True)
    if (out_dir / HF_TOKENIZER_DIR).is_dir():
        shutil.rmtree(out_dir / HF_TOKENIZER_DIR)  # a stale tokenizer of another model


def _export_tokenizer(tokenizer: Tokenizer | None, out_dir: Path) -> str:
    if tokenizer is None or tokenizer.name in BUILTIN_TOKENIZERS:
        return tokenizer.name if tokenizer is not None else "gpt2"
    tokenizer.save(out_dir / HF_TOKENIZER_DIR)
    return HF_TOKENIZER_DIR


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[GPTModel, Tokenizer, dict]:
    """Rebuild the model and tokenizer a stage saved; returns ``(model, tokenizer, config_json)``.

    A LoRA run (config.json "lora") comes back with its adapters unmerged, on the base its "base" names.
    """
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    if "lora" in config:
        model = _lora_run_model(run_dir, config, device)
    else:
        state = read_run_weights(run_dir, WEIGHTS_FILE, device)
        with torch.device("meta"):  # no random init to overwrite: the loaded tensors become the parameters
            model = rebuild_head(GPTModel(GPTConfig.from_dict(config["model"])), config)
            if "quantization" in config:  # a quantized run (gptlab quantize): integer weights and their scales
                quantized_skeleton(model, _run_quantization(run_dir, config))
                # safetensors maps the file and places int8 tensors at any byte offset; the kernels want them
                # aligned (gptlab.quantize), and one realigned copy would keep the whole mapping resident
                # beside it: copy them all (torch aligns), and the mapping goes
                state = {k: v.clone() for k, v in state.items()}
        load_model_weights(model, state, run_dir / WEIGHTS_FILE, assign=True)
    tokenizer = get_tokenizer(config["tokenizer"], base_dir=run_file(run_dir, TOKENIZER_DIR).parent)
    return model.eval(), tokenizer, config


def _run_quantization(run_dir: Path, config: dict) -> QuantizeConfig:
    try:
        return QuantizeConfig.from_dict(config["quantization"])
    except (TypeError, GptlabError) as e:
        raise GptlabError(f"{run_dir / CONFIG_FILE}: unreadable quantization entry ({e}); the run is damaged, "
                          "quantize it again") from None


def quantize_run(source: str | Path, out_dir: str | Path, quantize: QuantizeConfig, overwrite: bool = False) -> str:
    """``gptlab quantize``: write ``source`` (anything ``load`` reads; LoRA adapters merged) with int8/int4 weights
    as a run directory that every using command loads; returns a summary line. A quantized source is refused."""
    found = source_metadata(source).get("quantization")
    if found is not None:
        raise GptlabError(f"{source} is already quantized ({found.get('to') if isinstance(found, dict) else found}); "
                          "quantize the float model it came from instead")
    check_export_dir(out_dir, overwrite, source)  # before reading a model of gigabytes
    model, tokenizer = load(source, quantize=quantize)
    export_run(model, out_dir, tokenizer, source, overwrite=overwrite)
    stored = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    as_float = 4 * (sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
                    + model.num_parameters())  # the integer weights as float32, plus what stayed float
    return f"wrote {out_dir}: gptlab run, {describe(model.quantization)}: {stored / 1e6:.1f} MB of weights " \
           f"(float32: {as_float / 1e6:.1f} MB)"


def base_reference(source: str | Path, model: GPTModel) -> dict:
    """What a LoRA run stores of its base: where it is (a local path made absolute) and its weights' digest."""
    where = str(Path(source).resolve()) if Path(source).exists() else str(source)
    return {"source": where, "fingerprint": weights_fingerprint(model)}


def load_base(source: str | Path, device: str | torch.device = "cpu") -> tuple[GPTModel, Tokenizer]:
    """``load``, with the adapters of a LoRA source folded in: a model to train on like any other."""
    model, tokenizer = load(source, device)
    return merge_adapters(model), tokenizer


def _lora_run_model(run_dir: Path, config: dict, device) -> GPTModel:
    base = config.get("base")
    try:
        lora = LoRAConfig.from_dict(config["lora"])
        source, expected = base["source"], base["fingerprint"]
    except (TypeError, KeyError, GptlabError) as e:
        raise GptlabError(f"{run_dir / CONFIG_FILE}: a LoRA run without a readable adapter or base entry ({e}); "
                          "the run is damaged, train it again") from None
    try:
        model, _ = load_base(source, device)
    except GptlabError as e:
        raise GptlabError(f"{run_dir} holds LoRA adapters for the base {source}, which does not load ({e}); put "
                          "the base back there, or train the adapters again on another --init") from None
    found = weights_fingerprint(model)
    if found != expected:
        raise GptlabError(f"{run_dir} holds LoRA adapters for the base {source}, but the weights there are not the "
                          f"ones they were trained on (fingerprint {found[7:19]}, the run's {expected[7:19]}); put "
                          "the original base back, or train the adapters again on this one")
    check_config(model.config, GPTConfig.from_dict(config["model"]), source)
    model.set_dropout(config["model"].get("dropout", 0.0))
    add_lora(rebuild_head(model, config), lora, base)
    load_model_weights(model, read_run_weights(run_dir, ADAPTER_FILE, device), run_dir / ADAPTER_FILE)
    return model


# ---- which format is this? ----------------------------------------------------------------------

def _load_local(path: Path, expect: GPTConfig | None) -> tuple[GPTModel, Tokenizer]:
    if path.is_file():
        if path.suffix in (".pth", ".pt"):
            return _load_book_pth(path, expect)
        if path.name in MODEL_FOLDER_FILES:
            return _load_local(path.parent, expect)
        raise GptlabError(f"{path}: unknown model file; give a folder, or a .pth state dict of the book's GPTModel")
    if (path / PEFT_CONFIG).is_file():
        return _load_peft_folder(path, expect)
    config_path = path / CONFIG_FILE
    if config_path.is_file():
        config = _read_json(config_path)
        if isinstance(config.get("model"), dict):
            model, tokenizer, _ = load_run(path)
            return model, tokenizer
        return _load_hf_folder(path, expect)
    if (path / "hparams.json").is_file():
        return _load_tf_folder(path)
    raise GptlabError(
        f"{path}: not a model folder: expected a gptlab run or Hugging Face folder ({CONFIG_FILE}), a PEFT "
        f"adapter ({PEFT_CONFIG}), or OpenAI's TensorFlow checkpoint (hparams.json + model.ckpt.*)"
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GptlabError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(data, dict):
        raise GptlabError(f"{path}: expected a JSON object")
    return data


def _assemble(config: GPTConfig, state: State, source: str | Path) -> GPTModel:
    """A model of ``config`` whose parameters are ``state``'s tensors (no random init, no second copy)."""
    with torch.device("meta"):
        model = GPTModel(config)
        head = state.get("lm_head.weight")
        if head is not None and head.shape[0] != config.vocab_size:  # a foreign format's classifier (the book's
            add_classifier_head(model, head.shape[0])                  # chapter 6) says so only by its shape
    dtype = torch.get_default_dtype()
    state = {k: v if v.dtype == dtype or not v.is_floating_point() else v.to(dtype) for k, v in state.items()}
    load_model_weights(model, state, source, assign=True)
    return model


def _gpt2_tokenizer(config: GPTConfig, source: str | Path) -> Tokenizer:
    """GPT-2's tokenizer, the one these formats imply; a smaller vocabulary is loadable but suspicious."""
    if config.vocab_size < GPT2_VOCAB_SIZE:
        log.warning("%s: %d-token vocabulary is smaller than GPT-2's %d; GPT-2's tokenizer will produce ids "
                    "this model does not have", source, config.vocab_size, GPT2_VOCAB_SIZE)
    return get_tokenizer("gpt2")


# ---- Hugging Face ------------------------------------------------------------------------------

def _hf_weight_files(folder: Path) -> list[Path]:
    if (folder / HF_SHARD_INDEX).is_file():
        weight_map = _read_json(folder / HF_SHARD_INDEX).get("weight_map", {})
        return [folder / name for name in sorted(set(weight_map.values()))]
    for name in (HF_WEIGHTS, HF_TORCH_WEIGHTS):
        if (folder / name).is_file():
            return [folder / name]
    return []


def _hf_config(raw: dict, path: Path) -> GPTConfig:
    """GPTConfig from Hugging Face's ``GPT2Config`` fields; settings gptlab's model does not have are errors."""
    if raw.get("model_type") != "gpt2":
        raise GptlabError(f"{path}: model_type {raw.get('model_type')!r} is not 'gpt2'; gptlab runs GPT-2 models only")
    n_embd = raw.get("n_embd", 768)
    supported = {  # field: (value gptlab's model implements, Hugging Face's default)
        "activation_function": (("gelu_new", "gelu_pytorch_tanh"), "gelu_new"),
        "layer_norm_epsilon": ((1e-5,), 1e-5),
        "n_inner": ((None, 4 * n_embd), None),
        "scale_attn_weights": ((True,), True),
        "scale_attn_by_inverse_layer_idx": ((False,), False),
        "add_cross_attention": ((False,), False),
    }
    unsupported = [f"{k}={raw.get(k, d)!r}" for k, (ok, d) in supported.items() if raw.get(k, d) not in ok]
    if unsupported:
        raise GptlabError(f"{path}: gptlab's GPT-2 does not implement {', '.join(unsupported)}")
    gptlab = raw.get("gptlab", {})
    try:
        return GPTConfig(
            vocab_size=raw.get("vocab_size", GPT2_VOCAB_SIZE),
            context_length=raw.get("n_positions", raw.get("n_ctx", 1024)),
            n_embd=n_embd,
            n_layer=raw.get("n_layer", 12),
            n_head=raw.get("n_head", 12),
            dropout=raw.get("resid_pdrop", 0.1),
            qkv_bias=gptlab.get("qkv_bias", True),
            tie_weights=raw.get("tie_word_embeddings", True),
        )
    except TypeError as e:
        raise GptlabError(f"{path}: unusable config ({e})") from None


def _hf_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors one at a time, each in its own memory, so that a transposed copy
    can replace it before the next is read: loading peaks at one copy of the weights plus one tensor."""
    for file in files:
        try:
            if file.suffix != ".safetensors":
                state = _torch_load(file)
                while state:
                    yield state.popitem()
                continue
            with safe_open(file, framework="pt") as f:
                keys = list(f.keys())
            for key in keys:
                # A fresh memory map per tensor: once copied, its pages leave this process. One map for the
                # whole file would keep every page read so far resident next to the copies (twice the RSS).
                with safe_open(file, framework="pt") as f:
                    yield key, f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise GptlabError(f"{file}: corrupt weights file ({e})") from None


def _hf_to_gptlab(tensors: Iterable[tuple[str, torch.Tensor]], config: GPTConfig) -> State:
    """Hugging Face names are gptlab's behind an optional ``transformer.`` prefix; Conv1D weights turn around."""
    out: State = {}
    for key, tensor in tensors:
        name = key.removeprefix("transformer.")
        if re.fullmatch(r"h\.\d+\.attn\.(bias|masked_bias)", name):
            continue  # causal-mask buffers that old checkpoints stored; not weights
        if name == "lm_head.weight" and config.tie_weights:
            continue  # tied to wte.weight; some checkpoints store the same matrix twice
        if name.endswith("attn.c_attn.bias") and not config.qkv_bias:
            if tensor.count_nonzero():
                raise GptlabError(f"{key}: the config says qkv_bias false, but this bias is not zero")
            continue
        out[name] = tensor.t().contiguous() if name.endswith(CONV1D_WEIGHTS) else tensor.clone()
    return out


def _load_hf_folder(folder: Path, expect: GPTConfig | None) -> tuple[GPTModel, Tokenizer]:
    raw = _read_json(folder / CONFIG_FILE)
    config = _hf_config(raw, folder / CONFIG_FILE)
    files = _hf_weight_files(folder)
    if not files:
        raise GptlabError(f"{folder}: no {HF_WEIGHTS} (or {HF_TORCH_WEIGHTS}) next to {CONFIG_FILE}")
    if expect is not None:  # compare before reading gigabytes
        check_config(config, expect, folder)
    model = _assemble(config, _hf_to_gptlab(_hf_tensors(files), config), folder)
    tokenizer_ref = raw.get("gptlab", {}).get("tokenizer", "gpt2")
    if tokenizer_ref == "gpt2":
        return model, _gpt2_tokenizer(config, folder)
    return model, get_tokenizer(tokenizer_ref, base_dir=folder)


# ---- OpenAI's TensorFlow checkpoint -------------------------------------------------------------

def _tf_name(name: str) -> tuple[str, bool]:
    """``model/h3/attn/c_attn/w`` -> (``h.3.attn.c_attn.weight``, True: a Conv1D weight to transpose)."""
    parts = name.removeprefix("model/").split("/")
    if re.fullmatch(r"h\d+", parts[0]):
        parts = ["h", parts[0][1:], *parts[1:]]
    if parts[-1] in ("wte", "wpe"):
        return f"{parts[-1]}.weight", False
    last = {"g": "weight", "b": "bias", "w": "weight"}.get(parts[-1])
    if last is None:
        raise GptlabError(f"unexpected variable {name!r} in the TensorFlow checkpoint")
    return ".".join([*parts[:-1], last]), parts[-1] == "w"


def _load_tf_folder(folder: Path) -> tuple[GPTModel, Tokenizer]:
    try:
        import tensorflow as tf
    except ImportError:
        raise GptlabError(
            f"{folder}: reading OpenAI's TensorFlow checkpoint needs TensorFlow: pip install 'gptlab[tf]' "
            "(or convert it once elsewhere with `gptlab export --format hf`)"
        ) from None
    hparams = _read_json(folder / "hparams.json")
    try:
        config = GPTConfig(
            vocab_size=hparams["n_vocab"], context_length=hparams["n_ctx"], n_embd=hparams["n_embd"],
            n_layer=hparams["n_layer"], n_head=hparams["n_head"],
        )
    except KeyError as e:
        raise GptlabError(f"{folder / 'hparams.json'}: missing {e}") from None
    checkpoint = tf.train.latest_checkpoint(str(folder)) or str(folder / "model.ckpt")
    try:
        reader = tf.train.load_checkpoint(checkpoint)
    except Exception as e:  # TensorFlow raises its own error types for a missing or corrupt bundle
        raise GptlabError(f"{folder}: cannot read the TensorFlow checkpoint ({type(e).__name__}: {e})") from None
    state: State = {}
    for name in reader.get_variable_to_shape_map():
        key, conv1d = _tf_name(name)
        tensor = torch.from_numpy(reader.get_tensor(name))
        state[key] = tensor.squeeze(0).t().contiguous() if conv1d else tensor  # Conv1D: (1, in, out) -> (out, in)
    return _assemble(config, state, folder), _gpt2_tokenizer(config, folder)


# ---- the LLMs-from-scratch book's GPTModel ------------------------------------------------------

BOOK_NAMES = {  # book name -> gptlab name, for everything but the split q/k/v projections
    "tok_emb.weight": "wte.weight",
    "pos_emb.weight": "wpe.weight",
    "final_norm.scale": "ln_f.weight",
    "final_norm.shift": "ln_f.bias",
    "out_head.weight": "lm_head.weight",
    "out_head.bias": "lm_head.bias",  # a classifier head (chapter 6) has a bias
}
BOOK_BLOCK_NAMES = {
    "norm1.scale": "ln_1.weight",
    "norm1.shift": "ln_1.bias",
    "norm2.scale": "ln_2.weight",
    "norm2.shift": "ln_2.bias",
    "att.out_proj.weight": "attn.c_proj.weight",
    "att.out_proj.bias": "attn.c_proj.bias",
    "ff.layers.0.weight": "mlp.c_fc.weight",
    "ff.layers.0.bias": "mlp.c_fc.bias",
    "ff.layers.2.weight": "mlp.c_proj.weight",
    "ff.layers.2.bias": "mlp.c_proj.bias",
}
# The book's model sizes (GPT_CONFIG_124M ... 1558M) all use GPT-2's 64-wide heads.
GPT2_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 20, 1600: 25}


def _torch_load(path: Path) -> dict:
    """``torch.load`` that never runs pickled code (no mmap: a map would keep read pages resident)."""
    return load_torch_file(path, "it is not a plain state dict of tensors: save one with "
                                 "torch.save(model.state_dict(), path)")


def _book_to_gptlab(state: State, path: Path) -> State:
    out: State = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    while state:  # popping as we go frees each original once it has been mapped
        key, tensor = state.popitem()
        key = key.removeprefix("_orig_mod.")  # a torch.compile'd model's state dict
        block = re.fullmatch(r"trf_blocks\.(\d+)\.(.+)", key)
        if key in BOOK_NAMES:
            out[BOOK_NAMES[key]] = tensor
        elif block and block[2] in BOOK_BLOCK_NAMES:
            out[f"h.{block[1]}.{BOOK_BLOCK_NAMES[block[2]]}"] = tensor
        elif block and (proj := re.fullmatch(r"att\.W_(query|key|value)\.(weight|bias)", block[2])):
            qkv.setdefault((int(block[1]), proj[2]), {})[proj[1]] = tensor
        elif not (block and block[2] == "att.mask"):  # the causal mask buffer holds no weights
            unknown.append(key)
    if unknown:
        raise GptlabError(
            f"{path}: not a state dict of the book's GPTModel; unrecognised keys {unknown[:3]}"
            f"{'...' if len(unknown) > 3 else ''}"
        )
    while qkv:
        (layer, kind), parts = qkv.popitem()
        if set(parts) != {"query", "key", "value"}:
            raise GptlabError(f"{path}: block {layer} lacks some of W_query/W_key/W_value {kind}")
        out[f"h.{layer}.attn.c_attn.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def _book_config(state: State, path: Path, expect: GPTConfig | None) -> GPTConfig:
    """Sizes from the tensors' shapes; the head count (which no shape shows) from a sidecar, ``expect``,
    or GPT-2's convention for the book's four model widths."""
    try:
        vocab_size, n_embd = state["wte.weight"].shape
        context_length = state["wpe.weight"].shape[0]
    except KeyError as e:
        raise GptlabError(f"{path}: not a state dict of the book's GPTModel (no {e})") from None
    n_layer = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("h.")), default=-1)
    found = dict(vocab_size=vocab_size, context_length=context_length, n_embd=n_embd, n_layer=n_layer,
                 qkv_bias="h.0.attn.c_attn.bias" in state, tie_weights=False)
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():  # the book's GPT_CONFIG dict, json.dump'ed next to the weights
        book = _read_json(sidecar)
        names = {"vocab_size": "vocab_size", "context_length": "context_length", "n_embd": "emb_dim",
                 "n_layer": "n_layers", "qkv_bias": "qkv_bias"}
        differing = [f"{names[k]} {book[names[k]]!r} (weights: {v!r})"
                     for k, v in found.items() if k in names and names[k] in book and book[names[k]] != v]
        if differing:
            raise GptlabError(f"{sidecar}: does not match the weights in {path.name}: {', '.join(differing)}")
        if "n_heads" not in book:
            raise GptlabError(f"{sidecar}: has no 'n_heads'")
        return GPTConfig(**found, n_head=book["n_heads"], dropout=book.get("drop_rate", 0.0))
    if expect is not None:
        return GPTConfig(**found, n_head=expect.n_head)
    if n_embd in GPT2_HEADS_BY_WIDTH:
        log.info("%s: %d heads, GPT-2's number for width %d (a %s with 'n_heads' overrides it)",
                 path, GPT2_HEADS_BY_WIDTH[n_embd], n_embd, sidecar.name)
        return GPTConfig(**found, n_head=GPT2_HEADS_BY_WIDTH[n_embd])
    raise GptlabError(
        f"{path}: the number of attention heads is not stored in a state dict; write the model's config "
        f"next to it: json.dump(GPT_CONFIG, open({str(sidecar)!r}, 'w'))"
    )


def _load_book_pth(path: Path, expect: GPTConfig | None) -> tuple[GPTModel, Tokenizer]:
    state = _torch_load(path)
    if isinstance(state, dict) and isinstance(state.get("model_state_dict"), dict):
        state = state["model_state_dict"]  # the book's model_and_optimizer.pth
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GptlabError(f"{path}: not a state dict (a dict of tensors)")
    state = _book_to_gptlab(state, path)
    config = _book_config(state, path, expect)
    return _assemble(config, state, path), _gpt2_tokenizer(config, path)


def require_language_model(model: GPTModel, source: str | Path, command: str) -> None:
    """Refuse a classifier where the next token is needed: its few-class head would "generate" tokens 0, 1, ..."""
    if is_classifier(model):
        labels = source_metadata(source).get("labels")
        what = f"labels {', '.join(map(str, labels))}" if labels else f"{model.lm_head.weight.shape[0]} classes"
        raise GptlabError(f"{source} is a classifier run (finetune-classifier, {what}); {command} needs a language "
                          f"model. Label texts with `gptlab classify --model {source} TEXT`")


def build_model(preset: str, init: str | None, tokenizer_name: str | None, overrides: dict,
                command: str = "training", drop_head: bool = False, num_classes: int | None = None,
                lora: LoRAConfig | None = None) -> tuple[GPTModel, Tokenizer]:
    """A fresh model from a preset (sized to the tokenizer's vocabulary), or a loaded one from ``init``.

    A classifier run as ``init`` is refused (``command`` names the stage that needs a language model) unless
    ``drop_head``: then its backbone is taken for the new head. ``num_classes`` gives it a classifier head;
    ``lora`` freezes the loaded model and adds adapters (the run then refers to ``init`` as its base).
    The model comes back in training mode with what trains unfrozen: adapters and a new head with ``lora``,
    every parameter otherwise (a stage narrows that with ``gptlab.surgery.select_trainable``).
    """
    if init is None:
        if lora is not None:
            raise GptlabError("LoRA adapts a trained model: give --init SOURCE, or leave --lora out")
        tokenizer = get_tokenizer(tokenizer_name or "gpt2")
        config = GPTConfig.preset(preset, **{"vocab_size": tokenizer.n_vocab, **overrides})
        model = GPTModel(config)
        return (add_classifier_head(model, num_classes) if num_classes else model), tokenizer
    model, tokenizer = load_base(init)
    if is_quantized(model) and lora is None:
        origin = source_metadata(init).get("exported_from")
        raise GptlabError(f"--init {init} is quantized ({describe(model.quantization)}): its weights are integers, "
                          f"which do not train; add --lora to train adapters over them (QLoRA), or train on the "
                          f"float model it was quantized from{f' ({origin})' if origin else ''}")
    if drop_head and not is_classifier(model):
        raise GptlabError(f"--drop-head: {init} has no classifier head to drop (it is a language model); "
                          "leave --drop-head out")
    if not drop_head and is_classifier(model):
        require_language_model(model, init, command)
    changed = {k: v for k, v in overrides.items() if v is not None and getattr(model.config, k) != v}
    if "dropout" in changed:
        model.set_dropout(changed.pop("dropout"))
    if changed:
        raise GptlabError(f"--init {init}: cannot change {sorted(changed)} of a trained model")
    base = base_reference(init, model) if lora is not None else None  # of the weights as loaded, before surgery
    model.requires_grad_(True)
    if num_classes:
        add_classifier_head(model, num_classes)
    if lora is not None:
        add_lora(model, lora, base)
    return model.train(), tokenizer


# ---- Hugging Face PEFT: LoRA adapters of a GPT-2 ------------------------------------------------
#
# PEFT's adapter folder is adapter_config.json + adapter_model.safetensors, keyed by the module names of
# transformers' GPT2LMHeadModel behind "base_model.model.": ``...transformer.h.3.attn.c_attn.lora_A.weight``
# (rank, in) and ``.lora_B.weight`` (out, rank), the head's ``base_model.model.lm_head.lora_A.weight``. Those are
# gptlab's own layout (gptlab.lora) and names (OpenAI's, minus "transformer."), so the adapters move as they are:
# PEFT's Conv1D layers take the same (rank, in) / (out, rank) matrices, fan_in_fan_out only turns the merged delta.

PEFT_PREFIX = "base_model.model."
# gptlab's LoRA target -> PEFT's target_modules entry (a module name suffix, matched at a "." boundary)
PEFT_TARGETS = {"attn.c_attn": "attn.c_attn", "attn.c_proj": "attn.c_proj", "mlp.c_fc": "mlp.c_fc",
                "mlp.c_proj": "mlp.c_proj", "head": "lm_head"}
PEFT_LORA_KEY = re.compile(r"base_model\.model\.(?:transformer\.)?(h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|"
                           r"mlp\.c_proj)|lm_head)\.lora_([AB])\.weight")
PEFT_GPT2_MODULE = re.compile(r"base_model\.model\.(?:transformer\.)?((?:h\.\d+\.)?[a-z_0-9]+(?:\.c_[a-z]+)?|lm_head)"
                              r"\.(.+)")
GPT2_MODULE_NAMES = re.compile(r"(h\.\d+\.(attn|mlp|ln_1|ln_2)(\.c_[a-z]+)?|wte|wpe|ln_f|lm_head)")
# LoraConfig fields that select what gptlab's LoRA does not compute; any value but an empty one is refused
PEFT_VARIANTS = ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "lora_bias", "modules_to_save",
                 "layer_replication", "target_parameters", "trainable_token_indices", "use_qalora", "use_bdlora",
                 "velora_config", "monteclora_config", "arrow_config", "kasa_config", "alora_invocation_tokens")
# init_lora_weights that leave the base's weights as they are (PiSSA, OLoRA, CorDA, LoftQ change them)
PEFT_PLAIN_INITS = (True, False, None, "gaussian", "eva", "orthogonal")
EXPORT_FORMATS = ("hf", "peft", "run")

_peft_folders_loading: list[Path] = []  # a base_model_name_or_path chain that comes back to itself is an error


def export_peft(model: GPTModel, out_dir: str | Path, base_name_or_path: str, overwrite: bool = False) -> None:
    """Write the adapters of a LoRA ``model`` as Hugging Face PEFT's LoRA adapter folder for GPT-2.

    ``adapter_config.json`` (peft_type LORA, task_type CAUSAL_LM, ``base_model_name_or_path`` =
    ``base_name_or_path``) and ``adapter_model.safetensors``, which
    ``peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(BASE), out_dir)`` loads: BASE being the
    base's weights in Hugging Face's layout (``export_hf`` of it). Only the adapters are written, never the base.
    A folder that is not empty is refused unless ``overwrite``, which also removes files a loader would read
    instead (``adapter_model.bin``); other files stay.
    """
    lora = getattr(model, "lora", None)
    if lora is None:
        raise GptlabError("this model has no LoRA adapters; --format peft writes the adapters of a LoRA run "
                          "(train one with --lora), --format hf a whole model")
    if is_classifier(model):
        raise GptlabError("this is a classifier LoRA run; PEFT export covers language models: write a standalone "
                          "run of it with `gptlab export --merge --format run SOURCE OUT_DIR`")
    out_dir = check_export_dir(out_dir, overwrite)
    state: State = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoRAAdapter):
            module = f"{PEFT_PREFIX}{'' if name == 'lm_head' else 'transformer.'}{name}"
            state[f"{module}.lora_A.weight"] = layer.lora_A
            state[f"{module}.lora_B.weight"] = layer.lora_B
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_name_or_path),
        "revision": None,
        "inference_mode": True,
        "r": lora.rank,
        "lora_alpha": alpha,
        "lora_dropout": lora.dropout,
        "target_modules": [PEFT_TARGETS[t] for t in lora.targets],
        # GPT-2's block layers are Conv1D (weights stored (in, out)); the head is a Linear, for which PEFT turns
        # the flag off again (with a warning) when it is the only target
        "fan_in_fan_out": any(t != "head" for t in lora.targets),
        "bias": "none",
        "lora_bias": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        # a tied head's adapter changes the head alone, as in gptlab; True would give the embedding one too
        "ensure_weight_tying": False,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        (out_dir / PEFT_TORCH_WEIGHTS).unlink(missing_ok=True)
    atomic_write(out_dir / PEFT_WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write_text(out_dir / PEFT_CONFIG, json.dumps(config, indent=2) + "\n")


def export_model(source: str | Path, out_dir: str | Path, format: str = "hf", merge: bool = False,
                 overwrite: bool = False) -> str:
    """``gptlab export``: write the model ``source`` (anything ``load`` reads) to ``out_dir``; returns a summary line.

    ``format``: "hf" (``export_hf``), "peft" (``export_peft`` of a LoRA source's adapters, naming its base) or
    "run" (an ordinary gptlab run directory, ``gptlab.run.save_model``). A LoRA source (a LoRA run, a PEFT
    folder) needs ``merge`` for "hf" and "run": its adapters are folded into the weights, and what is written
    stands alone, without the base.
    """
    if format not in EXPORT_FORMATS:
        raise GptlabError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if format == "peft" and merge:
        raise GptlabError("--merge folds the adapters into the weights, and --format peft writes the adapters "
                          "alone: leave out --merge, or use --format hf / run for the merged model")
    check_export_dir(out_dir, overwrite, source)  # before reading a model of gigabytes
    lora_source = _is_lora_source(source)
    if format != "peft" and not merge and lora_source:
        raise _needs_merge(source, format)
    if format == "peft" and not lora_source:
        raise _no_adapters(source)
    model, tokenizer = load(source)
    lora = getattr(model, "lora", None)
    if format == "peft":
        if lora is None:
            raise _no_adapters(source)
        base = model.base_ref["source"]
        export_peft(model, out_dir, base, overwrite=overwrite)
        return (f"wrote {out_dir}: PEFT LoRA adapter (rank {lora.rank}, {', '.join(lora.targets)}) "
                f"for the base {base}")
    if lora is not None and not merge:
        raise _needs_merge(source, format)
    dequantized = is_quantized(model)
    merge_adapters(model)  # over an int8 / int4 base: dequantized, then merged
    dequantize_model(model)  # what --format hf and run hold: float32 weights (README: Low precision)
    merged = ", ".join([""] + [what for what, done in (("LoRA merged", lora is not None),
                                                       ("dequantized to float32", dequantized)) if done])
    size = f"{model.num_parameters() / 1e6:.1f}M parameters"
    if format == "hf":
        export_hf(model, out_dir, tokenizer, overwrite=overwrite)
        return f"wrote {out_dir}: Hugging Face GPT-2 ({size}{merged})"
    export_run(model, out_dir, tokenizer, source, overwrite=overwrite)
    return f"wrote {out_dir}: gptlab run ({size}{merged})"


def export_run(model: GPTModel, out_dir: str | Path, tokenizer: Tokenizer, source: str | Path | None = None,
               overwrite: bool = False) -> None:
    """Write ``model`` (without adapters) as an ordinary gptlab run directory, usable without any base.

    A run directory ``source`` passes on what its users read (stage, labels, classifier settings, prompt style);
    its LoRA entries ("lora", "base") do not apply to the merged weights and are left out.
    """
    if getattr(model, "lora", None) is not None:
        raise GptlabError("this model has LoRA adapters; a standalone run holds merged weights: merge them first "
                          "(gptlab export --merge; gptlab.surgery.merge_lora)")
    out_dir = check_export_dir(out_dir, overwrite)
    meta = {k: v for k, v in source_metadata(source).items()
            if k not in ("model", "tokenizer", "lora", "base", "quantization")} if source is not None else {}
    if source is not None:
        meta["exported_from"] = str(Path(source).resolve()) if Path(source).exists() else str(source)
    if overwrite and out_dir.is_dir():
        clear_run(out_dir)
        _remove_shadowing_files(out_dir)
    save_model(out_dir, model, tokenizer, meta)


def _is_lora_source(source: str | Path) -> bool:
    """Does ``source`` hold LoRA adapters (a LoRA run, a PEFT folder)? Told from its files, without loading it."""
    path = Path(source)
    folder = path.parent if path.is_file() and path.name in MODEL_FOLDER_FILES else path
    return (folder / PEFT_CONFIG).is_file() or "lora" in source_metadata(folder)


def _no_adapters(source: str | Path) -> GptlabError:
    return GptlabError(f"{source} has no LoRA adapters; --format peft writes the adapters of a LoRA run (train one "
                       "with --lora); write a whole model with --format hf")


def _needs_merge(source: str | Path, format: str) -> GptlabError:
    what = "a Hugging Face GPT-2 folder" if format == "hf" else "a standalone run"
    return GptlabError(f"{source} holds LoRA adapters, which {what} cannot keep apart from the weights: pass "
                       f"--merge to fold them in (the result needs no base), or write the adapters alone for "
                       f"PEFT with --format peft")


def _load_peft_folder(folder: Path, expect: GPTConfig | None) -> tuple[GPTModel, Tokenizer]:
    """A PEFT LoRA adapter folder: its base (``base_model_name_or_path``, any source ``load`` reads) with the
    adapters added by ``add_lora``, unmerged; the base's own adapters, if it has any, are merged into it first."""
    config_path = folder / PEFT_CONFIG
    raw = _read_json(config_path)
    lora = _peft_lora_config(raw, config_path)
    file, tensors = _peft_tensors(folder)
    adapters, saved = _peft_to_gptlab(tensors, file)
    targets = tuple(sorted({_gptlab_target(name) for name in adapters}))
    try:
        lora = LoRAConfig(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=targets)
    except GptlabError as e:
        raise GptlabError(f"{config_path}: {e}") from None

    base = _peft_base(raw, folder)
    resolved = Path(base).resolve() if Path(base).exists() else None
    if resolved is not None and any(same_path(resolved, f) for f in [folder, *_peft_folders_loading]):
        raise GptlabError(f"{config_path}: base_model_name_or_path {base!r} leads back to this adapter folder; "
                          "point it at the base model the adapter was trained on")
    _peft_folders_loading.append(folder.resolve())
    try:
        model, tokenizer = load(base, expect=expect)
    except GptlabError as e:
        raise GptlabError(f"{folder} is a PEFT adapter for the base {base}, which does not load ({e}); set "
                          f"base_model_name_or_path in {PEFT_CONFIG} to where the base is") from None
    finally:
        _peft_folders_loading.pop()
    merge_adapters(model)
    if is_classifier(model):
        raise GptlabError(f"{folder}: its base {base} is a classifier; a PEFT adapter loads on a GPT-2 language "
                          "model (task_type CAUSAL_LM)")

    _check_peft_shapes(model, adapters, lora.rank, file, base)
    for name, tensor in saved.items():  # a copy of a base layer that PEFT saved beside the adapters
        own = model.get_submodule(name).weight
        if tensor.shape != own.shape or not torch.allclose(tensor.to(own.dtype), own.detach(), atol=1e-6):
            raise GptlabError(f"{file}: holds its own {name} weights, unlike those of the base {base} (a resized "
                              "or trained embedding); gptlab applies LoRA adapters on the base as it is")
    add_lora(model, lora, base_reference(base, model))
    # every layer of a target gets an adapter in gptlab; those PEFT left out (layers_to_transform) are zeros: no change
    state = {}
    for name in _lora_layer_names(model):
        a, b = adapters.get(name, {}).get("A"), adapters.get(name, {}).get("B")
        layer = model.get_submodule(name)
        state[f"{name}.lora_A"] = a if a is not None else torch.zeros_like(layer.lora_A)
        state[f"{name}.lora_B"] = b if b is not None else torch.zeros_like(layer.lora_B)
    load_model_weights(model, state, file)
    return model, tokenizer


def _peft_lora_config(raw: dict, path: Path) -> LoRAConfig:
    """The rank, alpha and dropout of a PEFT ``adapter_config.json``; what gptlab's LoRA does not compute is refused."""
    if raw.get("peft_type") != "LORA":
        raise GptlabError(f"{path}: peft_type {raw.get('peft_type')!r}: gptlab loads LoRA adapters only "
                          "(peft_type 'LORA')")
    if raw.get("task_type") not in ("CAUSAL_LM", None):
        raise GptlabError(f"{path}: task_type {raw.get('task_type')!r}: gptlab loads adapters of language models "
                          "(task_type 'CAUSAL_LM')")
    found = [f"{k}={json.dumps(raw[k])}" for k in PEFT_VARIANTS if raw.get(k) not in (None, False, {}, [])]
    if raw.get("bias", "none") != "none":
        found.append(f"bias={json.dumps(raw['bias'])}")
    if raw.get("init_lora_weights", True) not in PEFT_PLAIN_INITS:
        found.append(f"init_lora_weights={json.dumps(raw['init_lora_weights'])} (it changes the base's weights)")
    if found:
        raise GptlabError(f"{path}: gptlab's LoRA does not implement {', '.join(found)}; it loads plain LoRA "
                          "adapters (one rank and alpha for every layer, no DoRA or rsLoRA)")
    rank, alpha, dropout = raw.get("r", 8), raw.get("lora_alpha", 8), raw.get("lora_dropout", 0.0)
    if not isinstance(rank, int) or isinstance(rank, bool) or not isinstance(alpha, (int, float)) \
            or not isinstance(dropout, (int, float)):
        raise GptlabError(f"{path}: r, lora_alpha and lora_dropout must be numbers, got {rank!r}, {alpha!r}, "
                          f"{dropout!r}")
    try:
        return LoRAConfig(rank=rank, alpha=float(alpha), dropout=float(dropout))
    except GptlabError as e:
        raise GptlabError(f"{path}: {e}") from None


def _peft_tensors(folder: Path) -> tuple[Path, State]:
    for name in (PEFT_WEIGHTS, PEFT_TORCH_WEIGHTS):
        file = folder / name
        if file.is_file():
            break
    else:
        raise GptlabError(f"{folder}: no {PEFT_WEIGHTS} (or {PEFT_TORCH_WEIGHTS}) next to {PEFT_CONFIG}")
    if file.suffix == ".safetensors":
        try:
            with safe_open(file, framework="pt") as f:
                return file, {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise GptlabError(f"{file}: corrupt weights file ({e})") from None
    state = _torch_load(file)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GptlabError(f"{file}: not a state dict (a dict of tensors)")
    return file, state


def _peft_to_gptlab(tensors: State, file: Path) -> tuple[dict[str, dict[str, torch.Tensor]], State]:
    """PEFT's keys -> ``{gptlab layer name: {"A": lora_A, "B": lora_B}}``, and the base layers PEFT saved a copy of
    (``lm_head.base_layer.weight``, with a tied head among the targets); other keys are errors naming them."""
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    saved: State = {}
    for key, tensor in sorted(tensors.items()):
        if m := PEFT_LORA_KEY.fullmatch(key):
            adapters.setdefault(m[1], {})[m[4]] = tensor
            continue
        module = PEFT_GPT2_MODULE.fullmatch(key)
        if module and module[1] in ("lm_head", "wte") and module[2] == "base_layer.weight":
            saved[module[1]] = tensor
        elif module and GPT2_MODULE_NAMES.fullmatch(module[1]):
            gpt2_name = module[1].split(".", 2)[-1] if module[1].startswith("h.") else module[1]
            raise GptlabError(f"{file}: {key}: an adapter on {gpt2_name} ({module[2]}), which gptlab cannot map: its "
                              f"LoRA adapts {', '.join(PEFT_TARGETS.values())} only")
        else:
            raise GptlabError(f"{file}: a PEFT folder for another architecture ({key} is no module of GPT-2's "
                              "GPT2LMHeadModel); gptlab loads adapters of GPT-2 models")
    if not adapters:
        raise GptlabError(f"{file}: holds no LoRA weights (lora_A / lora_B); is it an adapter of another kind?")
    for name, parts in adapters.items():
        if set(parts) != {"A", "B"}:
            missing = "lora_B" if "A" in parts else "lora_A"
            raise GptlabError(f"{file}: {name} has no {missing}; the adapter is damaged, save it again")
    return adapters, saved


def _gptlab_target(name: str) -> str:
    return "head" if name == "lm_head" else name.split(".", 2)[2]


def _lora_layer_names(model: GPTModel) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoRAAdapter)]


def _peft_base(raw: dict, folder: Path) -> str:
    """``base_model_name_or_path``; a relative path that is not there from here is tried from the adapter folder."""
    base = raw.get("base_model_name_or_path")
    if not isinstance(base, str) or not base.strip():
        raise GptlabError(f"{folder / PEFT_CONFIG}: no base_model_name_or_path; set it to the base model the "
                          "adapter was trained on (a path, gpt2 or a hub id)")
    if raw.get("revision"):
        log.warning("%s: revision %r is not followed; the base is loaded as %s names it", folder / PEFT_CONFIG,
                    raw["revision"], base)
    if base not in GPT2_HUB_IDS and not Path(base).is_absolute() and not Path(base).exists() \
            and (folder / base).exists():
        return str(folder / base)
    return base


def _check_peft_shapes(model: GPTModel, adapters: dict[str, dict[str, torch.Tensor]], rank: int, file: Path,
                       base: str) -> None:
    """Every adapter on a layer the base has, with (rank, in) and (out, rank) matrices of that layer's sizes."""
    for name, parts in sorted(adapters.items()):
        layer_index = name.split(".")[1] if name.startswith("h.") else None
        if layer_index is not None and int(layer_index) >= model.config.n_layer:
            raise GptlabError(f"{file}: an adapter on {name}, but the base {base} has {model.config.n_layer} layers: "
                              "a PEFT folder for another architecture (or another base)")
        layer = model.get_submodule(name)
        for part, shape in (("A", (rank, layer.in_features)), ("B", (layer.out_features, rank))):
            if tuple(parts[part].shape) != shape:
                raise GptlabError(f"{file}: {name}.lora_{part} has shape {tuple(parts[part].shape)}, but r={rank} on "
                                  f"{name} of the base {base} needs {shape}: a PEFT folder for another architecture "
                                  "(or another base)")
