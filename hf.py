"""The Hugging Face format boundary: config.json <-> ModelArgs, safetensors in (sharded, sliced) and out, the
tokenizer files (special tokens, stop ids, chat templates), read the way transformers reads them.

    import hf
    model = hf.load("path/to/Llama-3.2-1B")          # config.json + *.safetensors (never pickle), strict
    hf.save(model, "out/ckpt")                        # config.json + model.safetensors, written atomically
    tok = hf.Tokenizer.from_dir("path/to/Llama-3.2-1B")

model.py is the network alone; everything here is about files. Every stage loads through the same code:
`plan_load` checks a checkpoint against its config.json from the safetensors headers alone, and `fill` copies each
parameter's rows (only this rank's shard under FSDP2) straight from the files (checkpoint.open_model, and `load`
below for a plain single-process model).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import signal
import struct
import sys
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import tokenizers
import torch

from data import DataError
from model import Llama, ModelArgs

# ----------------------------------------------------------------------------------------------------------
# config.json <-> ModelArgs, written out so nothing is renamed by magic

# model_type -> our head -> the HF architecture. Mistral without a sliding window is Llama under another name.
HF_ARCHITECTURES = {
    "llama": {"lm": "LlamaForCausalLM", "score": "LlamaForSequenceClassification"},
    "mistral": {"lm": "MistralForCausalLM", "score": "MistralForSequenceClassification"},
}
# rope_scaling types: "llama3" (Llama-3.1's long-context rescaling), "linear" (position interpolation), none
ROPE_TYPES = ("default", "linear", "llama3")

# Our parameter name -> the Hugging Face name ("{}" is the layer index). Loading is strict against this map.
HF_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "score.weight": "score.weight",
    # attention_bias / mlp_bias checkpoints only
    "layers.{}.attention.wq.bias": "model.layers.{}.self_attn.q_proj.bias",
    "layers.{}.attention.wk.bias": "model.layers.{}.self_attn.k_proj.bias",
    "layers.{}.attention.wv.bias": "model.layers.{}.self_attn.v_proj.bias",
    "layers.{}.attention.wo.bias": "model.layers.{}.self_attn.o_proj.bias",
    "layers.{}.feed_forward.w1.bias": "model.layers.{}.mlp.gate_proj.bias",
    "layers.{}.feed_forward.w2.bias": "model.layers.{}.mlp.down_proj.bias",
    "layers.{}.feed_forward.w3.bias": "model.layers.{}.mlp.up_proj.bias",
}


def hf_name(name: str) -> str:
    """Our state-dict key -> the HF key, e.g. 'layers.3.attention.wq.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    parts = name.split(".")
    if parts[0] == "layers":
        return HF_NAMES[".".join(["layers", "{}"] + parts[2:])].format(parts[1])
    return HF_NAMES[name]


# No real checkpoint comes near these; a config.json beyond them is damaged or hostile (checked before anything is
# allocated: a meta model of a million layers takes minutes to build).
MAX_POSITIONS = 1 << 26  # max_position_embeddings (the longest context of a released Llama-family model is ~10M)


def _int(cfg: dict, path: str, key: str, default=None, minimum: int = 1, nullable: bool = False):
    """An integer field >= minimum. Absent gives default (a required field has none); null is refused unless
    nullable (transformers reads a null num_key_value_heads or head_dim as "derive it")."""
    if key not in cfg and default is None:
        raise ValueError(f"{path}: missing field '{key}'")
    v = cfg.get(key)
    if key not in cfg or (v is None and nullable):
        return default
    if v is None:
        raise ValueError(f"{path}: field '{key}' is null; expected a positive integer")
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ValueError(f"{path}: field '{key}' is {v!r}; expected a positive integer"
                         if minimum == 1 else f"{path}: field '{key}' is {v!r}; expected an integer >= {minimum}")
    return v


def _positive(cfg: dict, path: str, key: str, default: float) -> float:
    """A finite positive number (rope_theta, rms_norm_eps: infinity gives a model that ignores positions, or a
    constant one)."""
    v = cfg.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{path}: field '{key}' is {v!r}; expected a finite positive number")
    return v


def _flag(cfg: dict, path: str, key: str) -> bool:
    v = cfg.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ValueError(f"{path}: field '{key}' is {v!r}; expected true or false")
    return v


def _optional_number(cfg: dict, path: str, key: str):
    v = cfg.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
        raise ValueError(f"{path}: field '{key}' is {v!r}; expected a finite number or null")
    return v


def _token_ids(cfg: dict, path: str, key: str, vocab: int):
    """bos/eos/pad_token_id: null, an id, or (eos) a list of ids, each inside the vocabulary."""
    v = cfg.get(key)
    for i in (v if isinstance(v, list) else [v]):
        if i is not None and (not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab):
            raise ValueError(f"{path}: field '{key}' is {v!r}; expected token ids in [0, {vocab}) (vocab_size)")
    return v


