"""A Llama 2/3 decoder in plain PyTorch, Hugging Face-format checkpoints in and out, and fast batched sampling.

    python model.py                      # build the tiny preset, sample a few tokens, print shapes
    from model import Llama
    model = Llama.from_pretrained("path/to/Llama-3.2-1B")   # config.json + *.safetensors, no pickle

One Block class (RMSNorm -> grouped-query attention with rotary embeddings -> RMSNorm -> SwiGLU MLP), biases
only where a checkpoint's config asks for them (attention_bias, mlp_bias), no dropout (RLHF needs the ratio
pi/pi_old to be exactly 1 on the first PPO minibatch). The same class is the policy (`head="lm"`, logits over the
vocabulary) and the reward model / critic (`head="score"`, one scalar per token; saved as a
LlamaForSequenceClassification checkpoint). Accepted checkpoints: model_type "llama" (Llama 2/3.x, TinyLlama,
SmolLM2, DeepSeek-R1-Distill-Llama, ...) and "mistral" without a sliding window shorter than the context.

Batches are left-padded prompts (then right-padded responses): position ids are cumsum(mask) - 1, so a
padded row gives the same logits as the same row unpadded.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass
class ModelArgs:
    dim: int = 4096  # hidden size (HF hidden_size)
    n_layers: int = 32  # transformer blocks (HF num_hidden_layers)
    n_heads: int = 32  # query heads
    n_kv_heads: int = 8  # key/value heads; < n_heads is grouped-query attention
    head_dim: int = 0  # per-head size; 0: dim // n_heads (HF head_dim, explicit in e.g. Mistral-Nemo)
    vocab_size: int = 128256
    hidden_dim: int = 14336  # SwiGLU inner size (HF intermediate_size)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 500000.0  # rotary base
    rope_scaling: dict | None = None  # Llama-3.1/3.2 {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    max_seq_len: int = 8192  # HF max_position_embeddings: generate() refuses to go past it
    tie_embeddings: bool = False  # output projection shares the input embedding matrix
    attention_bias: bool = False  # biases on q/k/v/o projections (HF attention_bias)
    mlp_bias: bool = False  # biases on the SwiGLU gate/up/down projections (HF mlp_bias)
    model_type: str = "llama"  # "llama" | "mistral": the same network here; written back into config.json
    sliding_window: int | None = None  # Mistral only, carried into config.json; never below max_seq_len (checked)
    head: str = "lm"  # "lm": next-token logits; "score": one scalar per token (reward model, critic)
    bos_token_id: int | None = None  # carried into config.json for the tools that read it
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    added_tokens: list = field(default_factory=list)  # tokens this project added to the vocabulary (a new pad)
    score_mean: float | None = None  # reward model only: score mean/std on held-out data, for PPO's normalisation
    score_std: float | None = None

    def __post_init__(self):
        if not self.head_dim:
            if self.dim % self.n_heads:
                raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head not in ("lm", "score"):
            raise ValueError(f"head must be 'lm' or 'score', got {self.head!r}")
        if self.head == "score" and self.tie_embeddings:
            raise ValueError("a score head cannot be tied to the embeddings")

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # HF config.json <-> ModelArgs, written out so nothing is renamed by magic.
    @classmethod
    def from_hf_config(cls, cfg: dict, path: str = "config.json") -> "ModelArgs":
        model_type = cfg.get("model_type", "llama")
        if model_type not in HF_ARCHITECTURES:
            raise ValueError(f"{path}: field 'model_type' is {model_type!r}; accepted: {sorted(HF_ARCHITECTURES)} "
                             f"(Llama-family decoders; Qwen2, Gemma, MoE and others compute something else)")
        arch = (cfg.get("architectures") or [HF_ARCHITECTURES[model_type]["lm"]])[0]
        if arch not in HF_ARCHITECTURES[model_type].values():
            raise ValueError(f"{path}: field 'architectures' is {arch!r}; accepted for {model_type}: "
                             f"{sorted(HF_ARCHITECTURES[model_type].values())}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{path}: field 'hidden_act' is {cfg['hidden_act']!r}; this implementation supports 'silu'")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
            if key not in cfg:
                raise ValueError(f"{path}: missing field '{key}'")
            if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] <= 0:
                raise ValueError(f"{path}: field '{key}' is {cfg[key]!r}; expected a positive integer")
        for key in ("rms_norm_eps", "rope_theta"):
            v = cfg.get(key, 1.0)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
                raise ValueError(f"{path}: field '{key}' is {v!r}; expected a positive number")
        window, max_pos = cfg.get("sliding_window"), cfg.get("max_position_embeddings", 2048)
        if window is not None and window < max_pos:
            raise ValueError(f"{path}: field 'sliding_window' is {window}, shorter than max_position_embeddings "
                             f"{max_pos}; sliding-window attention is not implemented. Full attention equals it on "
                             f"sequences of at most {window} tokens: set max_position_embeddings to {window} in a "
                             f"copy of the checkpoint to use it that way")
        # transformers >= 5 writes one "rope_parameters" dict instead of rope_theta + rope_scaling
        rope = dict(cfg.get("rope_parameters") or {})
        rope_theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_scaling = (rope or None) if "rope_parameters" in cfg else cfg.get("rope_scaling")
        args = cls(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim") or 0,
            vocab_size=cfg["vocab_size"],
            hidden_dim=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_seq_len=max_pos,
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            model_type=model_type,
            sliding_window=window,
            head="score" if arch == HF_ARCHITECTURES[model_type]["score"] else "lm",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            added_tokens=list(cfg.get("rto_added_tokens") or []),
            score_mean=cfg.get("rto_score_mean"),
            score_std=cfg.get("rto_score_std"),
        )
        if args.head == "score" and cfg.get("num_labels", len(cfg.get("id2label", {0: 0}))) != 1:
            raise ValueError(f"{path}: a reward model must have num_labels 1")
        if args.rope_scaling is not None:
            kind = args.rope_scaling.get("rope_type", args.rope_scaling.get("type"))
            if kind not in ROPE_TYPES:
                raise ValueError(f"{path}: field 'rope_scaling' has rope_type {kind!r}; supported: {ROPE_TYPES} "
                                 f"('dynamic' NTK scaling changes the frequencies with the sequence length, "
                                 f"which a KV cache cannot follow exactly)")
        return args

    def to_hf_config(self) -> dict:
        cfg = {
            "architectures": [HF_ARCHITECTURES[self.model_type][self.head]],
            "model_type": self.model_type,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "intermediate_size": self.hidden_dim,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.added_tokens:  # the embedding grew for these (train.load_model): the checkpoint says so
            cfg["rto_added_tokens"] = list(self.added_tokens)
        if self.model_type == "mistral":
            cfg["sliding_window"] = self.sliding_window
            del cfg["attention_bias"], cfg["mlp_bias"]  # Mistral has neither (always False, checked at load)
        if self.head == "score":
            cfg["num_labels"] = 1
            cfg["rto_score_mean"], cfg["rto_score_std"] = self.score_mean, self.score_std
        return cfg


# model_type -> our head -> the HF architecture. Mistral without a sliding window is Llama under another name.
HF_ARCHITECTURES = {
    "llama": {"lm": "LlamaForCausalLM", "score": "LlamaForSequenceClassification"},
    "mistral": {"lm": "MistralForCausalLM", "score": "MistralForSequenceClassification"},
}
# rope_scaling types: "llama3" (Llama-3.1's long-context rescaling), "linear" (position interpolation), none
ROPE_TYPES = ("default", "linear", "llama3")

PRESETS = {
    # a few-hundred-KB model for unit tests and CPU demos
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=176, rope_theta=10000.0,
                 max_seq_len=512),
    # ~0.8M parameters: a step up from tiny for the built-in task (--preset small), still minutes on a CPU
    "small": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=344, rope_theta=10000.0,
                  max_seq_len=512),
    # the ~12M-parameter config bench.py compares against the HF implementation
    "bench12m": dict(dim=384, n_layers=6, n_heads=6, n_kv_heads=2, vocab_size=4096, hidden_dim=1024,
                     rope_theta=10000.0, max_seq_len=1024),
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=8192,
                        rope_theta=500000.0, max_seq_len=131072, tie_embeddings=True,
                        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=14336,
                      rope_theta=500000.0, max_seq_len=8192),
}

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


# ----------------------------------------------------------------------------------------------------------
# Rotary embeddings (real-valued cos/sin, HF's rotate-half layout so HF checkpoints load without permuting)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """(head_dim/2,) inverse frequencies, with the Llama-3.1 "llama3" long-context rescaling when configured."""
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    sc = args.rope_scaling
    kind = None if sc is None else sc.get("rope_type", sc.get("type"))
    if kind in (None, "default"):
        return inv_freq.float()
    if kind == "linear":  # position interpolation: every position divided by factor, i.e. every frequency
        return (inv_freq / sc["factor"]).float()
    # Llama 3.1 (Meta's reference `apply_scaling`): low frequencies are divided by `factor`, high ones kept,
    # the band in between interpolated smoothly in wavelength.
    factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old_len = sc["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled).float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """positions (B, T) -> cos, sin (B, 1, T, head_dim), computed in fp32 then cast."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ----------------------------------------------------------------------------------------------------------
