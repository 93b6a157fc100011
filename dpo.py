"""DPO math (Rafailov et al. 2023) and the direct preference methods the paper compares RTO with: R-DPO, SimPO,
TDPO. Each is a small pure function of per-pair tensors (B,); `LOSSES` names what each needs and
`preference_loss` dispatches, so train.run_dpo computes only those inputs.

Stage 2 of the pipeline (train.run_dpo): DPO on preference pairs, starting from pi_sft with pi_sft as the
reference, gives pi_dpo, whose log-ratio to pi_ref is RTO's token reward (rto.py).
"""
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ppo import logprobs_from_logits, response_logprobs


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
    At step 0 the sigmoid loss is exactly log 2 and both rewards 0 (docs/algorithm.md, "Known traps").
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


def _metrics(chosen_reward, rejected_reward) -> dict:
    """The implicit rewards of a batch of pairs, each (B,) -> detached means (as dpo_loss reports them)."""
    with torch.no_grad():
        return {"chosen_reward": chosen_reward.mean().detach(), "rejected_reward": rejected_reward.mean().detach(),
                "accuracy": (chosen_reward > rejected_reward).float().mean().detach(),
                "margin": (chosen_reward - rejected_reward).mean().detach()}


def rdpo_loss(pol_chosen, pol_rejected, ref_chosen, ref_rejected, len_chosen, len_rejected, beta: float = 0.1,
              alpha: float = 0.05):
    """R-DPO (Park et al. 2024, "Disentangling Length from Quality in Direct Preference Optimization", eq. 9): DPO
    on a length-regularised reward r = beta * log(pi / ref) + alpha * |y|, so the Bradley-Terry margin holds
    alpha * (|y_w| - |y_l|) inside the sigmoid:

        -log sigmoid(beta * h + alpha * (|y_w| - |y_l|)),   h as in dpo_loss

    When the chosen response is the longer one, length already explains part of the preference and the policy's
    log-ratio margin is pushed less: the verbosity DPO learns from length-biased labels is held back.
    alpha 0.05 is the small end of the range the SimPO paper tunes R-DPO over (0.05-1.0); lengths in tokens."""
    if beta <= 0 or alpha < 0:
        raise ValueError(f"need beta > 0 and alpha >= 0, got beta {beta}, alpha {alpha}")
    h = (pol_chosen - ref_chosen) - (pol_rejected - ref_rejected)
    losses = -F.logsigmoid(beta * h + alpha * (len_chosen.float() - len_rejected.float()))
    return losses.mean(), _metrics(beta * (pol_chosen - ref_chosen), beta * (pol_rejected - ref_rejected))