def args_from_config(cfg: dict, path: str = "config.json") -> ModelArgs:
    """config.json (a dict) -> ModelArgs, every field the network reads checked for type and range before anything
    is allocated; errors name the file and field."""
    model_type = cfg.get("model_type", "llama")
    if not isinstance(model_type, str) or model_type not in HF_ARCHITECTURES:
        raise ValueError(f"{path}: field 'model_type' is {model_type!r}; accepted: {sorted(HF_ARCHITECTURES)} "
                         f"(Llama-family decoders; Qwen2, Gemma, MoE and others compute something else)")
    archs = cfg.get("architectures") or [HF_ARCHITECTURES[model_type]["lm"]]
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ValueError(f"{path}: field 'architectures' is {archs!r}; expected a list of class names")
    arch = archs[0]
    if arch not in HF_ARCHITECTURES[model_type].values():
        raise ValueError(f"{path}: field 'architectures' is {arch!r}; accepted for {model_type}: "
                         f"{sorted(HF_ARCHITECTURES[model_type].values())}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: field 'hidden_act' is {cfg['hidden_act']!r}; this implementation supports 'silu'")
    dim, n_layers, n_heads, vocab, hidden = (_int(cfg, path, k) for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"))
    n_kv_heads = _int(cfg, path, "num_key_value_heads", n_heads, nullable=True)
    head_dim = _int(cfg, path, "head_dim", 0, minimum=0, nullable=True)
    max_pos = _int(cfg, path, "max_position_embeddings", 2048)
    if max_pos > MAX_POSITIONS:
        raise ValueError(f"{path}: field 'max_position_embeddings' is {max_pos}, beyond any real model's context "
                         f"({MAX_POSITIONS}); is the file damaged?")
    norm_eps, theta = _positive(cfg, path, "rms_norm_eps", 1e-5), _positive(cfg, path, "rope_theta", 10000.0)
    window = cfg.get("sliding_window")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool)):
        raise ValueError(f"{path}: field 'sliding_window' is {window!r}; expected an integer or null")
    if window is not None and window < max_pos:
        raise ValueError(f"{path}: field 'sliding_window' is {window}, shorter than max_position_embeddings "
                         f"{max_pos}; sliding-window attention is not implemented. Full attention equals it on "
                         f"sequences of at most {window} tokens: set max_position_embeddings to {window} in a "
                         f"copy of the checkpoint to use it that way")
    # transformers >= 5 writes one "rope_parameters" dict instead of rope_theta + rope_scaling
    for key in ("rope_parameters", "rope_scaling"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise ValueError(f"{path}: field '{key}' is {cfg[key]!r}; expected an object or null")
    rope = dict(cfg.get("rope_parameters") or {})
    rope_theta = _positive(rope, f"{path} (rope_parameters)", "rope_theta", theta)
    rope.pop("rope_theta", None)
    rope_scaling = (rope or None) if "rope_parameters" in cfg else cfg.get("rope_scaling")
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if rope_scaling is not None and key in rope_scaling:
            _positive(rope_scaling, f"{path} (rope_scaling)", key, 1.0)
    for key in ("rto_added_tokens",):
        if cfg.get(key) is not None and not (isinstance(cfg[key], list) and all(isinstance(t, str) for t in cfg[key])):
            raise ValueError(f"{path}: field '{key}' is {cfg[key]!r}; expected a list of token strings")
    ids = {key: _token_ids(cfg, path, key, vocab) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    try:
        args = ModelArgs(
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            vocab_size=vocab,
            hidden_dim=hidden,
            norm_eps=norm_eps,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_seq_len=max_pos,
            tie_embeddings=_flag(cfg, path, "tie_word_embeddings"),
            attention_bias=_flag(cfg, path, "attention_bias"),
            mlp_bias=_flag(cfg, path, "mlp_bias"),
            model_type=model_type,
            sliding_window=window,
            head="score" if arch == HF_ARCHITECTURES[model_type]["score"] else "lm",
            bos_token_id=ids["bos_token_id"],
            eos_token_id=ids["eos_token_id"],
            pad_token_id=ids["pad_token_id"],
            added_tokens=list(cfg.get("rto_added_tokens") or []),
            score_mean=_optional_number(cfg, path, "rto_score_mean"),
            score_std=_optional_number(cfg, path, "rto_score_std"),
            loss_type=cfg.get("rto_loss_type") if isinstance(cfg.get("rto_loss_type"), str) else None,
            implicit_reward=cfg.get("rto_implicit_reward") if isinstance(cfg.get("rto_implicit_reward"), bool) else None,
        )
    except ValueError as e:  # heads that do not divide, a tied score head: ModelArgs' own checks, with the file
        raise ValueError(f"{path}: {e}") from None
    if args.head == "score" and cfg.get("num_labels", len(cfg.get("id2label", {0: 0}))) != 1:
        raise ValueError(f"{path}: a reward model must have num_labels 1")
    if args.rope_scaling is not None:
        kind = args.rope_scaling.get("rope_type", args.rope_scaling.get("type"))
        if kind not in ROPE_TYPES:
            raise ValueError(f"{path}: field 'rope_scaling' has rope_type {kind!r}; supported: {ROPE_TYPES} "
                             f"('dynamic' NTK scaling changes the frequencies with the sequence length, "
                             f"which a KV cache cannot follow exactly)")
    return args


def config_from_args(args: ModelArgs) -> dict:
    """ModelArgs -> config.json as transformers writes it (LlamaForCausalLM / ...ForSequenceClassification)."""
    cfg = {
        "architectures": [HF_ARCHITECTURES[args.model_type][args.head]],
        "model_type": args.model_type,
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "intermediate_size": args.hidden_dim,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": args.rope_scaling,
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": args.attention_bias,
        "mlp_bias": args.mlp_bias,
        "bos_token_id": args.bos_token_id,
        "eos_token_id": args.eos_token_id,
        "pad_token_id": args.pad_token_id,
    }
    if args.added_tokens:  # the embedding grew for these (train.load_model): the checkpoint says so
        cfg["rto_added_tokens"] = list(args.added_tokens)
    if args.model_type == "mistral":
        cfg["sliding_window"] = args.sliding_window
        del cfg["attention_bias"], cfg["mlp_bias"]  # Mistral has neither (always False, checked at load)
    if args.head == "score":
        cfg["num_labels"] = 1
        cfg["rto_score_mean"], cfg["rto_score_std"] = args.score_mean, args.score_std
    if args.loss_type is not None:  # what a DPO-stage export was trained with (checks.check_implicit_reward reads it)
        cfg["rto_loss_type"], cfg["rto_implicit_reward"] = args.loss_type, args.implicit_reward
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Safetensors: strict plans from the headers, sliced reads, atomic sharded writes


@dataclass
class Source:
    """Where one of our parameters comes from: tensor `key` of safetensors `file`, or (key None) the new score
    head of a reward model started from a causal LM, drawn from a fixed seed in `dtype`."""
    file: Path | None
    key: str | None
    shape: tuple
    dtype: str  # the checkpoint's dtype name, e.g. "BF16"


def read_config(path) -> ModelArgs:
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: not found (expected a Hugging Face checkpoint directory)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON: {e.__class__.__name__}: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object")
    return args_from_config(cfg, str(cfg_path))


def plan_load(path, head: str | None = None) -> tuple[ModelArgs, dict[str, Source]]:
    """The model's args and, for each of our parameters (tied output excluded), where its values are: checked
    strictly against config.json (missing, unexpected, mis-shaped tensors) from the safetensors headers alone,
    before any tensor data is read."""
    path = Path(path)
    args = read_config(path)
    headers = safetensors_headers(path)
    new_score = head is not None and head != args.head
    if new_score:
        if head != "score":
            raise ValueError(f"{path}: a reward-model checkpoint cannot be loaded as a language model")
        headers.pop("lm_head.weight", None)
        args = ModelArgs(**{**asdict(args), "head": "score", "tie_embeddings": False})
    with torch.device("meta"):
        model = Llama(args)
    expected = {hf_name(n): (n, tuple(p.shape)) for n, p in model.named_parameters()}
    if new_score:
        headers["score.weight"] = (None, (1, args.dim), headers["model.norm.weight"][2])
    missing = sorted(set(expected) - set(headers))
    unexpected = sorted(set(headers) - set(expected))
    if missing or unexpected:
        raise KeyError(f"{path}: checkpoint does not match config.json: missing tensors {missing[:8]}"
                       f"{' ...' if len(missing) > 8 else ''}, unexpected tensors {unexpected[:8]}"
                       f"{' ...' if len(unexpected) > 8 else ''}")
    sources = {}
    for key, (ours, shape) in expected.items():
        file, got, dt = headers[key]
        if tuple(got) != shape:
            raise ValueError(f"{path}: tensor '{key}' has shape {tuple(got)}, config.json implies {shape}")
        sources[ours] = Source(file, key if file is not None else None, shape, dt)
    return args, sources


DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --export_dtype


def read_source(src: Source, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Rows [start, end) of a parameter (all of it with rows None), read straight from its file: safetensors slices
    read only those bytes, so a rank that owns one shard never holds the whole tensor. Non-finite values are an
    error that names the tensor."""
    start, end = rows or (0, src.shape[0])
    if src.key is None:  # the new score head: small, so the first scores are near 0; the same on every rank
        g = torch.Generator().manual_seed(0)
        full = (torch.randn(*src.shape, generator=g) / math.sqrt(src.shape[1] + 1)).to(DTYPES.get(src.dtype))
        return full[start:end]
    from safetensors import safe_open

    with safe_open(str(src.file), framework="pt") as f:
        t = f.get_slice(src.key)[start:end]
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{src.file.parent}: tensor '{src.key}' holds NaN or infinite values; refusing a damaged "
                         f"checkpoint")
    return t


def safetensors_headers(path: Path) -> dict[str, tuple[Path, tuple, str]]:
    """hf key -> (file, shape, dtype) for model.safetensors, or the shards named by model.safetensors.index.json;
    only the headers are read. A truncated or foreign file names itself instead of a bare SafetensorError."""
    from safetensors import safe_open

    def header(f):
        try:
            with safe_open(str(f), framework="pt") as h:
                return {k: (f, tuple(h.get_slice(k).get_shape()), h.get_slice(k).get_dtype()) for k in h.keys()}
        except Exception as e:
            raise ValueError(f"{f}: not a readable safetensors file ({e})") from None

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid index ({e.__class__.__name__}: {e})") from None
        out = {}
        for shard in sorted(set(weight_map.values())):
            part = header(path / shard)
            stray = sorted(set(part) - {k for k, v in weight_map.items() if v == shard})
            if stray:
                raise KeyError(f"{path / shard}: tensors {stray[:8]} are not listed for this shard in {index}")
            out.update(part)
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise KeyError(f"{index}: lists tensors {missing[:8]} that no shard contains")
        return out
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")
    return header(single)


def save_hf_checkpoint(sd: dict, config: dict, path, max_shard_bytes: int, extra_files: dict | None = None):
    """Write an HF checkpoint into path.tmp, then swap it into place (replace_dir): a failure leaves path as it was."""
    meta = {n: (tuple(t.shape), t.dtype) for n, t in sd.items()}
    save_streamed(meta, lambda n: sd[n], config, path, max_shard_bytes, extra_files)


def save_streamed(meta: dict, fetch, config: dict, path, max_shard_bytes: int, extra_files: dict | None = None,
                  writer: bool = True):
    """save_hf_checkpoint from HF name -> (shape, dtype) and fetch(name) -> the tensor, one tensor at a time
    (checkpoint.export_hf gathers each parameter only when it is written). Called on every rank; only the writer
    touches the disk."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if not writer:
        return _write_streamed(meta, fetch, config, tmp, max_shard_bytes, extra_files, writer=False)
    try:
        _write_streamed(meta, fetch, config, tmp, max_shard_bytes, extra_files)
    except BaseException as e:  # a full disk, a file-size limit, a read-only directory: `path` is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, OSError):
            raise
        raise OSError(e.errno, f"could not write {path}: {e.strerror or e} ({e.filename or tmp}); "
                               f"anything already at {path} is untouched") from None
    replace_dir(tmp, path)


CHECKSUMS = "checksums.json"  # an export's weight files and their sha256, written with them


def shard_plan(meta: dict, max_shard_bytes: int) -> list[list[str]]:
    """HF names in sorted order, cut into shards of at most max_shard_bytes (a larger tensor gets one of its own),
    from shapes and dtypes alone: every rank of a streamed export computes the same plan."""
    shards, size = [[]], 0
    for name in sorted(meta):
        shape, dtype = meta[name]
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_streamed(meta: dict, fetch, config: dict, tmp: Path, max_shard_bytes: int, extra_files: dict | None,
                    writer: bool = True):
    """Write shard file by shard file, tensor by tensor: fetch(name) returns each tensor in turn (on the writer; None
    elsewhere: under FSDP every rank takes part in each gather, in the same order), and its bytes go to disk at
    once, so no process holds more than one tensor beyond its own shards."""
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    shards = shard_plan(meta, max_shard_bytes)
    dtype = str(next(iter(meta.values()))[1]).removeprefix("torch.")
    names = ["model.safetensors"] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                           for i in range(len(shards))]
    digests = {}
    for fname, shard in zip(names, shards):
        part = {n: meta[n] for n in shard}
        if writer:
            digests[fname] = write_safetensors(tmp / fname, part, fetch)
        else:
            for n in safetensors_order(part):
                fetch(n)
    if not writer:
        return
    (tmp / CHECKSUMS).write_text(json.dumps(digests, indent=2) + "\n")  # what --reuse checks the weights against
    (tmp / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}, indent=2) + "\n")
    if len(shards) > 1:
        total = sum(math.prod(shape) * dt.itemsize for shape, dt in meta.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {n: fname for fname, shard in zip(names, shards) for n in shard}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")


# The safetensors file format, written here one tensor at a time (safetensors' own save_file takes every tensor of a
# file at once): an 8-byte little-endian header length, the header as compact JSON padded with spaces to a multiple
# of 8 bytes, then each tensor's bytes, C order, little-endian, back to back. Tensors are laid out in safetensors'
# dtype order (F64, F32, BF16, F16: its Dtype enum, descending) then by name, and "__metadata__" comes first:
# save_file's bytes, exactly (tested).
ST_DTYPE_ORDER = ("F64", "F32", "BF16", "F16")  # the dtypes written here, in save_file's layout order
ST_NAMES = {v: k for k, v in DTYPES.items()}


def safetensors_order(meta: dict) -> list[str]:
    """The order save_file lays out tensors {name: (shape, dtype)} in: by dtype, then by name."""
    return sorted(meta, key=lambda n: (ST_DTYPE_ORDER.index(ST_NAMES[meta[n][1]]), n))


def safetensors_header(meta: dict) -> bytes:
    entries, offset = {"__metadata__": {"format": "pt"}}, 0
    for n in safetensors_order(meta):
        shape, dtype = meta[n]
        size = math.prod(shape) * dtype.itemsize
        entries[n] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: Path, meta: dict, fetch) -> str:
    """A safetensors file of the tensors {name: (shape, dtype)}: the header from shapes and dtypes alone, then each
    tensor's bytes as fetch(name) returns it, so only one tensor is in memory at a time. Returns the file's sha256."""
    if sys.byteorder != "little":
        raise NotImplementedError(f"{path}: writing safetensors on a big-endian machine is not supported")
    other = sorted({str(dt) for _, dt in meta.values() if dt not in ST_NAMES})
    if other:
        raise ValueError(f"{path}: cannot write {', '.join(other)} tensors; exports hold fp32, bf16, fp16 or fp64")
    header = safetensors_header(meta)
    digest = hashlib.sha256(header)
    try:
        with open(path, "wb") as f:
            f.write(header)
            for n in safetensors_order(meta):
                t = fetch(n).detach()
                if (tuple(t.shape), t.dtype) != (tuple(meta[n][0]), meta[n][1]):
                    raise ValueError(f"{path}: tensor '{n}' is {t.dtype} {tuple(t.shape)}, its header says "
                                     f"{meta[n][1]} {tuple(meta[n][0])}")
                data = t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(data)
                digest.update(data)
                del t, data
    except OSError as e:  # a write's error carries no file name: give it this one
        raise OSError(e.errno, e.strerror, str(path)) from None
    return digest.hexdigest()


