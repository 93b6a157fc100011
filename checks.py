"""The checks that stop a run before it goes wrong: a user's mistake as one line (UserError), non-finite numbers at
every step, weights and outputs before every save, and the checkpoints of a run against each other before any
weight is read (the right kind, one tokenizer, RTO's pi_ref the model DPO started from).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

import dpo as dpo_math
import rto
from parallel import D, all_sum


class UserError(ValueError):
    """A mistake in the command line, the data or a checkpoint: the command line prints its message, not a
    traceback."""


class NonFiniteError(UserError):
    """A loss, reward, advantage or gradient norm that is NaN or infinite: the run stops before it is saved."""


# ----------------------------------------------------------------------------------------------------------
# Numbers


def check_finite(step, values: dict):
    """Stop the run at the first non-finite quantity, on every rank at once (one all-reduced flag per quantity),
    naming it and the step. Called before the optimizer step, so no checkpoint or export holds the bad state."""
    names = list(values)
    bad = torch.tensor([0.0 if bool(torch.isfinite(torch.as_tensor(values[n])).all()) else 1.0 for n in names],
                       dtype=torch.float64)
    bad = all_sum(bad)
    if bad.any():
        which = [n for n, b in zip(names, bad.tolist()) if b]
        raise NonFiniteError(f"step {step}: {', '.join(which)} not finite (NaN or inf); the run stops here, and no "
                             f"checkpoint or export holds this state (lower the learning rate or the reward scale, "
                             f"or look at the inputs)")


def finite_flag(ok: bool) -> torch.Tensor:
    """A yes/no check as the value check_finite tests (a bool tensor is always "finite")."""
    return torch.tensor(0.0 if ok else float("nan"))


def check_weights(step, models: dict):
    """Before a checkpoint or an export: every weight finite (a finite gradient times a huge learning rate can still
    overflow a weight). Each rank checks its shards; the flags are all-reduced."""
    check_finite(step, {f"{name} weights": finite_flag(all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local")
                                                                                else p).all()) for p in m.parameters()))
                        for name, m in models.items()})


def check_outputs(step, models: dict):
    """Before a checkpoint or an export: one forward pass of each model on a fixed batch (the ids 0..15) must give
    finite logits or scores. Finite weights can still overflow on the way (a learning rate of 1e30 leaves every
    weight finite and every logit inf), and no other check looks at outputs. Called on every rank (FSDP)."""
    flags = {}
    for name, m in models.items():
        ids = (torch.arange(min(16, m.args.max_seq_len), device=D.device) % m.args.vocab_size)[None]
        was_training = m.training
        m.eval()
        with torch.no_grad():
            flags[f"{name} outputs"] = finite_flag(bool(torch.isfinite(m(ids)).all()))
        m.train(was_training)
    check_finite(step, flags)


# ----------------------------------------------------------------------------------------------------------
# Batches


def check_batch(cfg, n: int, batch_size: int, what: str) -> int:
    """Validate the batch arithmetic once, with errors that say which numbers do not fit. Returns steps."""
    if batch_size % D.world:
        raise UserError(f"batch_size {batch_size} is not divisible by the {D.world} processes")
    if (batch_size // D.world) % cfg.micro_batch_size:
        raise UserError(f"per-rank batch {batch_size // D.world} is not divisible by micro_batch_size "
                        f"{cfg.micro_batch_size}")
    if n < batch_size:
        raise UserError(f"{what}: {n} examples are fewer than one batch of {batch_size}")
    return cfg.max_steps or cfg.epochs * (n // batch_size)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints against each other, from their small files alone


def check_slot(path: str, flag: str, want: str | None, policy: str | None = None):
    """Before any weights are read: the checkpoint at --flag is the right kind (want "lm": a policy, "score": a reward
    model, None: either) and, when policy is given, speaks the policy's vocabulary (same tokens, same ids)."""
    import tokenizers

    from hf import read_json_file

    cfg = read_json_file(Path(path) / "config.json")
    if cfg is None:
        raise UserError(f"--{flag} {path}: no config.json (expected a Hugging Face checkpoint directory)")
    arch = (cfg.get("architectures") or ["?"])[0]
    kind = "score" if arch.endswith("ForSequenceClassification") else "lm"
    if want is not None and kind != want:
        what = {"lm": "a causal LM (a policy)", "score": "a reward model (train.py rm writes one)"}
        raise UserError(f"--{flag} {path} is a {arch}, {what[kind]}; --{flag} takes {what[want]}")
    if policy is not None:
        vocab = {}
        for d in (policy, path):
            try:
                vocab[d] = tokenizers.Tokenizer.from_file(str(Path(d) / "tokenizer.json")).get_vocab(True)
            except Exception as e:
                raise UserError(f"{Path(d) / 'tokenizer.json'}: cannot be read ({e})") from None
        if vocab[policy] != vocab[path]:
            differ = len(set(vocab[policy].items()) ^ set(vocab[path].items()))
            raise UserError(f"--{flag} {path} has another tokenizer than --policy {policy} ({differ} token/id pairs "
                            f"differ): every model of a PPO run must share the policy's vocabulary")


