"""Peak memory of loading each GPT-2 size: one copy of the weights, not two.

For each size it writes a Hugging Face-format folder (``config.json`` + ``model.safetensors``, random
weights, so no download is needed) and measures, in a fresh process each time, the peak resident set
size (RSS) of ``gptlab.load(folder)``, minus the process's RSS after its imports. ``--naive`` also measures
the textbook way for contrast: build the model (random init), read the file, transpose, ``load_state_dict``.

    python benchmarks/bench_load_memory.py          # gpt2 ... gpt2-xl (needs ~7 GB disk and RAM)
    python benchmarks/bench_load_memory.py --sizes gpt2 gpt2-medium --naive

The checkpoint is written one tensor at a time in safetensors' layout (an 8-byte header length, a JSON
header, the raw tensors), so that writing gpt2-xl's 6 GB needs no 6 GB in memory either.
"""
from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from gptlab.model import GPTConfig
from gptlab.weights import hf_config_dict

SIZES = ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]
PRESET = {"gpt2": "gpt2-small", "gpt2-medium": "gpt2-medium", "gpt2-large": "gpt2-large", "gpt2-xl": "gpt2-xl"}


def hf_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face GPT-2's tensor names and shapes (Conv1D weights stored as (in, out))."""
    C = config.n_embd
    shapes = {"transformer.wte.weight": (config.vocab_size, C), "transformer.wpe.weight": (config.context_length, C)}
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "ln_1.weight": (C,), p + "ln_1.bias": (C,),
            p + "attn.c_attn.weight": (C, 3 * C), p + "attn.c_attn.bias": (3 * C,),
            p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
            p + "ln_2.weight": (C,), p + "ln_2.bias": (C,),
            p + "mlp.c_fc.weight": (C, 4 * C), p + "mlp.c_fc.bias": (4 * C,),
            p + "mlp.c_proj.weight": (4 * C, C), p + "mlp.c_proj.bias": (C,),
        })
    shapes.update({"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)})
    return shapes


def write_random_hf_folder(folder: Path, config: GPTConfig) -> None:
    """config.json + a model.safetensors with random weights, streamed one tensor at a time."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    shapes = hf_shapes(config)
    for name, shape in shapes.items():
        n = 4 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # safetensors aligns the data to 8 bytes
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
        for shape in shapes.values():
            f.write((torch.randn(shape) * 0.02).numpy().tobytes())
    (folder / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2))


CHILD = r"""
import json, resource, sys, time
import torch
from gptlab.weights import load, CONV1D_WEIGHTS
from gptlab.model import GPTModel
from gptlab.weights import _hf_config
from safetensors.torch import load_file

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

folder, mode = sys.argv[1], sys.argv[2]
base = rss_mb()
t0 = time.perf_counter()
if mode == "gptlab":
    model, _ = load(folder)
else:  # the textbook way: a randomly initialised model, the whole file read, transposed copies, copied in
    config = _hf_config(json.load(open(folder + "/config.json")), folder)
    model = GPTModel(config)
    state = load_file(folder + "/model.safetensors")
    state = {k.removeprefix("transformer."): (v.t() if k.endswith(CONV1D_WEIGHTS) else v) for k, v in state.items()}
    model.load_state_dict(state, strict=False)
    del state
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
print(json.dumps(dict(base_mb=base, peak_mb=peak, weights_mb=weights, seconds=seconds)))
"""


def measure(folder: Path, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=SIZES, choices=SIZES)
    parser.add_argument("--naive", action="store_true", help="also measure random init + load_state_dict")
    parser.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_load_memory."))
    modes = ["gptlab", "naive"] if args.naive else ["gptlab"]
    print(f"{'size':<12} {'method':<7} {'weights MB':>10} {'peak RSS MB':>11} {'above base MB':>13} "
          f"{'/ weights':>9} {'seconds':>8}")
    try:
        for size in args.sizes:
            folder = workdir / size
            write_random_hf_folder(folder, GPTConfig.preset(PRESET[size]))
            for mode in modes:
                r = measure(folder, mode)
                above = r["peak_mb"] - r["base_mb"]
                print(f"{size:<12} {mode:<7} {r['weights_mb']:>10.0f} {r['peak_mb']:>11.0f} {above:>13.0f} "
                      f"{above / r['weights_mb']:>9.2f} {r['seconds']:>8.1f}", flush=True)
            shutil.rmtree(folder)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
