"""Reinforced Token Optimization: the dense per-token reward that PPO trains on.

Classic RLHF is a bandit: the reward model scores the finished response and PPO sees that number
on the last token only. RTO (Zhong et al., "DPO Meets PPO: Reinforced Token Optimization for RLHF",
arXiv 2404.18922) treats generation as a token-level MDP. For DPO the optimal token reward is
beta * log(pi_dpo / pi_ref)(y_h), so a DPO-trained policy gives PPO a reward at every token:

    r_h = beta1 * log(pi_dpo / pi_ref)(y_h) - beta2 * log(pi / pi_ref)(y_h) + [h == H] * beta3 * r_MLE(x, y)

Everything here is a pure function of (B, T) tensors over the response tokens, with `mask` marking
the valid tokens (a contiguous prefix of each row: responses are right-padded). The reward for
each algorithm is one entry of the table ALGOS (the inputs it needs, the terms it adds), summed by `dense_rewards`;
the rest of PPO (advantages, losses) is unchanged (ppo.py).
"""

from dataclasses import dataclass

import torch

from ppo import kl_penalty
from reward import last_token_index

def dpo_token_reward(logp_dpo, logp_ref, mask, beta1: float, clip: float):
    """clamp(beta1 * (logp_dpo - logp_ref), -clip, clip) on valid tokens, 0 elsewhere. All (B, T).

    logp_ref is the SFT model (the reference DPO was trained against). The clamp is the reference
    code's: a handful of tokens with a huge DPO log-ratio must not dominate the return
    (defaults dpo_reward_scale 0.05, clip 0.05). The released code treats a scale of 0 as "no
    scaling" (docs/algorithm.md, "Known traps"); here beta1 and clip must both be positive, and plain PPO is
    algo "ppo", not beta1 = 0.
    """
    if beta1 <= 0:
        raise ValueError(f"beta1 must be > 0, got {beta1} (for plain PPO use algo 'ppo')")
    if clip <= 0:
        raise ValueError(f"dpo clip must be > 0, got {clip}")
    reward = torch.clamp(beta1 * (logp_dpo.float() - logp_ref.float()), -clip, clip)
    return torch.where(mask.bool(), reward, torch.zeros_like(reward))


def pool_on_delimiters(token_rewards, mask, delimiter_mask):
    """Semi-RTO: move the token rewards onto delimiter tokens. All (B, T).

    Each valid delimiter token receives the sum of the token rewards since the previous delimiter
    (exclusive) up to itself (inclusive); whatever follows the last delimiter lands on the last
    valid token. Row totals are unchanged, so semi-rto differs from rto only in WHEN the reward
    arrives. Delimiters in padding are ignored.
    """
    mask = mask.bool()
    last = torch.zeros_like(mask)
    last[torch.arange(mask.shape[0], device=mask.device), last_token_index(mask)] = True
    drop_here = (delimiter_mask.bool() & mask) | last       # (B, T) where the pooled sum is paid
    rewards = torch.where(mask, token_rewards, torch.zeros_like(token_rewards))
    pooled = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])               # (B,) reward collected since last drop
    for t in range(rewards.shape[1]):
        running = running + rewards[:, t]
        pooled[:, t] = torch.where(drop_here[:, t], running, torch.zeros_like(running))
        running = torch.where(drop_here[:, t], torch.zeros_like(running), running)
    return pooled


# ----------------------------------------------------------------------------------------------------------
# The terms an algorithm adds on top of the KL penalty. Each is a function of the rollout's inputs `x` (the (B, T)
# tensors below, (B,) for rm_score) and the hyper-parameters `hp`, returning a (B, T) reward, zero on padding.


def on_last_token(value, mask):
    """(B,) -> (B, T): value on each row's last valid token (the EOS itself, not one past it, a bug TRL once had;
    or the last token of a truncated response), 0 elsewhere."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    out[torch.arange(mask.shape[0], device=mask.device), last_token_index(mask)] = value.float()
    return out


def dpo_dense(x, hp):
    """RTO's addition (about 12 lines in the released code): the DPO token reward on every valid token."""
    return dpo_token_reward(x["logp_dpo"], x["logp_ref"], x["mask"], hp["beta1"], hp["dpo_clip"])


def dpo_pooled(x, hp):
    """Semi-RTO: the same DPO token rewards, paid on delimiter tokens (same row total, later arrival)."""
    return pool_on_delimiters(dpo_dense(x, hp), x["mask"], x["delimiter_mask"])


def rm_last(x, hp):
    """The bandit reward of classic RLHF: beta3 * r_MLE(x, y) on the last valid token."""
    return on_last_token(hp["beta3"] * x["rm_score"].float(), x["mask"])


@dataclass(frozen=True)
class Algo:
    """One row of the algorithm table: the rollout inputs its reward needs (beyond the policy's and the KL anchor's
    log-probs, which every algorithm uses) and the terms it adds, by name."""
    needs: tuple  # of "logp_dpo" (the DPO model's pass), "rm_score" (the reward model's), "delimiter_mask", or any
    # other name of train.SCORERS
    terms: dict  # name -> term(x, hp) -> (B, T); "rm" is the sequence-level score, the rest are dense