def simpo_loss(pol_chosen, pol_rejected, len_chosen, len_rejected, beta: float = 2.0, gamma: float = 1.0):
    """SimPO (Meng, Xia, Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", eq. 6):
    the reward is the length-normalised log-likelihood beta / |y| * log pi(y | x) (no reference model, no reference
    log-probs at all), with a target margin gamma:

        -log sigmoid(beta / |y_w| * log pi(y_w) - beta / |y_l| * log pi(y_l) - gamma)

    Defaults beta 2.0, gamma 1.0 (gamma / beta = 0.5), in the range the paper recommends. TRL's CPOTrainer with
    loss_type="simpo" (cpo_alpha 0) computes the same loss (tests/fixtures/make_trl_fixture.py)."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_reward = beta * pol_chosen / len_chosen.float()
    rejected_reward = beta * pol_rejected / len_rejected.float()
    losses = -F.logsigmoid(chosen_reward - rejected_reward - gamma)
    return losses.mean(), _metrics(chosen_reward, rejected_reward)


def sequential_kl(logits_ref, logits_pol, mask):
    """TDPO's sequential KL: sum over the response tokens of the full-vocabulary KL(pi_ref(. | prefix) ||
    pi(. | prefix)) = sum_v p_ref(v) (log p_ref(v) - log p(v)). logits (B, T, V) of the same positions (the ones
    that predict each response token), mask (B, T) -> (B,). In fp32, one row at a time (a (T, V) fp32 copy)."""
    out = []
    for ref_row, pol_row, m in zip(logits_ref, logits_pol, mask.bool()):
        logp_ref = F.log_softmax(ref_row.float(), -1)                          # (T, V)
        logp_pol = F.log_softmax(pol_row.float(), -1)
        kl = (logp_ref.exp() * (logp_ref - logp_pol)).sum(-1)                 # (T,)
        out.append(torch.where(m, kl, torch.zeros_like(kl)).sum())
    return torch.stack(out)


def summed_logps(model):
    """batch -> (B,) summed response log-probs under model (DPO's log pi(y|x))."""
    return lambda b: sequence_logps(response_logprobs(model, b), b["response_mask"])


def pair_logps_and_kl(model, ref_model, b: dict):
    """The policy's summed response log-probs (2k,) of a pair batch and, with a reference model (TDPO), each row's
    sequential KL(pi_ref || pi) over the full vocabulary (2k,), from the reference's logits of this micro-batch
    only (never a (B, T, V) cache of the data set)."""
    if ref_model is None:
        return summed_logps(model)(b), None
    P = b["prompt_len"]
    logits = model(b["input_ids"], b["attention_mask"])[:, P - 1:-1]
    logp = logprobs_from_logits(logits, b["input_ids"][:, P:])
    with torch.no_grad():
        ref_logits = ref_model(b["input_ids"], b["attention_mask"])[:, P - 1:-1]
    return (sequence_logps(logp, b["response_mask"]),
            sequential_kl(ref_logits, logits, b["response_mask"]))


def tdpo_loss(pol_chosen, pol_rejected, ref_chosen, ref_rejected, kl_chosen, kl_rejected, beta: float = 0.1,
              alpha: float = 0.5, variant: int = 2):
    """TDPO (Zeng et al. 2024, "Token-level Direct Preference Optimization", eqs. 19-20): DPO with the difference of
    the two responses' sequential KL divergences (sequential_kl, KL(pi_ref || pi) summed over tokens) subtracted:

        TDPO1: -log sigmoid(beta * (h - (KL_l - KL_w)))
        TDPO2: -log sigmoid(beta * (h - alpha * (KL_l - sg(KL_w))))      sg: stop-gradient on the chosen KL

    h as in dpo_loss. The implicit rewards reported are beta * (log-ratio + sequential KL), as the authors' code
    logs them. Defaults beta 0.1, alpha 0.5 (the paper's)."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if variant not in (1, 2):
        raise ValueError(f"TDPO variant is 1 or 2, got {variant}")
    h = (pol_chosen - ref_chosen) - (pol_rejected - ref_rejected)
    delta = kl_rejected - kl_chosen if variant == 1 else alpha * (kl_rejected - kl_chosen.detach())
    losses = -F.logsigmoid(beta * (h - delta))
    return losses.mean(), _metrics(beta * (pol_chosen - ref_chosen + kl_chosen),
                                   beta * (pol_rejected - ref_rejected + kl_rejected))


def pair_inputs(pol, kl, ref, lengths) -> dict:
    """preference_loss's inputs x for k pairs: pol (2k,) the policy's summed log-probs [chosen; rejected], kl (2k,)
    or None the sequential KL of the same rows, ref (k, 2) or None the reference's [chosen, rejected], lengths (k, 2)
    the response lengths in tokens."""
    k = pol.shape[0] // 2
    x = {"pol_chosen": pol[:k], "pol_rejected": pol[k:], "len_chosen": lengths[:, 0], "len_rejected": lengths[:, 1]}
    if ref is not None:
        x.update(ref_chosen=ref[:, 0].to(pol.dtype), ref_rejected=ref[:, 1].to(pol.dtype))
    if kl is not None:
        x.update(kl_chosen=kl[:k], kl_rejected=kl[k:])
    return x


@dataclass(frozen=True)
class Loss:
    """One row of train.py's --loss_type: the inputs it needs beyond the policy's summed log-probs (the reference's
    summed log-probs, response lengths, the sequential KL against the reference), whether its log-ratio to the
    reference is an implicit reward RTO can use as a token reward, and fn(x, hp) -> (loss, metrics), x as pair_inputs
    builds it, hp every DPOConfig field by name (a loss's own hyper-parameter is one field there)."""
    ref: bool
    lengths: bool
    kl: bool
    token_reward: bool
    fn: Callable
    reads: tuple = ()  # the DPOConfig fields fn reads beyond beta (a field set for another loss is warned about)


def _dpo(loss_type):
    return lambda x, hp: dpo_loss(x["pol_chosen"], x["pol_rejected"], x["ref_chosen"], x["ref_rejected"], hp["beta"],
                                  hp["label_smoothing"], loss_type)


def _tdpo(variant):
    return lambda x, hp: tdpo_loss(x["pol_chosen"], x["pol_rejected"], x["ref_chosen"], x["ref_rejected"],
                                   x["kl_chosen"], x["kl_rejected"], hp["beta"], hp["tdpo_alpha"], variant)


# Adding a preference loss is its function above plus one entry here (and a field in train.DPOConfig for any
# hyper-parameter of its own).
LOSSES = {
    "sigmoid": Loss(ref=True, lengths=False, kl=False, token_reward=True, fn=_dpo("sigmoid"),  # DPO (+ cDPO)
                    reads=("label_smoothing",)),
    "ipo": Loss(ref=True, lengths=False, kl=False, token_reward=True, fn=_dpo("ipo")),
    "rdpo": Loss(ref=True, lengths=True, kl=False, token_reward=True, fn=lambda x, hp: rdpo_loss(
        x["pol_chosen"], x["pol_rejected"], x["ref_chosen"], x["ref_rejected"], x["len_chosen"], x["len_rejected"],
        hp["beta"], hp["rdpo_alpha"]), reads=("rdpo_alpha",)),
    "simpo": Loss(ref=False, lengths=True, kl=False, token_reward=False, fn=lambda x, hp: simpo_loss(  # no reference
        x["pol_chosen"], x["pol_rejected"], x["len_chosen"], x["len_rejected"], hp["beta"], hp["simpo_gamma"]),
        reads=("simpo_gamma",)),
    "tdpo1": Loss(ref=True, lengths=False, kl=True, token_reward=True, fn=_tdpo(1)),
    "tdpo2": Loss(ref=True, lengths=False, kl=True, token_reward=True, fn=_tdpo(2), reads=("tdpo_alpha",)),
}


def preference_loss(loss_type: str, x: dict, hp: dict):
    """The loss of one batch of pairs, LOSSES[loss_type].fn(x, hp). Returns (loss, metrics) as dpo_loss does."""
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}: choose one of {', '.join(LOSSES)}")
    if loss_type not in ("sigmoid", "ipo") and hp.get("label_smoothing", 0.0) != 0.0:
        raise ValueError(f"label_smoothing applies to loss_type='sigmoid' only, not {loss_type!r}")
    return LOSSES[loss_type].fn(x, hp)
