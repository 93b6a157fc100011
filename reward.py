"""Bradley-Terry reward model math: read the score at the last token, the pairwise loss, and the
score normalisation applied before the score enters the PPO reward.

Stage 3 of the pipeline (train.run_rm): a scalar head on the last (EOS) token, trained with
-log sigmoid(r(x, y_w) - r(x, y_l)), gives r_MLE.
"""

import torch
import torch.nn.functional as F


def last_token_index(attention_mask):
    """Index of the last position whose mask is 1. (B, T) 0/1 or bool -> (B,) long.

    Works for left padding, right padding and both, i.e. our [left-padded prompt | right-padded
    response] layout, where the last 1 is the EOS (or the last token of a truncated response).
    "Number of ones - 1" would be wrong as soon as there is left padding.
    """
    mask = attention_mask.bool()
    if not mask.any(-1).all():
        bad = (~mask.any(-1)).nonzero().flatten().tolist()
        raise ValueError(f"attention_mask rows {bad} are all zeros: no last token")
    T = mask.shape[-1]
    positions = torch.arange(T, device=mask.device).expand_as(mask)
    # The largest position that is set; padding positions count as -1.
    return torch.where(mask, positions, -1).max(-1).values


def gather_last(x, attention_mask):
    """x (B, T) -> (B,), the value of each row at its last_token_index."""
    return x.gather(-1, last_token_index(attention_mask).unsqueeze(-1)).squeeze(-1)


def sequence_scores(model, batch: dict):
    """The reward model's score of every row of a batch, read at its last real token (the EOS of a complete
    response): model(ids, mask) -> (B, T) scores -> (B,) fp32."""
    return gather_last(model(batch["input_ids"], batch["attention_mask"]).float(), batch["attention_mask"])


def bt_loss(r_chosen, r_rejected):
    """Bradley-Terry loss mean(-log sigmoid(r_chosen - r_rejected)), inputs (B,).
    Returns (loss, metrics): detached scalar tensors accuracy (fraction with r_chosen > r_rejected)
    and margin (mean r_chosen - r_rejected)."""
    diff = r_chosen - r_rejected
    loss = -F.logsigmoid(diff).mean()
    metrics = {"accuracy": (diff > 0).float().mean(), "margin": diff.mean()}
    return loss, {k: v.detach() for k, v in metrics.items()}


def normalize_score(score, mean: float, std: float, clip: float):
    """(score - mean) / std, clamped to [-clip, clip]. score (B,) -> (B,).

    mean and std are measured on the reward model's eval set and stored with it (the reference
    code's --normalize_reward); pass mean=0, std=1 to only clamp. The reference code clamps the RM
    score to +-10; here the clamp is an explicit argument, and there is no "0 means off".
    """
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    return ((score - mean) / std).clamp(-clip, clip)