# Adding an algorithm is one entry here plus its term above; train.py loads only the models its `needs` name, and a
# new input (a model's output the rollout must compute) is one entry of train.SCORERS.
ALGOS = {
    # the sparse RLHF baseline, r_MLE on the last token (the paper's beta1 = 0)
    "ppo": Algo(needs=("rm_score",), terms={"rm": rm_last}),
    # ppo + the DPO token reward on every token
    "rto": Algo(needs=("logp_dpo", "rm_score"), terms={"dpo": dpo_dense, "rm": rm_last}),
    # ppo + the DPO token reward pooled onto delimiter tokens (the paper's ablation, worse than rto)
    "semi-rto": Algo(needs=("logp_dpo", "rm_score", "delimiter_mask"), terms={"dpo": dpo_pooled, "rm": rm_last}),
    # the DPO token reward as the whole reward, no r_MLE (the paper's ablation: DPO works better as shaping on top
    # of r_MLE than as the reward itself)
    "dpo-only": Algo(needs=("logp_dpo",), terms={"dpo": dpo_dense}),
}


def dense_rewards(algo: str, *, logp, logp_anchor, logp_ref, mask, ended=None, beta1: float = 0.05,
                  dpo_clip: float = 0.05, beta2: float = 0.01, beta3: float = 1.0, kl_estimator: str = "k1",
                  no_eos_penalty: float = 0.0, hp: dict | None = None, **inputs):
    """The per-token reward PPO trains on, for each algorithm in ALGOS.

    r_h = -beta2 * KL(pi || pi_anchor)_h                             every algo (ppo.kl_penalty)
          + clamp(beta1 * log(pi_dpo / pi_ref)(y_h), +-dpo_clip)    rto, dpo-only: every valid token
          + the same, pooled onto delimiter tokens                  semi-rto
          + [h == last valid] * beta3 * rm_score                    ppo, rto, semi-rto
          - [h == last valid and not ended] * no_eos_penalty        every algo

    Defaults are the reference code's: beta1 0.05 (dpo_reward_scale), dpo_clip 0.05, beta2 0.01
    (init_kl_coef), beta3 1, k1 KL. Plain PPO is the paper's beta1 = 0: algo "ppo".

    logp, logp_ref (B, T): log-probs of the sampled response tokens under the policy being trained and the SFT model
    (the reference DPO was trained against, so the DPO term is DPO's implicit reward). logp_anchor (B, T): the model
    the KL term keeps pi near; the reference code's is the SFT model (pass logp_ref), train.py's --kl_anchor dpo
    passes logp_dpo. mask (B, T) bool, a contiguous prefix per row. ended (B,) bool: the response emitted EOS. A
    response cut by max_new_tokens is scored as is and may be penalised; it is never given a fake EOS (that would be
    off-policy).
    inputs: what the algorithm's terms read, by the names its `needs` lists: logp_dpo (B, T) the DPO model's
    log-probs, rm_score (B,) r_MLE already normalised and clamped (reward.normalize_score) and read at the EOS,
    delimiter_mask (B, T), or a new one; inputs an algorithm does not use are ignored. hp: further hyper-parameters
    the terms read by name (train.py passes every PPOConfig field), on top of beta1, dpo_clip and beta3.

    Returns (rewards, components): rewards (B, T) fp32, zero on padding; components {"kl": (B, T) per-token KL
    estimate, "dpo": (B, T) the DPO term added (zeros when none), "score": (B,) the sequence-level terms added at
    the last valid token (r_MLE and the no-EOS penalty), and any other term of the algorithm by name, (B, T)}.
    """
    if algo not in ALGOS:
        raise ValueError(f"unknown algo {algo!r}: choose one of {tuple(ALGOS)}")
    x = {**inputs, "logp_ref": logp_ref}
    for name in ALGOS[algo].needs:
        if x.get(name) is None:
            raise ValueError(f"algo {algo!r} needs {name}")
    if no_eos_penalty < 0:
        raise ValueError(f"no_eos_penalty is subtracted, pass a value >= 0, got {no_eos_penalty}")
    if no_eos_penalty != 0.0 and ended is None:
        raise ValueError(f"no_eos_penalty={no_eos_penalty} needs ended")

    mask = x["mask"] = mask.bool()
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)

    # 1. KL to the anchor on every token: keeps pi near where r_MLE and pi_dpo are reliable.
    kl = torch.where(mask, kl_penalty(logp.float(), logp_anchor.float(), kl_estimator), zeros)
    rewards = -beta2 * kl

    # 2. The algorithm's own terms (the table above).
    hp = {**(hp or {}), "beta1": beta1, "dpo_clip": dpo_clip, "beta3": beta3}
    terms = {name: term(x, hp) for name, term in ALGOS[algo].terms.items()}

    # 3. A response cut at max length (no EOS) may pay a fixed penalty on its last token: our addition.
    no_eos = zeros
    if no_eos_penalty != 0.0:
        no_eos = on_last_token(-no_eos_penalty * (~ended.bool()).float(), mask)
    for name, t in terms.items():
        if name != "rm":
            rewards = rewards + t
    last = terms.get("rm", zeros) + no_eos  # the sequence-level terms, summed before they join the dense ones
    rewards = rewards + last
    score = last.sum(-1)  # (B,) what the last token received on top
    return rewards, {"kl": kl, "dpo": terms.get("dpo", zeros), "score": score,
                     **{k: v for k, v in terms.items() if k not in ("dpo", "rm")}}
