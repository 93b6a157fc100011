"""The machinery under train.py's loops: processes and FSDP2, loading and sharding models, resumable checkpoints,
the run directory (lock, config, metrics) and the checks that stop a run early instead of letting it go wrong.

    from runtime import D, print0, shard, gathered, save_checkpoint, load_checkpoint
    D.rank, D.world, D.device      # this process's place in the job, set once by init_dist()

Nothing here is RLHF: train.py reads top to bottom as the stages' loops and calls these.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import socket
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import hf
from hf import Tokenizer
from model import Llama, ModelArgs, resize_vocab


class UserError(ValueError):
    """A mistake in the command line, the data or a checkpoint: main() prints its message, not a traceback."""


# ==========================================================================================================
# Distributed: torchrun is detected from the environment; one process needs no process group at all.


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_dist(device: str) -> Dist:
    """Set D from the environment (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE). D is updated in place, so every
    module that imported it sees the same object."""
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
# after one SFT step instead of 1.0 GiB (one malloc arena instead of many does not help: 1.8-2.1). A fixed threshold
# keeps every allocation of at least this many bytes in its own mapping, handed back to the OS when freed. Memory
# only, no number a run computes changes; speed: that SFT step ran at 5.9 tokens/s with it, 4.4 without, and the
# 2-process tests take the same time (71 s, 70 s). A single process, which gathers nothing, keeps glibc's default:
# there each fresh mapping's page faults would only cost time.
HOST_MMAP_THRESHOLD = 1 << 20
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def fix_host_allocator():
    """Set glibc's mmap threshold to HOST_MMAP_THRESHOLD (also turning off its dynamic raising), unless the user set
    one (MALLOC_MMAP_THRESHOLD_); without glibc there is nothing to set."""
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


D = Dist()  # this process's place in the job; set once by init_dist()


def print0(*args):
    if D.main:
        tqdm.write(" ".join(str(a) for a in args))


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


def shard(model: Llama, cfg, frozen: bool = False) -> Llama:
    """FSDP2: each block is its own all-gather unit, then the root (embeddings, final norm, head).

    Used whenever there are several processes, or bf16 is asked for (the mixed-precision policy keeps fp32
    master weights and reduces gradients in fp32). Frozen models (reference, DPO model and reward model during
    PPO) are sharded the same way: at the paper's scale three unsharded 8B copies per GPU would not fit; with
    --offload_frozen their shards live in host memory between forwards. A model on the meta device stays there
    (open_model materialises it); any other moves to this rank's device first.
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