def saved_config(run: str) -> dict | None:
    """The train_config.json a checkpoint of this project carries (None for any other checkpoint)."""
    path = Path(run) / "train_config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def check_implicit_reward(dpo_dir: str):
    """RTO's DPO term is log(pi_dpo / pi_ref): a model trained without a reference (SimPO) has no such implicit
    reward, and its log-ratio to the SFT model would be a number with no meaning. Refused, naming the run."""
    loss_type = (saved_config(dpo_dir) or {}).get("loss_type", "sigmoid")
    if loss_type in dpo_math.LOSSES and not dpo_math.LOSSES[loss_type].token_reward:
        raise UserError(f"--dpo {dpo_dir} was trained with loss_type {loss_type!r}, which has no reference model: its "
                        f"log-ratio to pi_ref is no implicit reward, so it gives RTO no token reward; use a run of "
                        f"sigmoid (DPO), ipo, rdpo or tdpo")


def check_reference(policy: str, dpo_dir: str | None, allow_mismatch: bool):
    """pi_ref (--policy) is what the KL term keeps pi near, and RTO's token reward log(pi_dpo / pi_ref) is DPO's
    implicit reward only when pi_ref is the model the DPO run started from. Refused, each with the fix: a --policy that
    is itself a DPO run's model (pi would be kept near the DPO model, and RTO's reward would be 0 on every token with
    it as --dpo too), the same directory as --dpo, and a --dpo trained from another model. dpo_dir: None when the
    algorithm has no DPO term."""
    trained_as = saved_config(policy) or {}
    if trained_as.get("stage") == "DPOConfig" and not allow_mismatch:
        start = trained_as.get("model") or "the SFT model"
        raise UserError(f"--policy {policy} is a DPO model (its train_config.json): pi_ref, the model the KL term keeps "
                        f"pi near" + (" and the reference of RTO's DPO reward," if dpo_dir else ",") + f" would be the "
                        f"DPO model, not the SFT model it started from. To start PPO from the DPO model, keep --policy "
                        f"{start} and pass --init {policy}; to insist, pass --allow_ref_mismatch")
    if dpo_dir is None or allow_mismatch:
        return
    started = (saved_config(dpo_dir) or {}).get("model")
    if Path(dpo_dir).resolve() == Path(policy).resolve():
        why = "--policy is the DPO model itself, so log(pi_dpo / pi_ref) is 0 on every token"
    elif started is not None and Path(started).resolve() != Path(policy).resolve():
        why = (f"{dpo_dir} was trained from {started}, but --policy (pi_ref) is {policy}, so log(pi_dpo / pi_ref) is "
               f"not DPO's implicit reward")
    else:
        return
    fix = (f"keep --policy {started} (pi_ref) and start the actor elsewhere with --init" if started else
           "give --policy the model the DPO run started from, and the actor's start with --init")
    raise UserError(f"--dpo: {why}. To start PPO from another model, {fix}; to insist, pass --allow_ref_mismatch")


def check_ppo_checkpoints(cfg, slots: dict):
    """Before any weights are read: each checkpoint is the right kind and speaks the policy's vocabulary, pi_ref is no
    DPO model, and the DPO model of RTO's token reward has an implicit reward relative to pi_ref."""
    check_slot(cfg.policy, "policy", "lm")
    for flag, want in (("init", "lm"), ("dpo", "lm"), ("rm", "score"), ("critic", None)):
        if getattr(cfg, flag) and (flag in slots or flag in ("init", "critic")):
            check_slot(getattr(cfg, flag), flag, want, policy=cfg.policy)
    dpo_term = "logp_dpo" in rto.ALGOS[cfg.algo].needs  # the DPO token reward (not --kl_anchor dpo alone)
    if dpo_term:
        check_implicit_reward(cfg.dpo)
    check_reference(cfg.policy, cfg.dpo if dpo_term else None, cfg.allow_ref_mismatch)


def rm_score_stats(cfg, rm_model) -> tuple[float, float]:
    """(mean, std) that r_MLE is normalised with: the RM's own held-out statistics (reference --normalize_reward)."""
    if rm_model is None or not cfg.normalize_reward:
        return 0.0, 1.0
    mean, std = rm_model.args.score_mean, rm_model.args.score_std
    if std is None:
        raise UserError(f"{cfg.rm}/config.json has no rto_score_mean/rto_score_std: train it with "
                        f"`train.py rm`, or pass --no-normalize_reward")
    if not (math.isfinite(std) and std > 0 and math.isfinite(mean)):
        raise UserError(f"{cfg.rm}/config.json: field 'rto_score_std' is {std} (mean {mean}): the RM "
                        f"gave every held-out response the same score, so normalising by it is meaningless; "
                        f"retrain the RM or pass --no-normalize_reward")
    return mean, std