def replace_dir(tmp: Path, path: Path):
    """Swap a fully written directory into place; until the final rename the old one stays intact."""
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def shard_rows(p) -> tuple[int, int]:
    """The rows [start, end) of parameter p this rank holds: FSDP2 shards dim 0 like torch.chunk (equal chunks of
    ceil(n / world) rows, the last ranks' shorter or empty); an unsharded parameter: all of them."""
    n = p.shape[0]
    if not hasattr(p, "to_local"):
        return 0, n
    mesh = p.device_mesh
    size, rank = mesh.size(), mesh.get_local_rank()
    chunk = -(-n // size)
    start, end = min(rank * chunk, n), min((rank + 1) * chunk, n)
    assert p.to_local().shape[0] == end - start, (p.to_local().shape, start, end)  # FSDP2's layout, as assumed
    return start, end


def mean_row(src, rows: int, block: int = 8192) -> torch.Tensor:
    """The mean of a parameter's first `rows` rows, read in blocks (float64 sums, as model.resize_vocab)."""
    total = sum(read_source(src, (i, min(i + block, rows))).double().sum(0) for i in range(0, rows, block))
    return (total / rows).float()[None]


def fill(model: Llama, sources: dict[str, Source], dtype: torch.dtype, old_rows: int):
    """Copy every parameter's values from its source into `model` (already materialised, on any device, sharded or
    not): each rank reads only the rows it holds. Embedding rows past `old_rows` (tokens added to the vocabulary,
    a new pad) are the mean of the checkpoint's rows (model.resize_vocab)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p.data
            start, end = shard_rows(p)
            src = sources[name]
            have = min(end, old_rows) if name in ("tok_embeddings.weight", "output.weight") else end
            if start < have:
                local[:have - start].copy_(read_source(src, (start, have)).to(dtype))
            if end > have:
                local[max(0, have - start):].copy_(mean_row(src, old_rows).to(dtype).expand(end - max(have, start), -1))


def load(path, device="cpu", dtype: torch.dtype | None = None, head: str | None = None) -> Llama:
    """A checkpoint as one unsharded model on `device` (tests, benchmarks, the fixture scripts): the same strict
    plan and fill as every stage's checkpoint.open_model. dtype None keeps the checkpoint's. head="score" on a
    causal-LM checkpoint keeps the backbone and starts a new scalar head."""
    args, sources = plan_load(path, head)
    dtype = dtype or DTYPES[sources["tok_embeddings.weight"].dtype]
    with torch.device("meta"):
        model = Llama(args)
    model.to(dtype).to_empty(device=device)
    if args.tie_embeddings:  # to_empty keeps the tie; say it
        model.output.weight = model.tok_embeddings.weight
    fill(model, sources, dtype, args.vocab_size)
    return model


def state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """The model's tensors under their HF names (a tied output is stored once, as the embedding)."""
    return hf_state_dict(model.state_dict(), model.args)


def hf_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    return {hf_name(k): v for k, v in sd.items() if not (k == "output.weight" and args.tie_embeddings)}


def save(model: Llama, path, max_shard_bytes: int = 2 * 1024**3, extra_files: dict[str, str] | None = None):
    """Write an HF-format checkpoint atomically: into a temporary sibling directory, then renamed."""
    save_hf_checkpoint(state_dict(model), config_from_args(model.args), path, max_shard_bytes, extra_files)


# -----------------------------------------------------------------------------
# Tokenizer: the checkpoint's special tokens, stop ids and chat template, read the way transformers reads them

SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
# Only for a bare tokenizer.json with no tokenizer_config.json: the special tokens are then guessed by name, among
# the tokenizer's added *special* tokens only (many vocabularies also hold "<s>" or "</s>" as ordinary text).
FALLBACK_NAMES = {
    "bos_token": ["<|begin_of_text|>", "<|bos|>", "<s>", "<bos>"],
    "eos_token": ["<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end_of_text|>", "<|eos|>", "</s>", "<eos>",
                  "<|endoftext|>"],
    "pad_token": ["<|finetune_right_pad_id|>", "<|pad|>", "<pad>"],
    "unk_token": ["<unk>", "<|unk|>", "[UNK]"],
}
# A chat template runs on every data row: these bound a hostile or broken one, far above what any real template
# needs (the seven real layouts in tests/fixtures/chat render a conversation in under 1 ms and a few KB).
TEMPLATE_SECONDS = 5.0  # wall time per conversation (a SIGALRM timer; only in the main thread)
TEMPLATE_MAX_CHARS = 10_000_000  # characters written per conversation
NEW_PAD = "<|pad|>"  # added (and the embedding grown by one row) only when the tokenizer has no usable pad at all
# Stands in for an assistant message when probing a chat template for what closes an assistant turn.
SENTINEL = "RTO_SENTINEL_7c1f"


@contextmanager
def time_limit(seconds: float, message: str):
    """Raise DataError(message) if the body runs longer than `seconds` (wall time, SIGALRM). Off the main thread
    signals cannot interrupt, and the body runs unlimited."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum, frame):
        raise DataError(message)

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def read_json_file(path: Path) -> dict | None:
    """A JSON object from path, or None when the file does not exist; a malformed file names itself."""
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # (nesting deeper than Python's stack)
        raise DataError(f"{path}: not valid JSON: {e.__class__.__name__ if isinstance(e, RecursionError) else e}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _token_content(value, where: str) -> str | None:
    """A special-token field of tokenizer_config.json: a string, an AddedToken dict {"content": ...}, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise DataError(f"{where}: expected a token string or an object with 'content', got {value!r}")


def _id_list(value, where: str) -> list[int]:
    """eos_token_id of generation_config.json / config.json: an int, a list of ints (Llama-3.1), or null."""
    if value is None:
        return []
    vals = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in vals):
        raise DataError(f"{where}: expected a token id (an int >= 0) or a list of them, got {value!r}")
    return vals