@contextmanager
def gathered(model):
    """Generation runs one forward per token: gather the sharded weights once for the whole loop instead of
    once per token, then shard them again (FSDP2 unshard / reshard)."""
    from torch.distributed.fsdp import FSDPModule

    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in mods:  # unshard() is not recursive: every block and the root, each once
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield  # call model(...) inside, never a block directly: FSDP's root bookkeeping runs in root.forward
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU (on rank 0; other ranks get an empty dict under FSDP): the whole model
    gathered at once. Exports stream instead (export_hf); the tests compare them with this."""
    if D.world == 1 and not any(hasattr(p, "full_tensor") for p in model.parameters()):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ==========================================================================================================
# Checkpoints. Resumable ones are torch.distributed.checkpoint (sharded, loadable at any world size) written
# to step_N.tmp and renamed only when every rank has finished: a kill mid-save leaves the previous one intact.


MANIFEST = "manifest.json"  # sha256 of every file of a checkpoint, written last, inside the atomic rename


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_files(ckpt: Path) -> list[str]:
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)


def hash_files(ckpt: Path, names: list[str]) -> dict[str, str]:
    """sha256 of each file, the work split over the ranks (rank r hashes every world-th file) and the digests
    gathered on every rank: at 8B scale a checkpoint is ~200 GB, too much for one rank inside a collective's
    timeout."""
    mine = {n: sha256(ckpt / n) for n in names[D.rank::D.world]}
    if D.world > 1:
        parts = [None] * D.world
        dist.all_gather_object(parts, mine)
        mine = {k: v for p in parts for k, v in p.items()}
    return mine


def write_manifest(ckpt: Path, digests: dict[str, str] | None = None):
    digests = digests if digests is not None else hash_files(ckpt, checkpoint_files(ckpt))
    manifest = {"format": "rto-checkpoint-1", "files": dict(sorted(digests.items()))}
    (ckpt / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def verify_manifest(ckpt: Path):
    """Refuse a checkpoint unless every file is exactly one this project wrote: listed in manifest.json with the
    same sha256, nothing missing, nothing added. Runs before any of its files is read."""
    path = ckpt / MANIFEST
    try:
        listed = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{ckpt}: no readable {MANIFEST} ({e.__class__.__name__}); not a checkpoint this project "
                        f"completed, refusing to resume from it") from None
    present = set(checkpoint_files(ckpt))
    got = hash_files(ckpt, sorted(present & set(listed)))  # every rank reaches the same verdict
    bad = sorted(present ^ set(listed)) + sorted(f for f, h in got.items() if h != listed[f])
    if bad:
        raise UserError(f"{ckpt}: files {bad[:5]} differ from {MANIFEST} (changed, added or missing since this "
                        f"project wrote them); refusing to resume from it")


class SafeUnpickler(pickle.Unpickler):
    """DCP keeps its .metadata as a pickle, and pickle can run code. This one builds only the plain classes DCP
    metadata is made of, so even a replaced .metadata cannot execute anything."""
    ALLOWED = {("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")} | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
        ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def safe_dcp_reader(path: Path):
    """A FileSystemReader whose .metadata goes through SafeUnpickler, and a planner whose non-tensor entries
    (optimizer hyper-parameters, DCP stores them with torch.save) load with torch.load(weights_only=True)."""
    import io

    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):  # FileSystemReader's, with SafeUnpickler for pickle.load
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = SafeUnpickler(f).load()
            for info in (metadata.storage_data or {}).values():  # every data file inside this checkpoint
                name = str(getattr(info, "relative_path", ""))
                if not name or "/" in name or "\\" in name or name.startswith("."):
                    raise pickle.UnpicklingError(f"the metadata names a data file {name!r} outside the checkpoint")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            obj = torch.load(value, weights_only=True)  # refuses anything but tensors and plain containers
            buf = io.BytesIO()
            torch.save(obj, buf)  # the base class unpickles it again: now it holds only what was just checked
            buf.seek(0)
            super().load_bytes(read_item, buf)

    return Reader(str(path)), Planner()


def save_checkpoint(run_dir: Path, step: int, models: dict, optims: dict, scheds: dict, cfg):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    ckpt_dir = run_dir / "checkpoints"
    tmp, final = ckpt_dir / f"step_{step:06d}.tmp", ckpt_dir / f"step_{step:06d}"
    check_weights(step, models)
    check_outputs(step, models)
    try:
        if D.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        state = {}
        for name, model in models.items():
            msd, osd = get_state_dict(model, optims[name])
            state[name], state[f"{name}_optim"] = msd, osd
        dcp.save(state, checkpoint_id=str(tmp))
        # this rank's RNG state (the loops draw from generators derived from (seed, step, rank), so this is
        # belt and braces: torch's global generator is the only state not implied by the step)
        save_rng(tmp / f"rng_rank{D.rank}.safetensors")
        barrier()
        if D.main:
            meta = {"step": step, "world": D.world, "schedulers": {k: v.state_dict() for k, v in scheds.items()}}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            (tmp / "train_config.json").write_text(config_json(cfg))
        barrier()
        digests = hash_files(tmp, checkpoint_files(tmp))  # every rank hashes its share
        if D.main:
            write_manifest(tmp, digests)  # last: a checkpoint without a manifest was never completed
            hf.replace_dir(tmp, final)  # the commit point (an earlier run's step_N in this directory is swapped out)
            for old in ckpt_dir.glob("step_*"):
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    except (OSError, dcp.api.CheckpointException) as e:  # a full disk, a read-only directory (DCP wraps the
        # OSError of a failing rank in a CheckpointException, a BaseException): say where and why
        shutil.rmtree(tmp, ignore_errors=True)
        why = f"{e.strerror or e} ({e.filename or tmp})" if isinstance(e, OSError) else dcp_cause(e)
        free, need = shutil.disk_usage(ckpt_dir).free, checkpoint_bytes(models, optims)
        # torch's file writer reports a write cut short as a bare "unexpected pos N vs M": say what it means
        if not isinstance(e, OSError) and free < need:
            why = (f"No space left on device ({free / 2**20:.0f} MiB free, the checkpoint needs about "
                   f"{need / 2**20:.0f} MiB; the writer said: {why})")
        elif "unexpected pos" in why:
            why = (f"a write was cut short: a file-size limit (ulimit -f) or a full disk (the writer said: {why})")
        raise UserError(f"could not write checkpoint {final}: {why}; the previous checkpoint is untouched") from None
    barrier()


def checkpoint_bytes(models: dict, optims: dict) -> int:
    """About the bytes a checkpoint of these models and optimizers takes on disk (this rank's shards)."""
    def nbytes(t):
        return (t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size()

    params = sum(nbytes(p) for m in models.values() for p in m.parameters())
    states = sum(nbytes(v) for o in optims.values() for st in o.state.values() for v in st.values() if torch.is_tensor(v))
    return params + states


def dcp_cause(e) -> str:
    """The last error message inside DCP's per-rank tracebacks (a CheckpointException's text)."""
    causes = re.findall(r"(?:Error|Exception): (.+)", str(e))
    return causes[-1] if causes else str(e)


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = sorted(p for p in (run_dir / "checkpoints").glob("step_*")
                  if re.fullmatch(r"step_\d+", p.name) and (p / "meta.json").is_file())  # never .tmp or .old
    return done[-1] if done else None


def load_checkpoint(path: Path, models: dict, optims: dict, scheds: dict) -> int:
    """Restore models, optimizers, schedulers and this rank's RNG from a checkpoint; returns its step. Nothing is
    read before the manifest checks out, and nothing read can run code (safe_dcp_reader, safetensors, JSON)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    verify_manifest(path)
    state = {}
    for name, model in models.items():
        state[name], state[f"{name}_optim"] = get_state_dict(model, optims[name])
    reader, planner = safe_dcp_reader(path)
    try:
        dcp.load(state, storage_reader=reader, planner=planner)
    except (Exception, dcp.api.CheckpointException) as e:  # (CheckpointException is a BaseException)
        # a damaged file, or metadata that SafeUnpickler refused
        raise UserError(f"{path}: the checkpoint does not load: {dcp_cause(e)}") from None
    for name, model in models.items():
        set_state_dict(model, optims[name], model_state_dict=state[name], optim_state_dict=state[f"{name}_optim"])
    rng = path / f"rng_rank{D.rank}.safetensors"
    if rng.is_file():  # absent when the checkpoint was written by a different number of processes
        load_rng(rng)
    meta = read_meta(path)
    for name, sched in scheds.items():
        sched.load_state_dict(meta["schedulers"][name])
    return meta["step"]


def read_meta(ckpt: Path) -> dict:
    """A checkpoint's meta.json: the step (an int >= 1) and a scheduler state per trained model."""
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
        ok = (isinstance(meta, dict) and isinstance(meta.get("step"), int) and not isinstance(meta["step"], bool)
              and meta["step"] >= 1 and isinstance(meta.get("schedulers"), dict))
        if not ok:
            raise ValueError(f"expected {{'step': an int >= 1, 'schedulers': {{...}}}}, got {str(meta)[:120]}")
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{ckpt / 'meta.json'}: {e}; the checkpoint is damaged") from None
    return meta


def save_rng(path: Path):
    from safetensors.torch import save_file

    save_file({"torch": torch.get_rng_state()}, str(path))


def load_rng(path: Path):
    from safetensors.torch import load_file

    torch.set_rng_state(load_file(str(path))["torch"])


def barrier():
    if D.world > 1:
        dist.barrier()


EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXPORT_SHARD_BYTES = 2 * 1024**3  # an export's safetensors files hold at most this much (transformers' default is 5 GB)


def export_dtype(model: Llama, cfg) -> torch.dtype:
    """The dtype of an export: --export_dtype, or (auto) the dtype of the checkpoint the model was loaded from (bf16
    in, bf16 out), fp32 for a new model. The fp32 master weights are cast once, here."""
    choice = getattr(cfg, "export_dtype", "auto")
    return EXPORT_DTYPES[choice] if choice != "auto" else getattr(model, "source_dtype", torch.float32)


def export_hf(model: Llama, tok: Tokenizer, path: Path, cfg):
    """The trained model as a complete HF checkpoint, written by rank 0: config.json (with this tokenizer's
    bos/eos/pad ids), the weights (sharded with an index above 2 GB), the tokenizer files carried over from the
    input (chat template and special tokens intact), generation_config.json (every stop id) and train_config.json.

    Streamed: tensor by tensor, shard file by shard file, each parameter gathered from its FSDP shards (all ranks
    take part) only when it is written, cast to the export dtype then, and its bytes written at once. No rank holds
    more than one whole tensor (and its cast) beyond its own shards."""
    check_weights("export", {"model": model})
    check_outputs("export", {"model": model})
    dtype, args, sd = export_dtype(model, cfg), model.args, model.state_dict()
    ours = {hf.hf_name(k): k for k in sd if not (k == "output.weight" and args.tie_embeddings)}

    def fetch(name):
        t = sd[ours[name]]
        full = t.full_tensor() if hasattr(t, "full_tensor") else t  # an all-gather on every rank, in plan order
        return full.detach().to(dtype).cpu() if D.main else None

    extra = {**tok.hf_files(), "generation_config.json": tok.generation_config_json(),
             "train_config.json": config_json(cfg)}
    meta = {n: (tuple(sd[k].shape), dtype) for n, k in ours.items()}
    hf.save_streamed(meta, fetch, hf.config_from_args(args), path, EXPORT_SHARD_BYTES, extra, writer=D.main)
    if D.main:
        for name in ("metrics.jsonl", "train_config.json"):  # an --overwrite's records, now that final/ is its own
            if (path.parent / (name + NEXT)).exists():
                os.replace(path.parent / (name + NEXT), path.parent / name)
    barrier()


def config_json(cfg) -> str:
    return json.dumps({"stage": type(cfg).__name__, **asdict(cfg)}, indent=2) + "\n"


# ==========================================================================================================
# Loading models and tokenizers


def open_model(path: str, head: str, cfg, tok: Tokenizer | None = None, frozen: bool = False) -> Llama:
    """A checkpoint as a policy (head="lm") or a reward model / critic (head="score"; a causal LM gets a fresh
    scalar head), sharded and ready on this rank's device. Without a path: a new model from cfg.preset sized to
    the tokenizer.

    Built on the meta device, sharded (FSDP2 when several processes or --bf16), then each rank fills only its own
    shard of each parameter straight from the safetensors files (hf.fill reads just those rows), so no
    rank ever holds a whole model on its host or its GPU, and the values are bitwise those of a full load.
    Trained models are stored in fp32 whatever the checkpoint holds (HF Llama-3 ships bf16): they are the master
    weights AdamW updates (in bf16, 0.02 - 5e-7 == 0.02). Frozen ones (reference, DPO model, reward model) are
    stored in bf16 under --bf16: nothing updates them, and their log-probs are still taken in fp32.
    """
    if not path:  # a new model: small by construction, initialised on the host from the seed
        torch.manual_seed(cfg.seed)
        model = Llama(ModelArgs.preset(cfg.preset, vocab_size=tok.vocab_size, head=head))
        describe_tokenizer(model, tok, path)
        return finish(shard(model, cfg, frozen), frozen)
    dtype = torch.bfloat16 if frozen and getattr(cfg, "bf16", False) else torch.float32
    check_fits(hf.read_config(path), path, dtype)  # before even a meta model is built
    args, sources = hf.plan_load(path, head)
    with torch.device("meta"):
        model = Llama(args)
    old_rows = args.vocab_size  # the checkpoint's rows (describe_tokenizer may grow model.args.vocab_size)
    describe_tokenizer(model, tok, path)  # may grow the vocabulary (a new pad token) on meta: no memory yet
    model = shard(model.to(dtype), cfg, frozen)  # (on meta: only the dtype the shards will be allocated in)
    offload = frozen and getattr(cfg, "offload_frozen", False)
    model.to_empty(device="cpu" if offload else D.device)
    if args.tie_embeddings and not hasattr(model.output.weight, "to_local"):
        model.output.weight = model.tok_embeddings.weight  # to_empty keeps the tie; say it, for the unsharded case
    hf.fill(model, sources, dtype, old_rows)  # each rank reads only its own rows
    model.source_dtype = hf.DTYPES.get(sources["tok_embeddings.weight"].dtype, torch.float32)  # for the export
    return finish(model, frozen)


def available_memory() -> int:
    """Bytes this rank may still allocate where its models live: free GPU memory, else the host's MemAvailable."""
    if D.device.type == "cuda":
        return torch.cuda.mem_get_info(D.device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown (not Linux): no check


def check_fits(args: ModelArgs, path: str, dtype: torch.dtype):
    """A model whose own shard of weights cannot fit this rank's free memory is refused before it is built, naming
    its size (a damaged config.json with num_hidden_layers 1000000 would otherwise allocate for minutes)."""
    n = args.num_params()
    need = n * torch.finfo(dtype).bits // 8 // D.world
    have = available_memory()
    if need > have:
        raise UserError(f"{path}/config.json: {n / 1e9:.2f}B parameters (hidden_size {args.dim}, num_hidden_layers "
                        f"{args.n_layers}, vocab_size {args.vocab_size}) need {need / GIB:.1f} GiB per process in "
                        f"{str(dtype).removeprefix('torch.')}, more than the {have / GIB:.1f} GiB free on {D.device}: "
                        f"is the file damaged? (else use more processes, --bf16 or a smaller model)")


def describe_tokenizer(model: Llama, tok: Tokenizer | None, path: str):
    """Fit the model to the tokenizer it is trained with: one more embedding row per token added here (a new
    pad), and config.json's bos/eos/pad ids (read by HF tools) set to the tokenizer's."""
    if tok is None:
        return
    if tok.added_tokens:  # a new pad token: it needs an embedding row (a spare one, or one more)
        if tok.vocab_size > model.args.vocab_size:
            print0(f"{path}: embedding grown from {model.args.vocab_size} to {tok.vocab_size} rows for "
                   f"{tok.added_tokens}")
            resize_vocab(model, tok.vocab_size)
        model.args.added_tokens = [*model.args.added_tokens, *tok.added_tokens]
    specials = {"bos": tok.bos_id, "pad": tok.pad_id, **{f"stop {i}": i for i in tok.stop_ids}}
    too_big = {k: i for k, i in specials.items() if i is not None and not 0 <= i < model.args.vocab_size}
    if too_big:
        raise UserError(f"{path or 'new model'}: tokenizer ids {too_big} do not fit the model's vocab_size "
                        f"{model.args.vocab_size}: is the tokenizer from another model?")
    model.args.bos_token_id, model.args.pad_token_id = tok.bos_id, tok.pad_id
    model.args.eos_token_id = tok.stop_ids[0] if len(tok.stop_ids) == 1 else list(tok.stop_ids)


def finish(model: Llama, frozen: bool) -> Llama:
    if frozen:
        model.eval()
        model.requires_grad_(False)
    return model


def check_slot(path: str, flag: str, want: str | None, policy: str | None = None):
    """Before any weights are read: the checkpoint at --flag is the right kind (want "lm": a policy, "score": a reward
    model, None: either) and, when policy is given, speaks the policy's vocabulary (same tokens, same ids)."""
    import tokenizers

    from hf import read_json_file

    cfg = read_json_file(Path(path) / "config.json")
    if cfg is None:
        raise UserError(f"--{flag} {path}: no config.json (expected a Hugging Face checkpoint directory)")
    arch = (cfg.get("architectures") or ["?"])[0]
    kind = "score" if arch.endswith("ForSequenceClassification") else "lm"
    if want is not None and kind != want:
        what = {"lm": "a causal LM (a policy)", "score": "a reward model (train.py rm writes one)"}
        raise UserError(f"--{flag} {path} is a {arch}, {what[kind]}; --{flag} takes {what[want]}")
    if policy is not None:
        vocab = {}
        for d in (policy, path):
            try:
                vocab[d] = tokenizers.Tokenizer.from_file(str(Path(d) / "tokenizer.json")).get_vocab(True)
            except Exception as e:
                raise UserError(f"{Path(d) / 'tokenizer.json'}: cannot be read ({e})") from None
        if vocab[policy] != vocab[path]:
            differ = len(set(vocab[policy].items()) ^ set(vocab[path].items()))
            raise UserError(f"--{flag} {path} has another tokenizer than --policy {policy} ({differ} token/id pairs "
                            f"differ): every model of a PPO run must share the policy's vocabulary")


def open_tokenizer(src: str) -> Tokenizer:
    """A checkpoint's tokenizer, with one line on what was read: the format, the stop ids and any choice made."""
    tok = Tokenizer.from_dir(src)
    for note in tok.notes:
        print0(note)
    fmt = "its chat template" if tok.chat else "the plain 'role: text' format (no chat_template)"
    print0(f"{src}: prompts in {fmt}; responses end with {tok.tk.id_to_token(tok.eos_id)!r}; stop ids "
           f"{tok.stop_ids}; pad {tok.pad_id}")
    return tok


# ==========================================================================================================
# The run directory: config, metrics


# While a fresh run replaces a finished one (--overwrite), its records are written beside the finished run's under
# this suffix, and take their place only when its export has replaced final/: a run that fails half-way leaves the
# finished run's final/, metrics.jsonl and train_config.json as they were.
NEXT = ".next"


def record_path(run_dir: Path, name: str, resumed: bool) -> Path:
    """Where a run writes metrics.jsonl / train_config.json: beside a finished final/ that it will replace, under
    NEXT (a resumed run keeps the place its log already has)."""
    nxt = run_dir / (name + NEXT)
    return nxt if (run_dir / "final").is_dir() and (not resumed or nxt.exists()) else run_dir / name


class Logger:
    """One fixed-format line per step (rank 0), every metric also appended to <out>/metrics.jsonl."""

    def __init__(self, run_dir: Path, resume_step: int, keys: list[str]):
        self.run_dir, self.keys, self.resume_step = run_dir, keys, resume_step
        self.path = record_path(run_dir, "metrics.jsonl", resume_step > 0)
        if D.main and resume_step > 0 and self.path.exists():  # rewrite what the killed run logged after its checkpoint
            rows = []
            for n, line in enumerate(self.path.read_text().splitlines(), start=1):
                try:
                    row = json.loads(line) if line.strip() else None
                    if row is not None and not isinstance(row.get("step"), int):
                        raise ValueError("no integer 'step'")
                except (ValueError, AttributeError) as e:
                    raise UserError(f"{self.path}:{n}: not a metrics row ({e}); the log of the run to resume is "
                                    f"damaged: move it away to resume without it") from None
                if row is not None and row["step"] <= resume_step:
                    rows.append(row)
            tmp = self.path.with_suffix(".jsonl.tmp")  # rewritten beside, then renamed: a crash loses nothing
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict):
        if not D.main:
            return
        pending = RUN["config"].pop(self.run_dir, None)
        if pending is not None:  # the run has made a step: now its directory holds a run (see start_run)
            if self.resume_step == 0:
                self.path.unlink(missing_ok=True)  # an earlier run that failed before its export: start over
            record_path(self.run_dir, "train_config.json", self.resume_step > 0).write_text(pending)
        # valid JSON whatever happens: a non-finite metric (explained variance of a constant) is written as null
        row = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **row}, allow_nan=False) + "\n")
        line = f"step {step:5d}" + "".join(f" | {k} {metrics[k]:.4g}" for k in self.keys if k in metrics)
        tqdm.write(line)


