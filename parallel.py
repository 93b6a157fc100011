"""Processes and FSDP2: where this process stands in the job, the collectives the loops use, and how a model is
sharded. The same code runs as one plain process (`python train.py`) or N of them (`torchrun`).

    from parallel import D, print0, shard, decode_view
    D.rank, D.world, D.device      # set once by init_dist(), from the variables torchrun sets
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


D = Dist()  # this process's place in the job; set once by init_dist(), updated in place so every importer sees it


def init_dist(device: str) -> Dist:
    """Set D from the environment (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE); one process needs no process group."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ:  # plain `python train.py`
        D.rank, D.world, D.device = 0, 1, torch.device(device)
        return D
    local_rank = int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        fix_host_allocator()
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    D.rank, D.world, D.device = dist.get_rank(), dist.get_world_size(), dev
    return D


# FSDP on the host (gloo) gathers each block's weights, and frees them, at every forward and backward. glibc's malloc
# raises its mmap threshold each time a big block is freed (up to 32 MB) and then serves such blocks from its heap,
# which it cannot give back once fragmented: measured under 8-process gloo on a 351M model, 1.6-2.0 GiB per rank
# after one SFT step instead of 1.0 GiB. A fixed threshold keeps every allocation of at least this many bytes in its
# own mapping, handed back to the OS when freed. Memory only: no number a run computes changes.
HOST_MMAP_THRESHOLD = 1 << 20
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def fix_host_allocator():
    """Set glibc's mmap threshold to HOST_MMAP_THRESHOLD, unless the user set one (MALLOC_MMAP_THRESHOLD_)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD)
    except (OSError, AttributeError, TypeError):  # no mallopt (macOS), no CDLL(None) (Windows); musl's does nothing
        pass


def close_dist(ok: bool):
    """Tear the process group down. After a failure on nccl we skip it: destroy can block while the other ranks
    sit in a collective, and this process must exit so torchrun can end the job and show this rank's error."""
    if not dist.is_initialized():
        return
    if ok:
        dist.barrier()
    if ok or dist.get_backend() == "gloo":
        dist.destroy_process_group()


def print0(*args):
    if D.main:
        tqdm.write(" ".join(str(a) for a in args))


def progress(total: int, initial: int, on: bool, desc: str) -> tqdm:
    """A bar on rank 0 when asked for, and only on a terminal (tqdm's disable=None): a log file gets no redraws."""
    return tqdm(total=total, initial=initial, disable=None if (on and D.main) else True, desc=desc, leave=False)


def progress_iter(items, desc: str):
    """items, with a bar titled desc on rank 0 on a terminal (no bar when desc is empty)."""
    bar = progress(len(items), 0, bool(desc), desc)
    for x in items:
        yield x
        bar.update(1)
    bar.close()


def barrier():
    if D.world > 1:
        dist.barrier()


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over ranks (identity on one process)."""
    if D.world > 1:
        y = x.to(D.device, copy=True)  # nccl reduces CUDA tensors only
        dist.all_reduce(y)
        x = y.to(x.device)
    return x


def all_max(x: float) -> float:
    t = torch.tensor(x, dtype=torch.float64)
    if D.world > 1:
        t = t.to(D.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def reduce_metrics(sums: dict[str, float], count: float) -> dict[str, float]:
    """Metric sums from every rank -> their global means (count = number of units summed, on this rank)."""
    keys = sorted(sums)
    t = all_sum(torch.tensor([float(sums[k]) for k in keys] + [float(count)], dtype=torch.float64))
    return {k: (t[i] / t[-1]).item() for i, k in enumerate(keys)}


def to_device(batch: dict) -> dict:
    return {k: v.to(D.device) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------
# FSDP2


def shard(model, cfg, frozen: bool = False):
    """FSDP2: each block is its own all-gather unit, then the root (embeddings, final norm, head).

    Used whenever there are several processes, or bf16 is asked for (the mixed-precision policy keeps fp32
    master weights and reduces gradients in fp32). Frozen models (reference, DPO model and reward model during
    PPO) are sharded the same way: at the paper's scale three unsharded 8B copies per GPU would not fit; with
    --offload_frozen their shards live in host memory between forwards. A model on the meta device stays there
    (checkpoint.open_model materialises it); any other moves to this rank's device first.
    """
    if not any(p.is_meta for p in model.parameters()):
        model.to(D.device)
    model.grad_checkpointing = getattr(cfg, "activation_checkpointing", False)
    bf16 = getattr(cfg, "bf16", False)  # (evaluation, sample and explain configs hold fewer fields)
    if D.world == 1 and not bf16:
        return model
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():  # one process asking for bf16: FSDP needs a (single-rank) process group
        dist.init_process_group("nccl" if D.device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    model.compute_dtype = torch.bfloat16 if bf16 else next(model.parameters()).dtype  # what decode_view copies into
    kw = {"mp_policy": mp} if mp is not None else {}
    if frozen and getattr(cfg, "offload_frozen", False):
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=D.device.type == "cuda")
    for block in model.layers:
        fully_shard(block, **kw)
    # The root (embeddings, final norm, head) reshards after forward too: otherwise a no_grad forward (a rollout,
    # a reference pass) leaves its full parameters gathered, and an optimizer step then updates only the shards,
    # so the next forward would silently reuse stale weights.
    fully_shard(model, reshard_after_forward=True, **kw)
    return model


# a sharded model -> the plain copy generation runs on (decode_view); the copy lives as long as the model does
DECODE_COPIES = weakref.WeakKeyDictionary()


def decode_view(model):
    """The model generation runs on. A plain module is its own; a sharded one (FSDP2: several processes, or --bf16)
    gets a plain copy without FSDP hooks, its weights gathered whole in the compute dtype (bf16 under --bf16), and
    refreshed in place from the shards at every call, once per rollout: its addresses stay fixed, so a compiled
    decode step's CUDA graphs stay valid. A decode step then runs no FSDP hook and no all-gather; the memory plan
    counts the copy ("gathered_actor"). Every rank calls this together (each parameter is an all-gather)."""
    if not any(hasattr(p, "full_tensor") for p in model.parameters()):
        return model
    from model import Llama

    copy = DECODE_COPIES.get(model)
    if copy is None:
        with torch.device("meta"):
            copy = Llama(model.args)
        copy = copy.to_empty(device=D.device).to(getattr(model, "compute_dtype", torch.float32))
        if model.args.tie_embeddings:
            copy.output.weight = copy.tok_embeddings.weight
        copy.eval().requires_grad_(False)
        DECODE_COPIES[model] = copy
    params = dict(copy.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():  # one parameter gathered at a time: bounded memory
            params[name].copy_(p.full_tensor())
    return copy


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU (on rank 0; other ranks get an empty dict under FSDP): the whole model
    gathered at once. Exports stream instead (checkpoint.export_hf); the tests compare them with this."""
    if D.world == 1 and not any(hasattr(p, "full_tensor") for p in model.parameters()):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
