"""A Llama 2/3 decoder in plain PyTorch, its KV cache, and batched sampling: the network, nothing else.

    python model.py                      # build the tiny preset, sample a few tokens, print shapes
    from model import Llama, ModelArgs
    model = Llama(ModelArgs.preset("tiny"))
    model = hf.load("path/to/Llama-3.2-1B")   # a Hugging Face checkpoint: hf.py is the file-format boundary

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

import math
import weakref
from dataclasses import dataclass, field

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
    loss_type: str | None = None  # a DPO-stage export: the preference loss it was trained with (config.json says so)
    implicit_reward: bool | None = None  # ... and whether its log-ratio to its reference is an implicit reward

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

    def num_params(self) -> int:
        """The parameter count from the shapes alone, without building the model (a config of a million layers must
        be refused before anything is allocated). A tied output is counted once, as Llama.num_params does."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attn = self.dim * q + 2 * self.dim * kv + q * self.dim + (q + 2 * kv + self.dim) * self.attention_bias
        mlp = 3 * self.dim * self.hidden_dim + (2 * self.hidden_dim + self.dim) * self.mlp_bias
        head = self.dim * (1 if self.head == "score" else 0 if self.tie_embeddings else self.vocab_size)
        return self.vocab_size * self.dim + self.n_layers * (attn + mlp + 2 * self.dim) + self.dim + head

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


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
        if cache is not None and cache.static:  # fixed shapes: write at the column tensor, attend over all (masked)
            k_cache, v_cache = cache.layer(layer, k)
            k_cache.index_copy_(2, start, k)
            v_cache.index_copy_(2, start, v)
            k, v = k_cache, v_cache
        elif cache is not None:  # write this step's keys/values into the preallocated cache, attend over all so far
            k_cache, v_cache = cache.layer(layer, k)
            k_cache[:, :, start:start + T] = k
            v_cache[:, :, start:start + T] = v
            k, v = k_cache[:, :, :start + T], v_cache[:, :, :start + T]
        gqa = self.n_kv_heads != self.n_heads
        if gqa and mask is not None and ATTENTION["masked_gqa"] == "repeat_kv":
            # the fused kernels refuse this call (choose_attention): K/V repeated to every query head instead, so the
            # memory-efficient kernel takes the mask, rather than the math kernel materialising fp32 scores
            k, v = (x.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1) for x in (k, v))
            gqa = False
        # GQA without materialising repeated K/V: SDPA broadcasts each KV head over its group of query heads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


# How grouped-query attention with a padding mask runs: "native" (SDPA's enable_gqa) or "repeat_kv" (K/V repeated to
# every query head, for a GPU whose fused kernels refuse a masked grouped-query call). Chosen once per process.
ATTENTION = {"masked_gqa": "native"}