class NonFiniteError(UserError):
    """A loss, reward, advantage or gradient norm that is NaN or infinite: the run stops before it is saved."""


def check_finite(step: int, values: dict):
    """Stop the run at the first non-finite quantity, on every rank at once (one all-reduced flag per quantity),
    naming it and the step. Called before the optimizer step, so no checkpoint or export holds the bad state."""
    names = list(values)
    bad = torch.tensor([0.0 if bool(torch.isfinite(torch.as_tensor(values[n])).all()) else 1.0 for n in names],
                       dtype=torch.float64)
    bad = all_sum(bad)
    if bad.any():
        which = [n for n, b in zip(names, bad.tolist()) if b]
        raise NonFiniteError(f"step {step}: {', '.join(which)} not finite (NaN or inf); the run stops here, and no "
                             f"checkpoint or export holds this state (lower the learning rate or the reward scale, "
                             f"or look at the inputs)")


def check_outputs(step, models: dict):
    """Before a checkpoint or an export: one forward pass of each model on a fixed batch (the ids 0..15) must give
    finite logits or scores. Finite weights can still overflow on the way (a learning rate of 1e30 leaves every
    weight finite and every logit inf), and no other check looks at outputs. Called on every rank (FSDP)."""
    flags = {}
    for name, m in models.items():
        ids = (torch.arange(min(16, m.args.max_seq_len), device=D.device) % m.args.vocab_size)[None]
        was_training = m.training
        m.eval()
        with torch.no_grad():
            flags[f"{name} outputs"] = finite_flag(bool(torch.isfinite(m(ids)).all()))
        m.train(was_training)
    check_finite(step, flags)


