"""Models to and from disk: a Hugging Face checkpoint opened as a sharded model (each rank reads only its own rows),
the trained model exported as a complete HF checkpoint (streamed, tensor by tensor), and resumable checkpoints
(torch.distributed.checkpoint, sharded, verified against a manifest and read without running any pickle code).

    model = open_model("path/to/Llama-3.2-1B", "lm", cfg, tok)            # meta -> FSDP2 -> this rank's rows
    export_hf(model, tok, run_dir / "final", cfg)                          # config, weights, tokenizer files
    save_checkpoint(run_dir, step, models, optims, scheds, cfg)            # <out>/checkpoints/step_N
"""
from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

import hf
from checks import UserError, check_export_range, check_outputs, check_regular, check_weights
from config import config_json
from hf import Tokenizer
from memory import check_fits
from model import Llama, ModelArgs, resize_vocab
from parallel import D, barrier, print0, shard


# ==========================================================================================================
# Opening a checkpoint


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


def describe_tokenizer(model: Llama, tok: Tokenizer | None, path: str):
    """Fit the model to the tokenizer it is trained with: one more embedding row per token added here (a new
    pad), and config.json's bos/eos/pad ids (read by HF tools) set to the tokenizer's."""
    if tok is None:
        return
    own = tok.vocab_size - len(tok.added_tokens)  # the ids the checkpoint's tokenizer.json itself can produce
    if own > model.args.vocab_size:
        raise UserError(f"{path or 'the tokenizer'}/tokenizer.json makes ids up to {own - 1}, but {path or 'the new model'}"
                        f"{'/config.json' if path else ''} has vocab_size {model.args.vocab_size}: this tokenizer is "
                        f"not the model's (or the model was cut): use the model's own tokenizer files")
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
# The export: a complete Hugging Face checkpoint, streamed


EXPORT_SHARD_BYTES = 2 * 1024**3  # an export's safetensors files hold at most this much (transformers' default is 5 GB)


def export_dtype(model: Llama, cfg) -> torch.dtype:
    """The dtype of an export: --export_dtype, or (auto) the dtype of the checkpoint the model was loaded from (bf16
    in, bf16 out), fp32 for a new model. The fp32 master weights are cast once, here."""
    choice = getattr(cfg, "export_dtype", "auto")
    return hf.EXPORT_DTYPES[choice] if choice != "auto" else getattr(model, "source_dtype", torch.float32)


def export_hf(model: Llama, tok: Tokenizer, path: Path, cfg, extra_files: dict | None = None):
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
    check_export_range({name: sd[k] for name, k in ours.items()}, dtype)

    def fetch(name):
        t = sd[ours[name]]
        full = t.full_tensor() if hasattr(t, "full_tensor") else t  # an all-gather on every rank, in plan order
        return full.detach().to(dtype).cpu() if D.main else None

    extra = {**tok.hf_files(), "generation_config.json": tok.generation_config_json(),
             "train_config.json": config_json(cfg), **(extra_files or {})}
    meta = {n: (tuple(sd[k].shape), dtype) for n, k in ours.items()}
    hf.save_streamed(meta, fetch, hf.config_from_args(args), path, EXPORT_SHARD_BYTES, extra, writer=D.main)
    barrier()


# ==========================================================================================================
# Resumable checkpoints. torch.distributed.checkpoint (sharded, loadable at any world size) written to step_N.tmp
# and renamed only when every rank has finished: a kill mid-save leaves the previous one intact.


MANIFEST = "manifest.json"  # sha256 of every file of a checkpoint, written last, inside the atomic rename


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_files(ckpt: Path) -> list[str]:
    files = [p for p in ckpt.rglob("*") if not (p.is_dir() and not p.is_symlink())]
    return sorted(str(p.relative_to(ckpt)) for p in files if check_regular(p, "a checkpoint's file") and
                  p.name != MANIFEST)


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
        check_regular(path, "a checkpoint's manifest")
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
        check_regular(ckpt / "meta.json", "a checkpoint's meta.json")
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
