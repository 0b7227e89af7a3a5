"""Several processes, one training run: PyTorch's own process group, as ``torchrun`` starts it.

``torchrun --nproc-per-node N -m gptlab pretrain ...`` starts N copies of the command with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment (and ``MASTER_ADDR``/``MASTER_PORT`` to meet at).
``setup`` joins them into one process group (NCCL on CUDA, one GPU per local rank; gloo on the CPU) with
a bounded collective timeout, so that a rank that died makes the others fail instead of waiting forever.
Without those variables everything here answers for one process, and no collective is ever called: the
single-process path is unchanged.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from gptlab.errors import GptlabError

TIMEOUT_ENV = "GPTLAB_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0
# Under NCCL, the stop flag that every step exchanges (and the random states a checkpoint gathers) go over a
# gloo group on the CPU: a flag on the GPU would make each step wait for the GPU to finish its queue.
_control_group = None


def launched() -> bool:
    """True in a process that torchrun (or another launcher that sets its variables) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """The rank that writes files, logs and draws the progress bar."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def timeout_s() -> float:
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise GptlabError(f"{TIMEOUT_ENV}={text!r}: give the collective timeout as a positive number of seconds")
    return value


def setup(device: str = "auto") -> bool:
    """Join torchrun's process group (once); True if this process is one of several ranks.

    ``device`` is the run's ``--device``: NCCL when it is (or ``auto`` finds) CUDA, each rank on the GPU
    ``LOCAL_RANK``; gloo otherwise.
    """
    if not launched() or active():
        return active()
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if local_rank() >= torch.cuda.device_count():
            raise GptlabError(f"LOCAL_RANK {local_rank()} but this machine has {torch.cuda.device_count()} CUDA "
                              f"GPU(s): give torchrun --nproc-per-node at most that")
        torch.cuda.set_device(local_rank())
    timeout = datetime.timedelta(seconds=timeout_s())
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    if use_cuda:
        global _control_group
        _control_group = dist.new_group(backend="gloo", timeout=timeout)
    return True


def teardown() -> None:
    global _control_group
    if active():
        dist.destroy_process_group()
    _control_group = None


def rank_device(device: torch.device) -> torch.device:
    """Each rank's own GPU (``cuda:LOCAL_RANK``) when the run is on CUDA and several ranks share a machine."""
    if active() and device.type == "cuda":
        return torch.device("cuda", local_rank())
    return device


def total(value: float | torch.Tensor) -> float:
    """The sum over ranks of a number every rank has (its share of a validation loss, its batch count)."""
    if not active():
        return float(value)
    t = torch.as_tensor(value, dtype=torch.float64).detach().to(_collective_device(), copy=True)
    dist.all_reduce(t)
    return t.item()


def mean(value: float | torch.Tensor) -> float:
    """The mean over ranks of a number every rank has (its mean training loss)."""
    return total(value) / world_size()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any: a stop that one rank saw (its Ctrl-C, SIGTERM)."""
    if not active():
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control_group)
    return bool(t.item())


def gather(obj):
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj, group=_control_group)
    return out


def barrier() -> None:
    if active():
        dist.barrier()


def lost_peers(error: BaseException) -> bool:
    """Is ``error`` a collective that timed out or lost its peers (another rank died, or hangs)? Gloo raises a
    plain RuntimeError that names itself; the others a ``torch.distributed.DistError``."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(w in text for w in ("gloo", "NCCL", "Connection reset"))


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# ---- the model across ranks: DDP replicas or FSDP2 shards -----------------------------------------

def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP: a replica on every rank, gradients averaged in the backward pass (``no_sync`` skips that)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2 in place: every transformer block (``model.h``) its own unit, then the root (embeddings, the
    final norm, the head): each rank keeps a shard of every parameter, its gradient and optimizer state."""
    from torch.distributed.fsdp import fully_shard

    for block in model.h:
        fully_shard(block)
    fully_shard(model)


@contextlib.contextmanager
def fsdp_no_sync(model):
    """FSDP2's ``no_sync``: gradients accumulate unsharded on each rank until a micro-step that syncs."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's whole state, on the CPU of rank 0 (empty on the others); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(run_dir: Path, step: int, model: torch.nn.Module, optimizer) -> Path:
    """Every rank writes its shards of the weights and optimizer (``torch.distributed.checkpoint``) into a
    hidden folder of ``run_dir``, which rank 0 then moves into its checkpoint set; returns the folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = run_dir / f".checkpoint-{step}.dcp.tmp"  # a killed run's is removed like its other temporaries
    if is_main():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
    barrier()  # all shards written before rank 0 commits the set
    return folder


def load_sharded(folder: Path, model: torch.nn.Module, optimizer, fix: str) -> None:
    """Read what ``save_sharded`` wrote into the sharded ``model`` and its ``optimizer``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (folder / ".metadata").is_file():
        raise GptlabError(f"{folder}: missing or incomplete; {fix}")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, checkpoint_id=folder)
    except Exception as e:  # DCP raises its own CheckpointException around the ranks' errors
        raise GptlabError(f"{folder}: the sharded state does not fit this run ({type(e).__name__}); {fix}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
