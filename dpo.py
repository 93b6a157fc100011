"""DPO math (Rafailov et al. 2023): sequence log-probs and the preference loss.

Stage 2 of the pipeline (README): DPO on preference pairs, starting from pi_sft with pi_sft as the
reference, gives pi_dpo, whose log-ratio to pi_ref is RTO's token reward (rto.py).
"""

import torch
import torch.nn.functional as F


def sequence_logps(logp, mask):
    """log pi(y | x) = sum of the response tokens' log-probs.
    logp (B, T) token log-probs, mask (B, T) bool or 0/1 marking response tokens -> (B,)."""
    return torch.where(mask.bool(), logp, torch.zeros_like(logp)).sum(-1)


def dpo_loss(pol_chosen, pol_rejected, ref_chosen, ref_rejected, beta: float,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid"):
    """Preference loss on summed sequence log-probs, each (B,).

    h = (pol_chosen - ref_chosen) - (pol_rejected - ref_rejected), the difference of the implicit
    rewards divided by beta.
    "sigmoid": -(1 - ls) * logsigmoid(beta * h) - ls * logsigmoid(-beta * h). ls = 0 is DPO;
               ls > 0 is conservative DPO (cDPO, Mitchell 2023): the labels are assumed flipped
               with probability ls.
    "ipo":     (h - 1 / (2 * beta))^2 (Azar et al. 2023). The IPO paper and TRL average the
               log-probs over tokens; we keep sums like DPO, so pass mean log-probs (sum / length)
               if you want the paper's form.
    Returns (loss, metrics): detached scalar tensors chosen_reward = mean beta * (pol_chosen -
    ref_chosen), rejected_reward, accuracy (fraction with chosen_reward > rejected_reward, strict:
    0 at step 0 where policy == reference) and margin (mean chosen - rejected reward).
    At step 0 the sigmoid loss is exactly log 2 and both rewards 0 (README, "Known traps").
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    h = (pol_chosen - ref_chosen) - (pol_rejected - ref_rejected)            # (B,)
    if loss_type == "sigmoid":
        # At ls = 0.5 the loss is symmetric in chosen/rejected and there is nothing to learn.
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h)
                  - label_smoothing * F.logsigmoid(-beta * h))
    elif loss_type == "ipo":
        # Regresses h onto the fixed target 1/(2 beta) instead of pushing it to +inf, so IPO does
        # not overfit deterministic preferences. Label smoothing is a sigmoid-loss idea: refuse it
        # rather than silently ignore it.
        if label_smoothing != 0.0:
            raise ValueError("label_smoothing applies to loss_type='sigmoid' only")
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: use 'sigmoid' or 'ipo'")

    with torch.no_grad():
        chosen_reward = beta * (pol_chosen - ref_chosen)                     # (B,)
        rejected_reward = beta * (pol_rejected - ref_rejected)
        metrics = {
            "chosen_reward": chosen_reward.mean(),
            "rejected_reward": rejected_reward.mean(),
            "accuracy": (chosen_reward > rejected_reward).float().mean(),
            "margin": (chosen_reward - rejected_reward).mean(),
        }
    return losses.mean(), {k: v.detach() for k, v in metrics.items()}
