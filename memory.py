"""What a run holds in memory: the plan per GPU from the checkpoints' config.json alone (printed before a PPO run,
`train.py ppo --plan`), the check that a model's shard fits the free memory before it is built, and the measured
peak printed at the end.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from checks import UserError
import hf
from hf import EXPORT_DTYPES
import model
from model import ModelArgs
from parallel import D

GIB = 1024**3


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




def memory_plan(models: dict, cfg, world: int, prompt_len: int) -> dict:
    """Bytes per GPU for a PPO run, per model and in total, estimated before any weight is read.

    models: name -> (ModelArgs, trained). Trained models (actor, critic) hold sharded fp32 parameters, fp32
    gradients and two fp32 Adam states (16 bytes a parameter / world); frozen ones (reference, DPO model, reward
    model) hold sharded parameters only, bf16 under --bf16 (2 bytes / world), none on the GPU with
    --offload_frozen. On top: the actor's weights gathered whole for generation (in the compute dtype, when it is
    sharded: parallel.decode_view), the KV
    cache of one generation micro-batch, and the activations and fp32 logits of one training micro-batch (an
    estimate: ~34 bytes per token and hidden unit per layer in bf16 without activation checkpointing, after
    Korthikanti et al. 2022, with SDPA storing no attention matrix; 2 per layer plus one layer's worth with it) and what
    attention keeps beside them (attention_bytes).
    Host memory per rank while loading is bounded by the rows of the largest tensor one rank reads at a time."""
    compute = 2 if cfg.bf16 else 4  # bytes of a compute-dtype value
    T, mb = prompt_len + cfg.max_response_len, cfg.micro_batch_size
    rows = {}
    for name, (args, trained) in models.items():
        n = args.num_params()
        on_gpu = not (not trained and getattr(cfg, "offload_frozen", False))
        per = (16 if trained else (2 if cfg.bf16 else 4)) * n / world
        rows[name] = {"params": n, "bytes": per if on_gpu else 0.0, "host_bytes": 0.0 if on_gpu else per,
                      "kind": "trained: fp32 weights + grads + Adam" if trained else
                              f"frozen: {'bf16' if cfg.bf16 else 'fp32'} weights" + (" (offloaded)" if not on_gpu else "")}
    actor = models["actor"][0]
    gathered_b = actor.num_params() * compute if world > 1 or cfg.bf16 else 0  # parallel.decode_view's copy, if any
    kv = mb * T * actor.n_layers * 2 * actor.n_kv_heads * actor.head_dim * compute
    per_layer = (2 + 34) if cfg.activation_checkpointing else 34
    layers = 1 if cfg.activation_checkpointing else actor.n_layers
    act = mb * T * actor.dim * (compute / 2) * (per_layer * layers + (2 * (actor.n_layers - 1)
                                                                      if cfg.activation_checkpointing else 0))
    logits = 2 * mb * T * actor.vocab_size * 4  # the logits and their fp32 log-softmax
    attention = attention_bytes(actor, mb, T, compute) * layers
    biggest = max(a.vocab_size * a.dim for a, _ in models.values()) * 4 / world  # fp32 rows of the embedding
    total = sum(r["bytes"] for r in rows.values()) + gathered_b + kv + act + logits + attention
    # the streamed export (export_hf): one parameter gathered whole in fp32 at a time on every rank (the largest is
    # the embedding), and on rank 0 its cast to the export dtype too (none for fp32; "auto" counted as bf16)
    tensor = actor.vocab_size * actor.dim * 4
    out = EXPORT_DTYPES.get(getattr(cfg, "export_dtype", "auto"), torch.bfloat16)
    export = tensor + (0 if out == torch.float32 else tensor // 4 * out.itemsize)
    return {"models": rows, "gathered_actor": gathered_b, "kv_cache": kv, "activations": act, "logits": logits,
            "attention": attention, "total": total, "host_load_peak": biggest, "world": world, "export_other": tensor,
            "export_rank0": export}


def attention_bytes(args: ModelArgs, micro: int, T: int, width: int) -> int:
    """What one layer's attention keeps for its backward beyond its inputs, as model.ATTENTION runs it: the fused
    kernels' fp32 log-sum-exp (micro, heads, T), and with "repeat_kv" the key and value heads repeated to every query
    head (the kernel saves its own inputs)."""
    lse = micro * args.n_heads * T * 4
    if model.ATTENTION["masked_gqa"] != "repeat_kv":
        return lse
    return lse + 2 * micro * T * (args.n_heads - args.n_kv_heads) * args.head_dim * width


def checkpoint_plan(slots: dict, cfg, world: int) -> dict:
    """memory_plan of a PPO run from its checkpoints' config.json alone; slots: role -> (path, trained, head), as
    train.ppo_slots gives them (a causal LM loaded as a critic gets a score head, never tied)."""
    models = {}
    for role, (path, trained, head) in slots.items():
        args = hf.read_config(path)
        models[role] = (dataclasses.replace(args, head=head, tie_embeddings=args.tie_embeddings and head == "lm"),
                        trained)
    return memory_plan(models, cfg, world, cfg.max_prompt_len)


def plan_text(plan: dict) -> str:
    lines = [f"memory plan per GPU ({plan['world']} GPU{'s' if plan['world'] > 1 else ''}):",
             f"  {'model':8s} {'params':>10s} {'GiB/GPU':>8s}  what"]
    for name, r in plan["models"].items():
        lines.append(f"  {name:8s} {r['params'] / 1e9:9.2f}B {r['bytes'] / GIB:8.2f}  {r['kind']}")
    for key, what in (("gathered_actor", "the actor gathered whole for generation"),
                      ("kv_cache", "KV cache of one generation micro-batch"),
                      ("activations", "activations of one training micro-batch (estimate)"),
                      ("logits", "fp32 logits + log-softmax of one micro-batch"),
                      ("attention", f"what attention keeps for backward ({model.ATTENTION['masked_gqa']} GQA)")):
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


def reference_cost(args: ModelArgs, cfg) -> str:
    """What a reference kept loaded while training costs (TDPO needs its whole distribution at every token): frozen
    weights per rank, and one micro-batch of its logits at a time."""
    width = 2 if cfg.bf16 else 4
    logits = 2 * cfg.micro_batch_size * (cfg.max_prompt_len + cfg.max_response_len) * args.vocab_size * width
    return (f"{cfg.loss_type}: the reference stays loaded, {args.num_params() * width / D.world / GIB:.2f} GiB of "
            f"frozen weights per rank, plus one micro-batch of its logits at a time ({logits / GIB:.2f} GiB)")