def check_weights(step, models: dict):
    """Before a checkpoint or an export: every weight finite (a finite gradient times a huge learning rate can still
    overflow a weight). Each rank checks its shards; the flags are all-reduced."""
    check_finite(step, {f"{name} weights": finite_flag(all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local")
                                                                                else p).all()) for p in m.parameters()))
                        for name, m in models.items()})


def finite_flag(ok: bool) -> torch.Tensor:
    """A yes/no check as the value check_finite tests (a bool tensor is always "finite")."""
    return torch.tensor(0.0 if ok else float("nan"))


# ----------------------------------------------------------------------------------------------------------
# Config checks: every field's allowed range, the same meaning on --resume

# Fields that --resume may change: they do not change what the run computes up to where it stopped (out: the run
# directory was moved or copied). max_steps lengthens or shortens the run, and the cosine schedule then follows the
# new length from the resumed step on.
RESUME_MAY_CHANGE = ("resume", "out", "max_steps", "save_every", "progress", "overwrite")


def check_range(cfg):
    """Every field with a declared range (metadata "range", e.g. "(0, 1]") or choices must satisfy it; floats must
    be finite. One error names the field, its value and what is allowed."""
    import dataclasses

    for f in dataclasses.fields(cfg):
        v, spec, choices = getattr(cfg, f.name), f.metadata.get("range"), f.metadata.get("choices")
        if choices is not None and v not in choices:
            raise UserError(f"--{f.name} {v!r}: choose one of {', '.join(map(str, choices))}")
        if spec is None or v is None:  # None: an optional override left unset
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UserError(f"--{f.name} {v!r}: expected a number in {spec}")
        lo, hi = (s.strip() for s in spec[1:-1].split(","))
        ok = math.isfinite(v) or (v == math.inf and spec.endswith("inf]"))  # "inf]": infinity itself allowed
        ok = ok and (v > float(lo) if spec[0] == "(" else v >= float(lo))
        ok = ok and (hi == "inf" or (v < float(hi) if spec[-1] == ")" else v <= float(hi)))
        if not ok:
            raise UserError(f"--{f.name} {v}: must be in {spec}")