def compile_chat_template(source: str, where: str):
    """A chat template compiled the way transformers' apply_chat_template compiles it: a sandboxed jinja2
    environment (a template is data from a checkpoint: it must not reach Python objects or files), trim_blocks and
    lstrip_blocks, loop controls, the helpers templates call (raise_exception, strftime_now, a tojson that does
    not escape HTML) and the {% generation %} block some templates mark the assistant's text with."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Generation(jinja2.ext.Extension):  # renders its body unchanged (transformers uses it to find masks)
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except (RecursionError, MemoryError) as e:  # a template nested deeper than jinja2's parser can follow
        raise DataError(f"{where}: chat_template cannot be compiled ({e.__class__.__name__}: nested too deeply?)") \
            from None
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"{where}: chat_template line {e.lineno}: {e.message}") from None


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what its checkpoint says about it: the special tokens, the ids that end a
    response, and the chat template (without one, a plain "role: text" format).

    - bos_id: tokenizer_config.json's bos_token (None for checkpoints without one, e.g. ChatML models).
    - eos_id: the token a training response ends with, and so the one the policy learns to emit and the reward
      model reads its score at: the end-of-turn token the chat template closes an assistant turn with
      (<|eot_id|>, <|im_end|>, <end_of_turn>, </s>), or eos_token without a template.
    - stop_ids: every id that ends a sampled response: eos_id, eos_token and generation_config.json's
      eos_token_id (a list for Llama-3.1-Instruct).
    - pad_id: only ever fills; where a row ends comes from its mask, never from the pad id. It is still never a stop
      id, because Hugging Face's sequence classifier reads its score at the last token that is not pad: a reward
      model exported with pad == eos would be read one token early by every tool that loads it.
    notes lists what was chosen and why (train.py prints them at load).
    """

    def __init__(self, tk: tokenizers.Tokenizer, config: dict | None = None, generation_config: dict | None = None,
                 chat_template: str | None = None, source: str = "tokenizer", template_file: bool = False):
        self.tk, self.source = tk, source
        self.config = dict(config) if config is not None else None  # tokenizer_config.json as read
        self.generation_config = dict(generation_config or {})
        self.template_file = template_file  # the template came from chat_template.jinja (written back there)
        self.template_where = "chat_template.jinja" if template_file else "tokenizer_config.json chat_template"
        self.notes: list[str] = []
        self.added_tokens: list[str] = []  # tokens this class added to the vocabulary (the embedding must grow)
        added = {t.content: i for i, t in tk.get_added_tokens_decoder().items() if t.special}
        if config is None:
            self.tokens = {k: next((n for n in names if n in added), None) for k, names in FALLBACK_NAMES.items()}
            self.notes.append(f"{source}: no tokenizer_config.json, special tokens chosen by name: "
                              + ", ".join(f"{k} {v!r}" for k, v in self.tokens.items()))
        else:
            self.tokens = {k: _token_content(config.get(k), f"{source}: tokenizer_config.json field '{k}'")
                           for k in SPECIAL_KEYS}
            for key, kind in (("added_tokens_decoder", dict), ("additional_special_tokens", list)):
                if config.get(key) is not None and not isinstance(config[key], kind):
                    raise DataError(f"{source}/tokenizer_config.json: field '{key}' is {str(config[key])[:60]}; "
                                    f"expected a {'JSON object' if kind is dict else 'list of tokens'}")
        ids = {}
        for key, text in self.tokens.items():
            if text is not None:
                ids[key] = tk.token_to_id(text)
                if ids[key] is None:
                    raise DataError(f"{source}: tokenizer_config.json field '{key}' is {text!r}, "
                                    f"which tokenizer.json does not hold")
        if "eos_token" not in ids:
            raise DataError(f"{source}: no EOS token: tokenizer_config.json has no 'eos_token'"
                            + (" (and no added special token is named like one)" if config is None else ""))
        self.bos_id, self.eos_id = ids.get("bos_token"), ids["eos_token"]
        stops = {self.eos_id, *_id_list(self.generation_config.get("eos_token_id"),
                                        f"{source}: generation_config.json field 'eos_token_id'")}
        self.chat_template = chat_template
        self._template = compile_chat_template(chat_template, source) if chat_template else None
        self._turn_tail = ""  # what the template writes after an assistant message's text
        if self._template is not None:
            eot = self._end_of_turn()
            if eot is not None and eot != self.eos_id:
                self.notes.append(f"{source}: the chat template ends an assistant turn with "
                                  f"{tk.id_to_token(eot)!r} (id {eot}): responses end there, and it stops sampling")
                self.eos_id = eot
            stops.add(self.eos_id)
        self.stop_ids = sorted(stops)
        self.pad_id = self._choose_pad(ids.get("pad_token"), ids.get("unk_token"), added)
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)

    @property
    def chat(self) -> bool:
        return self._template is not None

    def _choose_pad(self, declared, unk, added) -> int:
        stops = set(self.stop_ids)
        if declared is not None and declared not in stops:
            return declared
        why = ("declares no pad_token" if declared is None else
               f"declares pad_token {self.tokens['pad_token']!r}, which also ends responses")
        # an added special token named like a pad (<|finetune_right_pad_id|>, <pad>, <｜▁pad▁｜>), else a reserved one
        named = sorted(i for t, i in added.items() if "pad" in t.lower() and i not in stops)
        reserved = sorted(i for t, i in added.items() if "reserved" in t and i not in stops)
        if named or reserved:
            pad = (named or reserved)[0]
        elif unk is not None and unk not in stops:
            pad = unk
        else:
            self.tk.add_special_tokens([tokenizers.AddedToken(NEW_PAD, special=True, normalized=False)])
            pad = self.tk.token_to_id(NEW_PAD)
            self.added_tokens.append(NEW_PAD)
        self.tokens["pad_token"] = self.tk.id_to_token(pad)
        self.notes.append(f"{self.source}: the tokenizer {why}; padding with {self.tokens['pad_token']!r} (id {pad})"
                          + (", a new token" if self.added_tokens else "") + "; exports declare it as pad_token")
        return pad

    @classmethod
    def from_dir(cls, d) -> "Tokenizer":
        """Read a checkpoint directory the way transformers' AutoTokenizer + GenerationConfig do:
        tokenizer.json; special tokens from tokenizer_config.json (special_tokens_map.json overrides them when
        tokenizer_config.json lists no added_tokens_decoder, transformers' legacy rule); the chat template from
        chat_template.jinja, else tokenizer_config.json's chat_template (a list of named templates: "default");
        stop ids from generation_config.json, else config.json's eos_token_id."""
        d = Path(d)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer file (expected a HF tokenizers 'tokenizer.json')")
        try:
            tk = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust parser's message says what is wrong
            raise DataError(f"{path}: not a tokenizers file: {e}") from None
        config = read_json_file(d / "tokenizer_config.json")
        smap = read_json_file(d / "special_tokens_map.json")
        if smap is not None and (config is None or "added_tokens_decoder" not in config):
            config = {**(config or {}), **{k: v for k, v in smap.items() if k in SPECIAL_KEYS}}
        template, template_file = None, (d / "chat_template.jinja").is_file()
        if template_file:
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        elif config is not None and config.get("chat_template"):
            template = config["chat_template"]
            if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                if "default" not in named:
                    raise DataError(f"{d / 'tokenizer_config.json'}: field 'chat_template' lists templates "
                                    f"{sorted(named)} but none named 'default'")
                template = named["default"]
            if not isinstance(template, str):
                raise DataError(f"{d / 'tokenizer_config.json'}: field 'chat_template' is not a string")
        gen = read_json_file(d / "generation_config.json")
        if gen is None:  # transformers builds the generation config from the model's config.json
            model_cfg = read_json_file(d / "config.json") or {}
            gen = {k: model_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in model_cfg}
        return cls(tk, config, gen, template, source=str(d), template_file=template_file)

    def hf_files(self) -> dict[str, str]:
        """What AutoTokenizer reads: tokenizer.json, tokenizer_config.json (the input's, chat template and special
        tokens intact, pad_token set to the one used here), special_tokens_map.json, and chat_template.jinja when
        the input kept the template there."""
        cfg = dict(self.config) if self.config is not None else {
            "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        for key, text in self.tokens.items():
            if text is not None and _token_content(cfg.get(key), key) != text:
                cfg[key] = text
        if self.added_tokens and "added_tokens_decoder" in cfg:
            cfg["added_tokens_decoder"] = {**cfg["added_tokens_decoder"], **{
                str(self.tk.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                              "single_word": False, "special": True} for t in self.added_tokens}}
        files = {"tokenizer.json": self.tk.to_str()}
        if self.template_file:
            files["chat_template.jinja"] = self.chat_template
        elif self.chat_template is not None and not isinstance(cfg.get("chat_template"), list):
            cfg["chat_template"] = self.chat_template  # (a list of named templates is carried over whole)
        files["tokenizer_config.json"] = json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"
        files["special_tokens_map.json"] = json.dumps({k: v for k, v in self.tokens.items() if v is not None},
                                                      indent=2, ensure_ascii=False) + "\n"
        return files

    def generation_config_json(self) -> str:
        """generation_config.json: the input's (sampling defaults kept) with this tokenizer's ids; eos_token_id
        lists every stop id, so transformers' and vLLM's generate stop where ours does."""
        ids = {"bos_token_id": self.bos_id, "pad_token_id": self.pad_id,
               "eos_token_id": self.stop_ids[0] if len(self.stop_ids) == 1 else self.stop_ids}
        return json.dumps({**self.generation_config, **ids}, indent=2) + "\n"

    def save(self, d):
        Path(d).mkdir(parents=True, exist_ok=True)
        for name, text in self.hf_files().items():
            (Path(d) / name).write_text(text, encoding="utf-8")

    def encode(self, text: str) -> list[int]:
        """Text -> ids, special tokens in the text recognised as themselves, no BOS/EOS added (as transformers'
        apply_chat_template tokenizes: add_special_tokens=False skips the post-processor)."""
        with self.rust_errors():
            return self.tk.encode(text, add_special_tokens=False).ids

    @contextmanager
    def rust_errors(self):
        """A failure inside the tokenizers library (a pre-tokenizer's regex that backtracks past its limit panics in
        Rust, a BaseException) as one DataError naming the tokenizer file."""
        try:
            yield
        except BaseException as e:
            if type(e).__name__ != "PanicException":
                raise
            raise DataError(f"{self.source}/tokenizer.json: the tokenizer failed on this text ({str(e)[:120]}): its "
                            f"normalizer or pre-tokenizer cannot handle it") from None

    def decode(self, ids, skip_special=True) -> str:
        return self.tk.decode(ids if isinstance(ids, list) else [int(i) for i in ids], skip_special_tokens=skip_special)

    @functools.cached_property
    def blank_ids(self) -> frozenset:
        """The ids that are special tokens or decode to whitespace alone: a response of only these is empty."""
        return frozenset(i for i in range(self.tk.get_vocab_size(True)) if not self.decode([i]).strip())

    def render(self, messages, add_generation_prompt: bool) -> str:
        """The chat template applied to messages, with the context transformers gives it (bos_token, eos_token,
        ... as strings; tools and documents None). A template is data from a checkpoint: it renders under a time
        limit and a size limit (TEMPLATE_SECONDS, TEMPLATE_MAX_CHARS), and anything that goes wrong inside it is
        one DataError that names the template's file (encode_rows adds the data line)."""
        import jinja2

        ctx = {k: v for k, v in self.tokens.items() if v is not None}
        extra = (self.config or {}).get("additional_special_tokens")
        if extra:
            if not isinstance(extra, list):
                raise DataError(f"{self.source}/tokenizer_config.json: field 'additional_special_tokens' is "
                                f"{extra!r}; expected a list of tokens")
            ctx["additional_special_tokens"] = [_token_content(t, f"{self.source}/tokenizer_config.json field "
                                                                  f"'additional_special_tokens'") for t in extra]
        where = f"the chat template of {self.source} ({self.template_where})"
        out, size = [], 0
        try:
            with time_limit(TEMPLATE_SECONDS, f"{where} ran for more than {TEMPLATE_SECONDS} s on this conversation "
                                              f"(a loop that never ends?)"):
                for piece in self._template.generate(messages=messages, tools=None, documents=None,
                                                     add_generation_prompt=add_generation_prompt, **ctx):
                    size += len(piece)
                    if size > TEMPLATE_MAX_CHARS:
                        raise DataError(f"{where} wrote more than {TEMPLATE_MAX_CHARS} characters for one "
                                        f"conversation (a loop that never ends?)")
                    out.append(piece)
        except DataError:
            raise
        except jinja2.TemplateError as e:  # raise_exception(...), the sandbox's limits, an {% include %}
            raise DataError(f"{where} refused this conversation: {e.__class__.__name__ + ': ' if not str(e) else ''}"
                            f"{e or e.__class__.__name__}") from None
        except Exception as e:  # the template's own bugs: recursion, a division by zero, a bad operand...
            raise DataError(f"{where} failed on this conversation: {e.__class__.__name__}: {e}") from None
        return "".join(out)

    def _end_of_turn(self) -> int | None:
        """The special token the template closes an assistant turn with: render a probe conversation, tokenize
        what follows the assistant's text, return its first special token (None when there is none)."""
        text = self.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": SENTINEL}], False)
        if SENTINEL not in text:
            raise DataError(f"{self.source}: the chat template does not show an assistant message's text")
        self._turn_tail = text[text.index(SENTINEL) + len(SENTINEL):]
        special = {i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}
        return next((i for i in self.encode(self._turn_tail) if i in special), None)

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """encode() of many texts at once, on the tokenizer's own threads."""
        with self.rust_errors():
            return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def prompt_text(self, messages) -> str:
        """What a prompt is as text: the chat template's rendering with the generation cue, or the plain "role: text"
        lines ending in "assistant:"."""
        if self.chat:
            return self.render(messages, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def prompt_ids(self, text_ids: list[int]) -> list[int]:
        """A prompt's ids from its text's: the plain format starts with BOS (a template writes its own)."""
        return text_ids if self.chat or self.bos_id is None else [self.bos_id] + text_ids

    def encode_prompt(self, messages, max_len: int) -> list[int]:
        """Messages -> ids ending with the generation cue (the template's, or "assistant:"), at most max_len of them
        (fit_prompt)."""
        return self.fit_prompt(messages, self.prompt_ids(self.encode(self.prompt_text(messages))), max_len)[0]

    def fit_prompt(self, messages, ids: list[int], max_len: int) -> tuple[list[int], int]:
        """(ids of the prompt, tokens cut). A prompt longer than max_len loses the middle of its longest message that
        is not a system turn, and is rendered again, so the template's header, the system turn, the message's start
        and end and the generation cue all survive; one that does not fit even with that message empty is an error."""
        over = len(ids) - max_len
        if over <= 0:
            return ids, 0
        turns = [k for k, m in enumerate(messages) if m["role"] != "system"]
        if not turns:
            raise DataError(f"the prompt is {len(ids)} tokens, more than max_prompt_len {max_len}, and holds only "
                            f"system turns, which are never cut: raise --max_prompt_len")
        k = max(turns, key=lambda t: len(messages[t]["content"]))
        content = messages[k]["content"]
        chars_per_token = len(content) / max(1, len(self.encode(content)))  # to estimate how much to cut
        cut, shorter = 0, ids
        while len(shorter) > max_len:
            if cut == len(content):
                raise DataError(f"the prompt is {len(ids)} tokens: with its longest message emptied it is still "
                                f"{len(shorter)}, more than max_prompt_len {max_len} (the template and the other turns "
                                f"take the rest): raise --max_prompt_len")
            cut = min(len(content), cut + max(1, math.ceil((len(shorter) - max_len) * chars_per_token)))
            keep = len(content) - cut
            short = content[:(keep + 1) // 2] + content[len(content) - keep // 2:] if keep else ""
            msgs = [*messages[:k], {**messages[k], "content": short}, *messages[k + 1:]]
            shorter = self.prompt_ids(self.encode(self.prompt_text(msgs)))
        return shorter, len(ids) - len(shorter)

    def response_texts(self, messages, text: str, prompt: str | None = None) -> list[str]:
        """The texts whose ids make the response to `messages` (response_ids): with a chat template the prompt and the
        whole conversation, or (a template that renders a finished turn differently) the answer and the turn's close;
        in the plain format the answer after one space. prompt: prompt_text(messages), when the caller has it."""
        if not self.chat:  # the prompt ends in "assistant:", the answer follows after one space
            return [" " + text]
        prompt = prompt if prompt is not None else self.render(messages, add_generation_prompt=True)
        full = self.render(list(messages) + [{"role": "assistant", "content": text}], add_generation_prompt=False)
        # The template renders a finished assistant turn differently from a generation prompt followed by the answer
        # (DeepSeek-R1's prompt ends in "<think>\n", a finished turn drops the reasoning): train on what sampling
        # sees, the answer after the prompt, closed the way the template closes a turn.
        return [prompt, full] if full.startswith(prompt) else [text + self._turn_tail]

    def response_ids(self, text: str, texts: list[str], ids: list[list[int]], max_len: int) -> list[int]:
        """The response's ids from the ids of its response_texts, ending with its first stop id (or eos_id added),
        keeping the FIRST max_len ids. A response cut this way has no EOS: a truncated demonstration teaches no stop,
        and overwriting its last id with EOS would teach a stop the data never made.

        With a chat template the response is what the template writes after the generation prompt (the conversation
        rendered with the answer, minus the prompt rendered with add_generation_prompt, as ids), so prompt + response
        is exactly the ids transformers gives the whole conversation; it ends at its first stop id (the "\n" a
        template writes after <|im_end|> belongs to the next turn's layout)."""
        assert max_len >= 1
        if len(texts) == 2:
            p_ids, f_ids = ids
            # a merge across the boundary would make the prompt's ids no prefix: then tokenize the rest on its own
            body = f_ids[len(p_ids):] if f_ids[:len(p_ids)] == p_ids else self.encode(texts[1][len(texts[0]):])
        else:
            body = ids[0]
        ends = [body.index(s) for s in (self.stop_ids if self.chat else []) if s in body]
        end = min(ends) if ends else None
        if all(i in self.blank_ids for i in body[:end]) and not self.decode(body[:end]).strip():
            raise DataError(f"the response {text[:60]!r} holds no text once tokenized (only special tokens"
                            + (" before its end of turn" if self.chat else "") + "): an empty answer, which is refused "
                            "like an empty string")
        body = body[:end + 1] if end is not None else body + [self.eos_id]
        return body[:max_len]

    def encode_response(self, messages, text: str, max_len: int) -> list[int]:
        """The response to `messages` -> ids (response_texts, then response_ids)."""
        texts = self.response_texts(messages, text)
        return self.response_ids(text, texts, self.encode_many(texts), max_len)

    def special_texts(self) -> list[str]:
        """The texts the tokenizer reads as special tokens wherever they appear ("<|eot_id|>", "</s>", ...)."""
        return sorted(t.content for t in self.tk.get_added_tokens_decoder().values() if t.special and t.content)
