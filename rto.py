"""Reinforced Token Optimization: the dense per-token reward that PPO trains on.

Classic RLHF is a bandit: the reward model scores the finished response and PPO sees that number
on the last token only. RTO (Zhong et al., "DPO Meets PPO: Reinforced Token Optimization for RLHF",
arXiv 2404.18922) treats generation as a token-level MDP. For DPO the optimal token reward is
beta * log(pi_dpo / pi_ref)(y_h), so a DPO-trained policy gives PPO a reward at every token:

    r_h = beta1 * log(pi_dpo / pi_ref)(y_h) - beta2 * log(pi / pi_ref)(y_h) + [h == H] * beta3 * r_MLE(x, y)

Everything here is a pure function of (B, T) tensors over the response tokens, with `mask` marking
the valid tokens (a contiguous prefix of each row: responses are right-padded). The reward for
each algorithm is built by `dense_rewards`; the rest of PPO (GAE, losses) is unchanged (ppo.py).
"""

import torch

from ppo import kl_penalty
from reward import last_token_index

# ppo:      the sparse RLHF baseline, r_MLE on the last token (the paper's beta1 = 0).
# rto:      ppo + the DPO token reward on every token.
# semi-rto: ppo + the DPO token reward pooled onto delimiter tokens (paper's ablation, worse than rto).
# dpo-only: the DPO token reward as the whole reward, no r_MLE (paper's ablation: DPO works better
#           as shaping on top of r_MLE than as the reward itself).
ALGOS = ("ppo", "rto", "semi-rto", "dpo-only")
USES_DPO = ("rto", "semi-rto", "dpo-only")  # the algorithms that need the DPO model's log-probs
USES_RM = ("ppo", "rto", "semi-rto")  # the algorithms that need the reward model's score


def dpo_token_reward(logp_dpo, logp_ref, mask, beta1: float, clip: float):
    """clamp(beta1 * (logp_dpo - logp_ref), -clip, clip) on valid tokens, 0 elsewhere. All (B, T).

    logp_ref is the SFT model (the reference DPO was trained against). The clamp is the reference
    code's: a handful of tokens with a huge DPO log-ratio must not dominate the return
    (defaults dpo_reward_scale 0.05, clip 0.05). The released code treats a scale of 0 as "no
    scaling" (README, "Known traps"); here beta1 and clip must both be positive, and plain PPO is
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


def dense_rewards(algo: str, *, logp, logp_ref, mask, rm_score=None, logp_dpo=None, delimiter_mask=None,
                  ended=None, beta1: float = 0.05, dpo_clip: float = 0.05, beta2: float = 0.01,
                  beta3: float = 1.0, kl_estimator: str = "k1", no_eos_penalty: float = 0.0):
    """The per-token reward PPO trains on, for each algorithm in ALGOS.

    r_h = -beta2 * KL_h                                             every algo (ppo.kl_penalty)
          + clamp(beta1 * log(pi_dpo / pi_ref)(y_h), +-dpo_clip)    rto, dpo-only: every valid token
          + the same, pooled onto delimiter tokens                  semi-rto
          + [h == last valid] * beta3 * rm_score                    ppo, rto, semi-rto
          - [h == last valid and not ended] * no_eos_penalty        every algo

    Defaults are the reference code's: beta1 0.05 (dpo_reward_scale), dpo_clip 0.05, beta2 0.01
    (init_kl_coef), beta3 1, k1 KL. Plain PPO is the paper's beta1 = 0: algo "ppo".

    logp, logp_ref, logp_dpo (B, T): log-probs of the sampled response tokens under the policy
    being trained, the SFT reference and the DPO model. mask (B, T) bool, a contiguous prefix per
    row. rm_score (B,): r_MLE, already normalised and clamped (reward.normalize_score), read at the
    EOS token. ended (B,) bool: the response emitted EOS. A response cut by max_new_tokens is
    scored as is and may be penalised; it is never given a fake EOS (that would be off-policy).
    Inputs an algorithm does not use are ignored.

    Returns (rewards, components): rewards (B, T) fp32, zero on padding; components
    {"kl": (B, T) per-token KL estimate, "dpo": (B, T) the DPO term added (zeros for ppo),
     "score": (B,) the sequence-level term added at the last valid token}.
    """
    if algo not in ALGOS:
        raise ValueError(f"unknown algo {algo!r}: choose one of {ALGOS}")
    needs = {"logp_dpo": algo in USES_DPO,
             "rm_score": algo in USES_RM,
             "delimiter_mask": algo == "semi-rto",
             "ended": no_eos_penalty != 0.0}
    given = {"logp_dpo": logp_dpo, "rm_score": rm_score, "delimiter_mask": delimiter_mask, "ended": ended}
    for name, needed in needs.items():
        if needed and given[name] is None:
            why = f"no_eos_penalty={no_eos_penalty}" if name == "ended" else f"algo {algo!r}"
            raise ValueError(f"{why} needs {name}")
    if no_eos_penalty < 0:
        raise ValueError(f"no_eos_penalty is subtracted, pass a value >= 0, got {no_eos_penalty}")

    mask = mask.bool()
    B = mask.shape[0]
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)

    # 1. KL to the SFT reference on every token: keeps pi near where r_MLE and pi_dpo are reliable.
    kl = torch.where(mask, kl_penalty(logp.float(), logp_ref.float(), kl_estimator), zeros)
    rewards = -beta2 * kl

    # 2. The dense DPO term, RTO's addition (about 12 lines in the released code).
    dpo = zeros
    if algo in ("rto", "dpo-only"):
        dpo = dpo_token_reward(logp_dpo, logp_ref, mask, beta1, dpo_clip)
    elif algo == "semi-rto":
        dpo = pool_on_delimiters(dpo_token_reward(logp_dpo, logp_ref, mask, beta1, dpo_clip),
                                 mask, delimiter_mask)
    rewards = rewards + dpo

    # 3. The sequence-level term on the last valid token: the EOS itself, not one past it (a bug
    #    TRL once had), or the last token of a truncated response.
    score = torch.zeros(B, dtype=torch.float32, device=mask.device)
    if algo != "dpo-only":
        score = score + beta3 * rm_score.float()
    if no_eos_penalty != 0.0:
        score = score - no_eos_penalty * (~ended.bool()).float()
    rewards[torch.arange(B, device=mask.device), last_token_index(mask)] += score

    return rewards, {"kl": kl, "dpo": dpo, "score": score}