def check_resume_config(cfg, ckpt: Path):
    """Refuse --resume when a field that changes the run's meaning differs from the checkpoint's train_config.json."""
    try:
        saved = json.loads((ckpt / "train_config.json").read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"expected a JSON object, got {type(saved).__name__}")
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{ckpt / 'train_config.json'}: {e.__class__.__name__}: {e}; the checkpoint to resume is "
                        f"damaged") from None
    now = json.loads(config_json(cfg))
    changed = sorted(k for k in set(saved) | set(now) if k not in RESUME_MAY_CHANGE and saved.get(k) != now.get(k))
    if changed:
        diff = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
        raise UserError(f"--resume: {ckpt} was written with other settings ({diff}). These change what the run "
                        f"computes: resume with the checkpoint's values, or start over in another --out. "
                        f"--resume may change only {', '.join(RESUME_MAY_CHANGE)}")


# ----------------------------------------------------------------------------------------------------------
# The run directory: one run at a time (run.lock), nothing left behind by a run that never started

LOCK = "run.lock"
# this process's locks, the directories it created, and each run directory's config, written at its first step
RUN = {"locks": [], "created": [], "config": {}}


def take_lock(run_dir: Path):
    """One run per directory. run.lock is held with flock(2) for the whole run, and holds the pid, host and start
    time of the run using it (for the message a second run gets). flock makes taking it atomic: of any number of
    processes that find the same stale lock, exactly one wins, and a lock whose process died is free again (the
    kernel drops the flock with the process). A lock file naming a live process on this host is also respected
    (a run started by an older version of this code holds no flock); one whose process is gone, or that is empty
    or unreadable (a full disk while it was written), is reported and taken over."""
    lock = run_dir / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": proc_start(os.getpid()), "argv": sys.argv}
    for _ in range(5):  # retried only when the file was replaced between our open and our flock
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{run_dir} is in use by {describe_holder(lock)} ({lock}); wait for that run to end or "
                            f"pick another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder released (unlinked) it between our open and our flock: open the new one
            os.close(fd)
            continue
        try:
            other = json.loads(os.pread(fd, 1 << 16, 0) or b"null")
        except ValueError:
            other = None
        if isinstance(other, dict) and other.get("pid") is not None:
            if lock_is_live(other, me):
                os.close(fd)
                raise UserError(f"{run_dir} is in use by {describe_holder(lock)} ({lock}); wait for that run to end "
                                f"or pick another --out (if that process is gone, delete {lock})")
            print0(f"{lock}: left by pid {other['pid']}, which is no longer running; taking it over")
        elif os.fstat(fd).st_size:
            print0(f"{lock}: unreadable, and no process holds it (left by a full disk?); taking it over")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
        except OSError as e:  # a full disk: leave no empty lock behind for later runs to trip over
            os.unlink(lock)
            os.close(fd)
            raise OSError(e.errno, f"could not write {lock}: {e.strerror}") from None
        RUN["locks"].append((lock, fd))
        return
    raise UserError(f"{lock}: could not take the lock (it keeps being replaced)")