def choose_attention(device, dtype=torch.bfloat16) -> str:
    """On a GPU, ask SDPA's fused kernels (flash, memory-efficient, cuDNN) whether one of them takes a masked
    grouped-query call in the run's compute dtype; if none does, SDPA would fall back to the math kernel and its fp32
    (B, heads, T, T) scores, so K/V are repeated instead. On CPU: native. Returns a line saying what was chosen."""
    if torch.device(device).type != "cuda":
        ATTENTION["masked_gqa"] = "native"
        return "attention: native grouped-query SDPA (CPU)"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.zeros(1, 4, 16, 64, device=device, dtype=dtype)
    kv = torch.zeros(1, 2, 16, 64, device=device, dtype=dtype)
    mask = torch.ones(1, 1, 16, 16, device=device, dtype=torch.bool).tril()
    fused = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask, enable_gqa=True)
            fused.append(backend.name)
        except RuntimeError:
            pass
    ATTENTION["masked_gqa"] = "native" if fused else "repeat_kv"
    return (f"attention: masked grouped-query SDPA runs fused ({', '.join(fused)})" if fused else
            "attention: no fused SDPA kernel takes a masked grouped-query call here: K/V repeated to every head")


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
    static=True keeps every shape fixed for the whole rollout, for a compiled decode step (generate's
    compile_decode): every buffer is allocated up front (in `dtype`), the next column is a tensor (`pos`), writes go
    through index_copy_, and attention runs over all max_len columns with the unwritten ones masked, so no shape
    depends on how far decoding has got.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, device, static: bool = False,
                 dtype: torch.dtype | None = None):
        self.shape = (batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.kv = [None] * args.n_layers
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.n_real = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0
        self.static = static
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # static: the next column to write
        if static:  # every buffer allocated now, and marked static: the compiled step mutates them in place, and
            # CUDA graphs may replay over a mutated input only if it is a static one (else inductor skips them)
            self.kv = [(torch.zeros(self.shape, dtype=dtype, device=device),
                        torch.zeros(self.shape, dtype=dtype, device=device)) for _ in range(args.n_layers)]
            for t in [self.key_mask, self.n_real, self.pos, *(x for kv in self.kv for x in kv)]:
                torch._dynamo.mark_static_address(t)

    def append(self, real):
        """Record T new columns, real (B, T) bool: real token or pad. Returns (start, q_pos (T, 1), keys_real (B, S),
        k_pos (1, S)): where the layers write (an int, or the (T,) column tensor of a static cache) and what the
        attention mask is built from (S = the filled columns, or all of a static cache's)."""
        T, device = real.shape[1], real.device
        if self.static:
            cols = self.pos + torch.arange(T, device=device)
            self.key_mask.index_copy_(1, cols, real)
            self.pos += T
            start, keys_real = cols, self.key_mask
        else:
            start = self.length
            self.key_mask[:, start:start + T] = real
            self.length += T
            cols, keys_real = torch.arange(start, start + T, device=device), self.key_mask[:, :start + T]
        self.n_real += real.sum(-1)
        return start, cols[:, None], keys_real, torch.arange(keys_real.shape[1], device=device)[None, :]

    def reset(self):
        """Empty again, the buffers kept (a compiled step keeps working on the same tensors)."""
        self.key_mask.zero_()
        self.n_real.zero_()
        self.pos.zero_()
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
        # position = number of real tokens before this one: padded rows see the same positions as unpadded ones
        positions = (real.cumsum(-1) - 1).clamp(min=0)
        start, mask = 0, None  # plain causal attention when nothing is padded and nothing is cached
        if cache is not None:
            positions = positions + cache.n_real[:, None]
            start, q_pos, keys_real, k_pos = cache.append(real)
        elif attention_mask is not None:
            q_pos, keys_real, k_pos = torch.arange(T, device=device)[:, None], real, torch.arange(T, device=device)[None]
        if cache is not None or attention_mask is not None:
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


# ----------------------------------------------------------------------------------------------------------
# Sampling


def sample_next(logits, temperature: float, top_k: int, top_p: float, generator=None):
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits.float() / temperature
    # a temperature near 0 overflows the division: the same distribution from logits shifted to a max of 0 first
    # (the plain division where it is finite, so ordinary temperatures sample exactly as they always did)
    shifted = (logits.float() - logits.float().amax(-1, keepdim=True)) / temperature
    logits = torch.where(torch.isfinite(scaled).all(-1, keepdim=True), scaled, shifted)
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


# A compiled decode step's static cache holds a multiple of this many columns: prompts of every width up to it (PPO's
# vary with each rollout) reuse one compilation, and one set of CUDA graphs.
DECODE_BUCKET = 64
# On a GPU the loop asks whether every row has ended (a host sync) once per this many tokens, not after each one;
# on CPU a sync costs nothing and it asks every token. The tokens (and the generator's state after) are the same.
END_CHECK_EVERY = 16
# the models that hold compiled decode steps (each in model.compiled_steps: {(batch, columns, device): (step, static
# cache)}), so that release_compiled can drop them all between stages
COMPILING = weakref.WeakSet()


def decode_step(model: Llama, cache: KVCache):
    """One token for every row on a static cache: (B, 1) ids and mask -> (B, V) logits, no data-dependent shape or
    Python branch inside (stopping is the caller's masks). What compiled_decode compiles."""
    def step(tokens, real):
        return model(tokens, real, cache=cache)[:, -1]
    return step


def compiled_decode(model: Llama, batch_size: int, max_len: int, device):
    """A decode step compiled for this model and batch, on a static cache of max_len rounded up to DECODE_BUCKET
    columns. fullgraph: a graph break is an error, never a silent fall back to eager. mode "reduce-overhead" on a GPU:
    the step replays as CUDA graphs (the cache is marked static, so its in-place writes are allowed); the default mode
    elsewhere. Returns (step, cache)."""
    columns = -(-max_len // DECODE_BUCKET) * DECODE_BUCKET
    steps = model.__dict__.setdefault("compiled_steps", {})  # (a plain attribute, not a submodule: no parameters)
    COMPILING.add(model)
    key = (batch_size, columns, str(device))
    if key not in steps:
        dtype = next(model.parameters()).dtype
        cache = KVCache(model.args, batch_size, columns, device, static=True, dtype=dtype)
        mode = "reduce-overhead" if torch.device(device).type == "cuda" else None
        steps[key] = (torch.compile(decode_step(model, cache), mode=mode, fullgraph=True, dynamic=False), cache)
    return steps[key]


def release_compiled():
    """Drop every compiled decode step and dynamo's caches (between stages: a new model must not inherit the old
    one's recompile budget, and the CUDA graphs' memory goes back to the pool)."""
    for model in list(COMPILING):
        model.compiled_steps.clear()
    COMPILING.clear()
    torch._dynamo.reset()


@torch.no_grad()
def generate(model: Llama, prompt_ids, prompt_mask, max_new_tokens: int, *, stop_ids, pad_id: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, generator=None,
             compile_decode: bool = False, end_check_every: int | None = None):
    """Batched sampling with a preallocated KV cache.

    prompt_ids, prompt_mask (B, P): left-padded prompts (the last column is real for every row).
    stop_ids: the ids that end a response (Llama-3.1-Instruct has three); a list, possibly empty.
    Returns (tokens (B, N), mask (B, N) bool) with N <= max_new_tokens: a row's tokens up to and including its
    first stop id are real; everything after is pad_id with mask False. Rows that never stop are cut at N.
    compile_decode: the per-token step runs compiled on a static cache (compiled_decode; the prompt's pass stays
    eager); sampling is the same code on the same logits, so greedy tokens equal the eager path's.
    end_check_every: ask whether every row has ended once per this many tokens (None: END_CHECK_EVERY on a GPU, 1 on
    CPU); the tokens and the generator's final state do not depend on it.
    """
    B, P = prompt_ids.shape
    device = prompt_ids.device
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    if P + max_new_tokens > model.args.max_seq_len:
        raise ValueError(f"prompt width {P} + max_new_tokens {max_new_tokens} exceeds max_seq_len {model.args.max_seq_len}")
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded: the last column must be a real token in every row")
    if compile_decode:
        step, cache = compiled_decode(model, B, P + max_new_tokens, device)
        cache.reset()
    else:
        cache = KVCache(model.args, B, P + max_new_tokens, device)
        step = decode_step(model, cache)
    # a sync every token on CPU (it costs nothing there); on a GPU one per END_CHECK_EVERY tokens, where the
    # generator's state is kept at each token so a loop that ran past the end puts it back where it was
    every = end_check_every or (END_CHECK_EVERY if device.type == "cuda" else 1)
    if generator is None and temperature > 0:
        every = 1  # the global generator's state is not rewound: ask after every token
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    ended_at = torch.full((), max_new_tokens, dtype=torch.long, device=device)  # the step where every row had ended
    states = []
    logits = model(prompt_ids, prompt_mask, cache=cache, last_only=True)[:, -1]
    n = 0
    for n in range(1, max_new_tokens + 1):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if every > 1 and generator is not None:
            states.append(generator.get_state())
        nxt = nxt.masked_fill(done, pad_id)
        tokens[:, n - 1] = nxt
        real = ~done
        done = done | torch.isin(nxt, stop)
        if every > 1:  # (on the device: no sync)
            ended_at = torch.where(done.all() & (ended_at == max_new_tokens), n, ended_at)
        if n == max_new_tokens or (n % every == 0 and bool(done.all())):
            break
        if compile_decode and device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # this step's outputs replace the last ones (already used)
        # finished rows feed a masked pad: their keys are never attended, their outputs ignored
        logits = step(nxt[:, None], real[:, None].long())
    if every > 1:  # the loop may have run past the token where every row ended: cut there, and rewind the generator
        n = min(n, int(ended_at))
        if states:
            generator.set_state(states[n - 1])
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

    def grow(w):  # the mean in float64: the sharded loader (checkpoint.open_model) sums the same rows in blocks
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
