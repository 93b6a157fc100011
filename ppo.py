"""PPO math as small pure tensor functions: log-probs, masked statistics, KL, GAE and the two losses.

Every (B, T) tensor here is over response tokens: row b, position t is the t-th generated token
(or padding). `mask` marks the valid tokens. Nothing in this file knows about configs: train.py calls these
with explicit arguments (response_logprobs alone takes a model, any callable ids, mask -> logits).

Reference behaviour is the authors' released code (an OpenRLHF 0.4.4 fork); see docs/algorithm.md.
"""

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F


# ----------------------------------------------------------------------------- log-probs

def logprobs_from_logits(logits, labels, temperature: float = 1.0):
    """log pi(label_t | ...) for each position. logits (B, T, V) any float dtype, labels (B, T) long
    -> (B, T) float32.

    The logits are divided by the sampling temperature: the log-probs must be those of the
    distribution the tokens were sampled from (docs/algorithm.md, "Known traps").
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    out = []
    # One row at a time: each row is cast to fp32 on its own, so the forward pass holds one fp32
    # (T, V) row instead of fp32 copies of the whole (B, T, V) batch. Autograd keeps only the fp32
    # rows logsumexp needs, i.e. one fp32 copy of the batch in total.
    for row_logits, row_labels in zip(logits, labels):
        # fp32 log-softmax: in bf16 two passes over the same tokens round differently and the PPO
        # ratio on the first minibatch is not exactly 1 (docs/algorithm.md, "Known traps").
        x = row_logits.float() / temperature                           # (T, V)
        label_logits = x.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)  # (T,)
        out.append(label_logits - torch.logsumexp(x, dim=-1))          # log_softmax, gathered
    return torch.stack(out)                                            # (B, T)


def entropy_from_logits(logits, temperature: float = 1.0):
    """Entropy of softmax(logits / temperature) per position. (B, T, V) -> (B, T) float32."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    out = []
    for row_logits in logits:                  # row by row for the same memory reason as above
        logp = F.log_softmax(row_logits.float() / temperature, dim=-1)  # (T, V)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.stack(out)


def response_logprobs(model, batch: dict, temperature: float = 1.0, entropy: bool = False,
                      entropy_grad: bool = False):
    """Log-probs (B, R) of the response tokens of a batch (data.collate's layout) under `model`: the token in column
    P+j is predicted by the logits in column P+j-1. With entropy=True, also the entropy (B, R) of each predictive
    distribution: detached for logging, or with entropy_grad=True differentiable, for an entropy bonus in the loss
    (its graph holds another fp32 copy of the logits, so it is built only when asked for)."""
    P = batch["prompt_len"]
    logits = model(batch["input_ids"], batch["attention_mask"])[:, P - 1:-1]
    logp = logprobs_from_logits(logits, batch["input_ids"][:, P:], temperature)
    if not entropy:
        return logp
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        return logp, entropy_from_logits(logits, temperature)


# ----------------------------------------------------------------------------- masked statistics