# The network


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 (as HF and Meta do), scale in the input dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        bias = args.attention_bias
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=bias)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, start=0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # write this step's keys/values into the preallocated cache, attend over all so far
            k_cache, v_cache = cache.layer(layer, k)
            k_cache[:, :, start:start + T] = k
            v_cache[:, :, start:start + T] = v
            k, v = k_cache[:, :, :start + T], v_cache[:, :, :start + T]
        # GQA without materialising repeated K/V: SDPA broadcasts each KV head over its group of query heads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)  # gate
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=args.mlp_bias)  # down
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, start=0):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, layer, start)
        return x + self.feed_forward(self.ffn_norm(x))


class KVCache:
    """Preallocated keys/values for `max_len` positions, plus which cached positions are real tokens.

    `length` columns are filled; `n_real[b]` counts row b's real tokens so far (= the next position id).
    A layer's buffers are allocated at its first write, in the dtype its keys arrive in (under a
    mixed-precision policy that is the compute dtype, not the stored parameters' dtype).
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, device):
        self.shape = (batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.kv = [None] * args.n_layers
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.n_real = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0

    def layer(self, i: int, like: torch.Tensor):
        if self.kv[i] is None:
            self.kv[i] = (like.new_zeros(self.shape), like.new_zeros(self.shape))
        return self.kv[i]


class Llama(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        if args.head == "lm":
            self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
            if args.tie_embeddings:
                self.output.weight = self.tok_embeddings.weight
        else:
            self.score = nn.Linear(args.dim, 1, bias=False)
        self.grad_checkpointing = False  # recompute each block in backward (train.py's --activation_checkpointing)
        self._inv_freq = {}  # device -> rotary inverse frequencies (not a buffer: survives meta init and FSDP)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.device.type != "meta":
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def inv_freq(self, device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = rope_inv_freq(self.args).to(device)
        return self._inv_freq[device]

    def forward(self, input_ids, attention_mask=None, *, cache: KVCache | None = None, return_hidden=False,
                last_only=False):
        """input_ids (B, T), attention_mask (B, T) with 1 on real tokens (left padding for prompts).

        Returns logits (B, T, vocab) for head="lm", values (B, T) for head="score"; with return_hidden, also
        the final-norm hidden states (B, T, dim). With a cache, the T tokens are appended after the cached ones.
        last_only: apply the head to the last column only (sampling needs no logits for the prompt's positions).
        """
        B, T = input_ids.shape
        device = input_ids.device
        real = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        start = 0 if cache is None else cache.length
        # position = number of real tokens before this one: padded rows see the same positions as unpadded ones
        positions = (real.cumsum(-1) - 1).clamp(min=0)
        if cache is not None:
            positions = positions + cache.n_real[:, None]
            cache.key_mask[:, start:start + T] = real
            cache.n_real += real.sum(-1)
            cache.length += T
        mask = None  # plain causal attention when nothing is padded and nothing is cached
        if cache is not None or attention_mask is not None:
            keys_real = real if cache is None else cache.key_mask[:, :start + T]
            q_pos = torch.arange(start, start + T, device=device)[:, None]
            k_pos = torch.arange(start + T, device=device)[None, :]
            # (B, 1, T, S): causal and key is real; a padded query may always see itself so no row is empty
            # (an all-False row makes SDPA return NaN, which would then leak into the gradients as NaN * 0)
            mask = ((k_pos <= q_pos) & keys_real[:, None, None, :]) | (k_pos == q_pos)
        h = self.tok_embeddings(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq(device), positions, h.dtype)
        for i, layer in enumerate(self.layers):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, mask, cache, i, start, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache, i, start)
        h = self.norm(h[:, -1:] if last_only else h)
        # the score head as a (dim,) vector gives (B, T) directly, not a view of (B, T, 1) (FSDP warns about views)
        out = self.output(h) if self.args.head == "lm" else F.linear(h, self.score.weight[0])
        return (out, h) if return_hidden else out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------------------------------------------
    # Hugging Face format: config.json + model.safetensors (or shards + model.safetensors.index.json)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {}
        for name, t in self.state_dict().items():
            if name == "output.weight" and self.args.tie_embeddings:
                continue  # tied: HF stores only the embedding
            sd[hf_name(name)] = t
        return sd

    def save_pretrained(self, path, max_shard_bytes: int = 2 * 1024**3, extra_files: dict[str, str] | None = None):
        """Write an HF-format checkpoint atomically: into a temporary sibling directory, then renamed."""
        save_hf_checkpoint(self.hf_state_dict(), self.args.to_hf_config(), path, max_shard_bytes, extra_files)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype: torch.dtype | None = None, head: str | None = None) -> "Llama":
        """Strict load of an HF Llama directory, one tensor at a time. head="score" on a causal-LM checkpoint keeps
        the backbone and starts a new scalar head (a reward model or critic initialised from the SFT model)."""
        args, sources = plan_load(path, head)
        with torch.device("meta"):
            model = cls(args)
        ours = {n: read_source(sources[n]) for n, _ in model.named_parameters()}
        ours = {n: t.to(device=device, dtype=dtype or t.dtype) for n, t in ours.items()}
        if args.tie_embeddings:  # the output weight is the embedding tensor itself
            ours["output.weight"] = ours["tok_embeddings.weight"]
        model.load_state_dict(ours, strict=True, assign=True)
        if args.tie_embeddings:  # assign=True replaced the Parameter objects: tie them again
            model.output.weight = model.tok_embeddings.weight
        return model


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
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object")
    return ModelArgs.from_hf_config(cfg, str(cfg_path))


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
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        _write_hf_checkpoint(sd, config, tmp, max_shard_bytes, extra_files)
    except OSError as e:  # a full disk or a read-only directory: the old checkpoint at `path` is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, f"could not write {path}: {e.strerror or e} ({e.filename or tmp}); "
                               f"anything already at {path} is untouched") from None
    replace_dir(tmp, path)


def _write_hf_checkpoint(sd: dict, config: dict, tmp: Path, max_shard_bytes: int, extra_files: dict | None):
    from safetensors.torch import save_file

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # split into shards of at most max_shard_bytes (a single tensor larger than that gets its own shard)
    shards, size = [[]], 0
    for name in sorted(sd):
        nbytes = sd[name].numel() * sd[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    dtype = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}, indent=2) + "\n")
    if len(shards) == 1:
        save_file({n: sd[n].detach().contiguous().cpu() for n in shards[0]}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, names in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: sd[n].detach().contiguous().cpu() for n in names}, tmp / fname, metadata={"format": "pt"})
            weight_map.update({n: fname for n in names})
        total = sum(t.numel() * t.element_size() for t in sd.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")


def replace_dir(tmp: Path, path: Path):
    """Swap a fully written directory into place; until the final rename the old one stays intact."""
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# Sampling


def sample_next(logits, temperature: float, top_k: int, top_p: float, generator=None):
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # keep the smallest set of tokens whose probability reaches top_p (the most likely one always survives)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Llama, prompt_ids, prompt_mask, max_new_tokens: int, *, stop_ids, pad_id: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, generator=None):
    """Batched sampling with a preallocated KV cache.

    prompt_ids, prompt_mask (B, P): left-padded prompts (the last column is real for every row).
    stop_ids: the ids that end a response (Llama-3.1-Instruct has three); a list, possibly empty.
    Returns (tokens (B, N), mask (B, N) bool) with N <= max_new_tokens: a row's tokens up to and including its
    first stop id are real; everything after is pad_id with mask False. Rows that never stop are cut at N.
    """
    B, P = prompt_ids.shape
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=prompt_ids.device)
    if P + max_new_tokens > model.args.max_seq_len:
        raise ValueError(f"prompt width {P} + max_new_tokens {max_new_tokens} exceeds max_seq_len {model.args.max_seq_len}")
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded: the last column must be a real token in every row")
    cache = KVCache(model.args, B, P + max_new_tokens, prompt_ids.device)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=prompt_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    logits = model(prompt_ids, prompt_mask, cache=cache, last_only=True)[:, -1]
    n = 0
    for n in range(1, max_new_tokens + 1):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        nxt = nxt.masked_fill(done, pad_id)
        tokens[:, n - 1] = nxt
        real = ~done
        done = done | torch.isin(nxt, stop)
        if n == max_new_tokens or bool(done.all()):
            break
        # finished rows feed a masked pad: their keys are never attended, their outputs ignored
        logits = model(nxt[:, None], real[:, None].long(), cache=cache)[:, -1]
    tokens = tokens[:, :n]
    # real = up to and including the first stop id (found from the tokens, never from pad_id)
    is_stop = torch.isin(tokens, stop).long()
    mask = (is_stop.cumsum(-1) - is_stop) == 0
    return tokens, mask


def resize_vocab(model: Llama, vocab_size: int) -> Llama:
    """Grow the embedding (and an untied output head) to vocab_size rows for tokens added to the tokenizer; the
    new rows are the mean of the old ones, so a new token starts as an average token rather than noise."""
    old = model.args.vocab_size
    assert vocab_size >= old
    if vocab_size == old:
        return model

    def grow(w):  # the mean in float64: the sharded loader (runtime.open_model) sums the same rows in blocks
        return torch.cat([w, w.double().mean(0, keepdim=True).to(w.dtype).expand(vocab_size - old, -1)]).contiguous()

    model.args.vocab_size = vocab_size
    model.tok_embeddings.weight = nn.Parameter(grow(model.tok_embeddings.weight.data))
    model.tok_embeddings.num_embeddings = vocab_size
    if model.args.head == "lm":
        if model.args.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight
        else:
            model.output.weight = nn.Parameter(grow(model.output.weight.data))
        model.output.out_features = vocab_size
    return model


if __name__ == "__main__":
    torch.manual_seed(0)
    model = Llama(ModelArgs.preset("tiny"))
    print(f"tiny preset: {model.num_params():,} parameters")
    ids = torch.randint(3, 512, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    toks, tmask = generate(model, ids, mask, 8, stop_ids=[1], pad_id=0, temperature=1.0)
    print("logits", tuple(model(ids, mask).shape), "generated", tuple(toks.shape), tmask.sum(-1).tolist())