def describe_holder(lock: Path) -> str:
    try:
        other = json.loads(lock.read_text())
        return f"pid {int(other['pid'])} on {other['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def lock_is_live(other: dict, me: dict) -> bool:
    """A lock file's process is still running: same host, the pid alive, not this process (which never took this
    lock), and, where recorded, the same start time (in a container pids repeat from run to run)."""
    try:
        pid, host = int(other["pid"]), str(other["host"])
    except (KeyError, TypeError, ValueError):
        return False
    if host != me["host"]:
        return True  # another host's process: we cannot tell, so it is respected
    start = other.get("start")
    return pid_alive(pid) and pid != me["pid"] and (start is None or proc_start(pid) == start)


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None where there is no such file."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def proc_start(pid: int) -> str | None:
    """The start time of a process (/proc/<pid>/stat field 22, clock ticks since boot): with the pid, it tells a
    process from a later one that reuses its pid. None where /proc is not there."""
    fields = proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def pid_alive(pid: int) -> bool:
    """pid is a running process. A zombie is not: it was killed, or has exited, and its parent has not reaped it
    yet (a run killed with its launcher can stay one for as long as the container's init leaves it); its locks
    are already free."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    fields = proc_stat(pid)
    return not (fields and fields[0] == "Z")


def release_locks(ok: bool):
    """At exit: drop this process's locks (unlinked while still held, then closed, so a waiting process never takes
    a lock on a file that is gone), and the directories it created if they are still empty (a run that failed before
    its first step leaves nothing a later --resume could mistake for progress)."""
    for lock, fd in RUN["locks"]:
        lock.unlink(missing_ok=True)
        os.close(fd)
    for d in reversed(RUN["created"]):
        try:
            d.rmdir()  # only if empty
        except OSError:
            pass
    RUN.update(locks=[], created=[], config={})


CHECKPOINT_INPUTS = ("model", "policy", "dpo", "rm", "critic", "tokenizer")  # config fields naming input checkpoints


def take_dir(run_dir: Path):
    """Rank 0 creates run_dir (removed at exit if the run leaves it empty) and takes its lock (see take_lock)."""
    if D.main:
        missing = [p for p in [run_dir, *run_dir.parents] if not p.exists()]
        run_dir.mkdir(parents=True, exist_ok=True)
        RUN["created"] += sorted(missing, key=lambda p: len(p.parts))
        take_lock(run_dir)
    barrier()


def start_run(cfg) -> Path:
    """Check everything that needs no data or weights, then take the run directory: ranges, --out against the input
    checkpoints, --resume against the checkpoint's config, the lock, an export a kill interrupted, a finished final/
    (kept unless --overwrite). train_config.json is written at the first step (Logger.log), so a run that fails
    while loading its data or weights changes nothing on disk."""
    run_dir = Path(cfg.out)
    check_range(cfg)
    for name in CHECKPOINT_INPUTS:
        src = getattr(cfg, name, "")
        if src and (Path(src).resolve() == run_dir.resolve() or run_dir.resolve() in Path(src).resolve().parents):
            raise UserError(f"--out {cfg.out} holds the input --{name} {src}: the run would write into (and at its end "
                            f"replace) its own input; pick another --out")
    old = latest_checkpoint(run_dir)
    if cfg.resume:
        if old is None:
            raise UserError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'} (nothing to resume; "
                            f"drop --resume to start this run)")
        check_resume_config(cfg, old)
    elif old is not None:  # a fresh run would later --resume into, or overwrite, another run's state
        raise UserError(f"{old} holds a resumable checkpoint: pass --resume to continue that run, "
                        f"or remove {run_dir / 'checkpoints'} (or pick another --out) to start over")
    take_dir(run_dir)
    if D.main:
        recover_final(run_dir)  # only under the lock: another run may be mid-export
    barrier()
    if not cfg.resume and (run_dir / "final").exists() and not cfg.overwrite:
        raise UserError(f"{run_dir / 'final'} holds a finished run: pass --overwrite to replace it when this run "
                        f"ends, or pick another --out")
    if D.main:
        RUN["config"][run_dir] = config_json(cfg)
    print0(f"== {type(cfg).__name__} ({D.world} process{'es' if D.world > 1 else ''}, {D.device})\n"
           + config_json(cfg))
    barrier()
    return run_dir


def recover_final(run_dir: Path):
    """A kill during an export (hf.replace_dir: final -> final.old, final.tmp -> final) leaves final.tmp, or
    final.old with no final/. final.tmp is only renamed once complete, so with final.old beside it the swap is
    finished; a lone final.tmp is an export cut short and is removed. Each repair is reported."""
    final, old, tmp = (run_dir / n for n in ("final", "final.old", "final.tmp"))
    if not final.exists() and old.exists():
        if tmp.exists():  # killed between the two renames: final.tmp is the complete new export
            os.replace(tmp, final)
            print0(f"{final}: the export a kill interrupted between its two renames was complete: moved into place")
        else:
            os.replace(old, final)
            print0(f"{final}: restored from final.old (an export a kill interrupted)")
    if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        print0(f"{tmp}: removed (an export that a kill cut short; {final.name}/ is the last complete one)")
    if old.exists() and final.exists():
        shutil.rmtree(old, ignore_errors=True)
        print0(f"{old}: removed (the previous export, already replaced)")


def write_json(path: Path, obj):
    if D.main:
        path.write_text(json.dumps(obj, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------
# The memory plan: what each GPU and each host holds, from the checkpoints' config.json alone


GIB = 1024**3


def param_count(args: ModelArgs) -> int:
    return args.num_params()  # from the shapes: nothing is built


def memory_plan(models: dict, cfg, world: int, prompt_len: int) -> dict:
    """Bytes per GPU for a PPO run, per model and in total, estimated before any weight is read.

    models: name -> (ModelArgs, trained). Trained models (actor, critic) hold sharded fp32 parameters, fp32
    gradients and two fp32 Adam states (16 bytes a parameter / world); frozen ones (reference, DPO model, reward
    model) hold sharded parameters only, bf16 under --bf16 (2 bytes / world), none on the GPU with
    --offload_frozen. On top: the actor's weights gathered whole for generation (in the compute dtype), the KV
    cache of one generation micro-batch, and the activations and fp32 logits of one training micro-batch (an
    estimate: ~34 bytes per token and hidden unit per layer in bf16 without activation checkpointing, after
    Korthikanti et al. 2022, with SDPA storing no attention matrix; 2 per layer plus one layer's worth with it).
    Host memory per rank while loading is bounded by the rows of the largest tensor one rank reads at a time."""
    compute = 2 if cfg.bf16 else 4  # bytes of a compute-dtype value
    T, mb = prompt_len + cfg.max_response_len, cfg.micro_batch_size
    rows = {}
    for name, (args, trained) in models.items():
        n = param_count(args)
        on_gpu = not (not trained and getattr(cfg, "offload_frozen", False))
        per = (16 if trained else (2 if cfg.bf16 else 4)) * n / world
        rows[name] = {"params": n, "bytes": per if on_gpu else 0.0, "host_bytes": 0.0 if on_gpu else per,
                      "kind": "trained: fp32 weights + grads + Adam" if trained else
                              f"frozen: {'bf16' if cfg.bf16 else 'fp32'} weights" + (" (offloaded)" if not on_gpu else "")}
    actor = models["actor"][0]
    gathered_b = param_count(actor) * compute
    kv = mb * T * actor.n_layers * 2 * actor.n_kv_heads * actor.head_dim * compute
    per_layer = (2 + 34) if cfg.activation_checkpointing else 34
    layers = 1 if cfg.activation_checkpointing else actor.n_layers
    act = mb * T * actor.dim * (compute / 2) * (per_layer * layers + (2 * (actor.n_layers - 1)
                                                                      if cfg.activation_checkpointing else 0))
    logits = 2 * mb * T * actor.vocab_size * 4  # the logits and their fp32 log-softmax
    biggest = max(a.vocab_size * a.dim for a, _ in models.values()) * 4 / world  # fp32 rows of the embedding
    total = sum(r["bytes"] for r in rows.values()) + gathered_b + kv + act + logits
    # the streamed export (export_hf): one parameter gathered whole in fp32 at a time on every rank (the largest is
    # the embedding), and on rank 0 its cast to the export dtype too (none for fp32; "auto" counted as bf16)
    tensor = actor.vocab_size * actor.dim * 4
    out = EXPORT_DTYPES.get(getattr(cfg, "export_dtype", "auto"), torch.bfloat16)
    export = tensor + (0 if out == torch.float32 else tensor // 4 * out.itemsize)
    return {"models": rows, "gathered_actor": gathered_b, "kv_cache": kv, "activations": act, "logits": logits,
            "total": total, "host_load_peak": biggest, "world": world, "export_other": tensor,
            "export_rank0": export}


def plan_text(plan: dict) -> str:
    lines = [f"memory plan per GPU ({plan['world']} GPU{'s' if plan['world'] > 1 else ''}):",
             f"  {'model':8s} {'params':>10s} {'GiB/GPU':>8s}  what"]
    for name, r in plan["models"].items():
        lines.append(f"  {name:8s} {r['params'] / 1e9:9.2f}B {r['bytes'] / GIB:8.2f}  {r['kind']}")
    for key, what in (("gathered_actor", "the actor gathered whole for generation"),
                      ("kv_cache", "KV cache of one generation micro-batch"),
                      ("activations", "activations of one training micro-batch (estimate)"),
                      ("logits", "fp32 logits + log-softmax of one micro-batch")):
        lines.append(f"  {key:19s} {plan[key] / GIB:8.2f}  {what}")
    lines.append(f"  {'total':19s} {plan['total'] / GIB:8.2f}")
    lines.append(f"  host memory per rank while loading: about one tensor's shard at a time, "
                 f"{plan['host_load_peak'] / GIB:.2f} GiB at most, beyond torch itself")
    lines.append(f"  while exporting, beyond the shards: one whole fp32 tensor at a time per rank "
                 f"({plan['export_other'] / GIB:.2f} GiB at most; on the GPU under CUDA), and on rank 0 its cast "
                 f"to the export dtype in host memory ({plan['export_rank0'] / GIB:.2f} GiB with it)")
    return "\n".join(lines)


def measured_memory() -> str:
    """Peak resident memory of this process (and the GPU's peak allocation), to print beside the plan."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    text = f"measured peak: host RSS {rss / GIB:.2f} GiB"
    if torch.cuda.is_available() and D.device.type == "cuda":
        text += f", GPU allocated {torch.cuda.max_memory_allocated(D.device) / GIB:.2f} GiB"
    return text