def masked_sum(x, mask, dim=None):
    """Sum of x over entries where mask is set. mask is bool or 0/1, same shape as x.
    dim=None sums everything to a scalar. torch.where, not x * mask, so a NaN or inf in padding
    cannot leak into the sum."""
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x, mask, dim=None):
    """Mean of x over the valid entries (all of them when dim=None, else along dim).
    An empty mask gives NaN on purpose: there is nothing to average, and 0 would hide the bug."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count


def seq_mean(x, mask):
    """The loss reduction of the reference code: token mean within each sequence, then mean over
    sequences, so every response weighs the same whatever its length (the reference code). (B, T) -> scalar."""
    return masked_mean(x, mask, dim=-1).mean()


def masked_whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
    """(x - mean) / std over the valid entries of x; padding positions come back as 0.

    If torch.distributed is initialized the mean and variance are those of the valid entries of all
    ranks together, as the reference code whitens advantages over the whole rollout buffer.
    Two passes (sum and count for the mean, then the sum of squared deviations) rather than
    E[x^2] - E[x]^2, which cancels catastrophically when |mean| >> std.
    The variance is the biased one (divide by N), as in OpenRLHF's normalisation.
    shift_mean=False adds the mean back after scaling, as TRL's `masked_whiten` does (used for
    rewards, whose sign should survive whitening). x (B, T) -> (B, T), fp32 (or x's dtype if wider).
    """
    mask = mask.bool()
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in at least fp32
    distributed = dist.is_available() and dist.is_initialized()
    sum_count = torch.stack([masked_sum(x, mask), mask.sum().to(x.dtype)])  # all-reduced together
    if distributed:
        dist.all_reduce(sum_count)
    mean = sum_count[0] / sum_count[1]
    sq_dev = masked_sum((x - mean) ** 2, mask)
    if distributed:
        dist.all_reduce(sq_dev)
    var = sq_dev / sum_count[1]
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros_like(whitened))


def explained_variance(values, returns, mask):
    """1 - Var(R - V) / Var(R) over the valid tokens of this process: 1 is a perfect critic, 0 is
    no better than predicting the mean, negative is worse. Returns a Python float."""
    mask = mask.bool()
    r, v = returns[mask].float(), values[mask].float()
    return (1.0 - (r - v).var(unbiased=False) / r.var(unbiased=False)).item()


# ----------------------------------------------------------------------------- KL

def kl_penalty(logp, logp_ref, estimator: str = "k1"):
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs. (B, T) -> (B, T).

    k1: logp - logp_ref. Unbiased, can be negative per token; the reference code's choice.
    k3: exp(logp_ref - logp) - (logp_ref - logp) - 1. Unbiased and >= 0 per token, lower variance
        (Schulman, "Approximating KL Divergence", 2020).
    """
    if estimator == "k1":
        return logp - logp_ref
    if estimator == "k3":
        log_ratio = logp_ref - logp
        return torch.exp(log_ratio) - log_ratio - 1
    raise ValueError(f"unknown KL estimator {estimator!r}: use 'k1' or 'k3'")


# ----------------------------------------------------------------------------- GAE

def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    rewards, values, mask (B, T); mask marks the valid tokens, a contiguous prefix of each row.
    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
    A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}
    so the episode ends after the last valid token (the value after it is 0).
    Returns (advantages, returns), both (B, T) and zero on padding; returns = advantages + values
    (the critic's regression target, not whitened, as in the reference code).
    """
    mask = mask.bool()
    # Zero the padding first so that whatever the buffers hold there (stale values, NaN) is inert.
    rewards = torch.where(mask, rewards, torch.zeros_like(rewards))
    values = torch.where(mask, values, torch.zeros_like(values))
    m = mask.to(values.dtype)
    T = rewards.shape[1]
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])      # (B,) V_{t+1} * m_{t+1}
    next_adv = torch.zeros_like(values[:, 0])        # (B,) A_{t+1} * m_{t+1}
    for t in reversed(range(T)):                     # vectorised over B, right to left over T
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = delta + gamma * lam * next_adv
        next_value = values[:, t] * m[:, t]
        next_adv = advantages[:, t] * m[:, t]
    advantages = advantages * m
    return advantages, (advantages + values) * m


# ----------------------------------------------------------------------------- critic-free estimators
#
# With k samples per prompt the other responses to the same prompt are a baseline that needs no critic. Rows are
# grouped: rows [g*k, (g+1)*k) are the k responses to one prompt (train.py samples them so, on one rank); reinforce and reinforce++ in the table below need no group.

def reward_to_go(rewards, mask, gamma: float = 1.0):
    """G_t = sum_{t' >= t} gamma^(t' - t) r_t' over each row's valid tokens. (B, T) -> (B, T), zero on padding
    (after a response ends there is nothing left to collect)."""
    mask = mask.bool()
    rewards = torch.where(mask, rewards.float(), torch.zeros_like(rewards, dtype=torch.float32))
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return torch.where(mask, out, torch.zeros_like(out))


def _groups(x, k: int):
    """(B, ...) -> (B // k, k, ...): the k responses of each prompt side by side."""
    if k < 2 or x.shape[0] % k:
        raise ValueError(f"a group baseline needs k >= 2 samples per prompt and rows divisible by k, got "
                         f"{x.shape[0]} rows, k = {k}")
    return x.reshape(x.shape[0] // k, k, *x.shape[1:])


def leave_one_out_mean(x, k: int):
    """For each row, the mean of the OTHER k - 1 rows of its group. (B, ...) -> (B, ...)."""
    g = _groups(x, k)
    return ((g.sum(1, keepdim=True) - g) / (k - 1)).reshape(x.shape)


def on_every_token(seq_adv, mask):
    """A sequence-level advantage (B,) on every valid token of its response -> (B, T), zero on padding."""
    return torch.where(mask.bool(), seq_adv[:, None].expand(mask.shape), torch.zeros((), dtype=seq_adv.dtype))


def rloo(rewards, mask, k: int, gamma: float = 1.0):
    """RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for RLHF", eq. 5):
    each response's return R_i (its reward-to-go from the first token) minus the mean return of the other k - 1
    responses to its prompt, the same advantage on every valid token. (B, T) -> (B, T)."""
    ret = reward_to_go(rewards, mask, gamma)[:, 0]                      # (B,)
    adv = ret - leave_one_out_mean(ret, k)
    return on_every_token(adv, mask)


def grpo(rewards, mask, k: int, gamma: float = 1.0, eps: float = 1e-4):
    """GRPO with outcome supervision (Shao et al. 2024, "DeepSeekMath", section 4.1.2): each response's return
    standardised within its prompt's group, (R_i - mean(R_group)) / (std(R_group) + eps), on every valid token.
    std is the unbiased one (torch.std, as TRL's GRPO computes it); eps keeps a group of equal returns at 0.
    (B, T) -> (B, T)."""
    ret = reward_to_go(rewards, mask, gamma)[:, 0]
    g = _groups(ret, k)
    adv = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)).reshape(ret.shape)
    return on_every_token(adv, mask)


def rloo_token(rewards, mask, k: int, gamma: float = 1.0):
    """A dense leave-one-out estimator that keeps a token reward's credit where it was earned, without a critic:

        A_{i,t} = G_{i,t} - mean_{j != i} G_{j,t}

    G_{i,t} is response i's reward-to-go from token t (so a token reward counts only for the tokens at or before
    it, as in GAE with lambda = 1), and the baseline is the other responses' reward-to-go at the same position (0
    for a response already finished there: it collects nothing more). Why it is a valid baseline: the other k - 1
    responses are sampled independently of response i, so their returns do not depend on response i's actions and
    subtracting them leaves the policy gradient unbiased (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline
    for free!"). At t = 0 it is exactly RLOO. Two things set it apart from RLOO, and they are worth different
    amounts: the reward-to-go (a token is not credited with the rewards before it), which `reinforce` has alone,
    and the per-position baseline; docs/results.md measures both (on the credit task, at 5 seeds, neither part's
    difference is resolved: its gain over RLOO there is within the noise). With a sparse reward (the RM score on the last token only) G_{i,t} = R_i for every
    t, and it differs from RLOO only in the baseline of responses that ended earlier. (B, T) -> (B, T)."""
    rtg = reward_to_go(rewards, mask, gamma)
    adv = rtg - leave_one_out_mean(rtg, k)
    return torch.where(mask.bool(), adv, torch.zeros_like(adv))


# ----------------------------------------------------------------------------- the estimator table

@dataclass(frozen=True)
class Estimator:
    """One row of train.py's --estimator: whether it needs a critic (values of the rollout, returns to regress on),
    whether it compares the k samples of one prompt (then --samples_per_prompt must be >= 2), whether its advantages
    are whitened over the whole rollout by default (its source's choice; --whiten_advantages forces either way), and
    fn(rewards, mask, values, hp) -> (advantages, returns or None), all (B, T); hp holds k (samples per prompt),
    gamma, lam and grpo_eps. Adding an estimator is its function above plus one entry here."""
    critic: bool
    groups: bool
    whiten: bool
    fn: Callable


ESTIMATORS = {  # whiten: the reference code whitens GAE's; TRL's RLOO and GRPO, DeepSeekMath's GRPO do not re-whiten
    "gae": Estimator(True, False, True, lambda r, m, v, hp: gae(r, v, m, hp["gamma"], hp["lam"])),
    "rloo": Estimator(False, True, False, lambda r, m, v, hp: (rloo(r, m, hp["k"], hp["gamma"]), None)),
    "grpo": Estimator(False, True, False, lambda r, m, v, hp: (grpo(r, m, hp["k"], hp["gamma"], hp["grpo_eps"]),
                                                               None)),
    "rloo-token": Estimator(False, True, False, lambda r, m, v, hp: (rloo_token(r, m, hp["k"], hp["gamma"]), None)),
    # REINFORCE with reward-to-go: each token's return still to come, no baseline at all (the control that tells what
    # rloo-token's per-position baseline adds beyond the reward-to-go itself)
    "reinforce": Estimator(False, False, False, lambda r, m, v, hp: (reward_to_go(r, m, hp["gamma"]), None)),
    # REINFORCE++ (Hu 2025): the same reward-to-go, one sample per prompt, whitened over the global batch, which is
    # its baseline (the per-token KL penalty is part of the reward, as there)
    "reinforce++": Estimator(False, False, True, lambda r, m, v, hp: (reward_to_go(r, m, hp["gamma"]), None)),
}


# ----------------------------------------------------------------------------- losses

def policy_loss(logp, logp_old, advantages, mask, clip_eps: float):
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), negated to be minimised.
    logp (B, T) under the current policy, logp_old (B, T) under the rollout policy, advantages (B, T).

    Returns (loss, stats). Stats are detached scalars over the valid tokens:
    clipfrac (fraction of tokens where the clipped term is the active one), approx_kl
    (mean of 0.5 * (logp - logp_old)^2, TRL's "approxkl"), ratio_mean, ratio_max.
    On the first minibatch after a rollout, logp == logp_old: ratio 1, clipfrac 0, approx_kl 0.
    """
    mask = mask.bool()
    log_ratio = logp - logp_old
    ratio = torch.exp(log_ratio)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    # max of the negated terms = min of the surrogates: a pessimistic bound on the improvement.
    loss = seq_mean(torch.max(pg_unclipped, pg_clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_clipped > pg_unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": torch.where(mask, ratio, torch.full_like(ratio, -float("inf"))).max(),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def value_loss(values, values_old, returns, mask, clip: float):
    """Clipped value loss of the reference code: 0.5 * max((V - R)^2, (V_clip - R)^2) with
    V_clip = V_old + clamp(V - V_old, -clip, clip), reduced like the policy loss.
    values, values_old, returns (B, T). Returns (loss, {"vf_clipfrac": fraction of valid tokens
    where the clipped term is the larger one}).
    """
    mask = mask.bool()
    values_clipped = values_old + torch.clamp(values - values_old, -clip, clip)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * seq_mean(torch.max(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        vf_clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask)
    return loss, {"vf_clipfrac": vf_clipfrac.detach()}
