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
import ppo as ppo_math
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
    model, None: either) and, when policy is given, shares the policy's tokenizer (tokenizer_identity)."""
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
        ours, theirs = tokenizer_identity(policy), tokenizer_identity(path)
        differ = [part for part in ours if ours[part] != theirs[part]]
        if differ:
            raise UserError(f"{Path(path) / 'tokenizer.json'} maps text to ids differently from "
                            f"{Path(policy) / 'tokenizer.json'} (--{flag} against --policy: their {', '.join(differ)} "
                            f"differ): every model of a PPO run must share the policy's tokenizer")


def tokenizer_identity(d: str) -> dict[str, str]:
    """What maps text to ids, as sha256 digests by part: tokenizer.json's normalizer, pre-tokenizer, model (vocabulary
    and merges) and added tokens, as the tokenizers library serialises them (so an older file's "a b" merges equal a
    newer file's ["a", "b"]), and which tokens the checkpoint calls bos/eos/unk (tokenizer_config.json)."""
    import hashlib

    import tokenizers

    from hf import NEW_PAD, SPECIAL_KEYS, read_json_file

    path = Path(d) / "tokenizer.json"
    check_input_file(path, "a tokenizer")
    try:
        tk = json.loads(tokenizers.Tokenizer.from_file(str(path)).to_str())
    except Exception as e:
        raise UserError(f"{path}: cannot be read ({e.__class__.__name__}: {str(e)[:100]})") from None
    config = read_json_file(Path(d) / "tokenizer_config.json") or {}
    # the pad only fills (and a pad token this project added, hf.NEW_PAD, is no text anyone writes): not compared
    added = [t for t in tk.get("added_tokens") or [] if not (isinstance(t, dict) and t.get("content") == NEW_PAD)]
    parts = {"normalizer": tk.get("normalizer"), "pre_tokenizer": tk.get("pre_tokenizer"), "model": tk.get("model"),
             "added_tokens": added, "special tokens": {k: config.get(k) for k in SPECIAL_KEYS if k != "pad_token"}}
    return {k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest() for k, v in parts.items()}


def saved_config(run: str) -> dict | None:
    """The train_config.json a checkpoint of this project carries (None for any other checkpoint)."""
    path = Path(run) / "train_config.json"
    if not check_regular(path, "a run's config"):
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{path}: not a readable config ({e.__class__.__name__}); the checkpoint is damaged") from None
    return saved if isinstance(saved, dict) else None


def check_implicit_reward(dpo_dir: str):
    """RTO's DPO term is log(pi_dpo / pi_ref): a model trained without a reference (SimPO) has no such implicit
    reward, and its log-ratio to the SFT model would be a number with no meaning. Refused, naming the run. What the
    model was trained with is read from its config.json (rto_loss_type, every export of `train.py dpo` says), else
    from the train_config.json beside it."""
    from hf import read_json_file

    config = read_json_file(Path(dpo_dir) / "config.json") or {}
    loss_type = config.get("rto_loss_type") or (saved_config(dpo_dir) or {}).get("loss_type", "sigmoid")
    if config.get("rto_implicit_reward") is False or (loss_type in dpo_math.LOSSES and
                                                      not dpo_math.LOSSES[loss_type].token_reward):
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
    elif started is not None and not same_start(dpo_dir, started, policy):
        why = (f"{dpo_dir} was trained from {started}, but --policy (pi_ref) is {policy}, so log(pi_dpo / pi_ref) is "
               f"not DPO's implicit reward")
    else:
        return
    fix = (f"keep --policy {started} (pi_ref) and start the actor elsewhere with --init" if started else
           "give --policy the model the DPO run started from, and the actor's start with --init")
    raise UserError(f"--dpo: {why}. To start PPO from another model, {fix}; to insist, pass --allow_ref_mismatch")


def same_start(dpo_dir: str, started: str, policy: str) -> bool:
    """The DPO run in dpo_dir started from the checkpoint at policy: by content where the run recorded it (its export's
    inputs.json: a moved or copied SFT model is still the same one), else by path."""
    recorded = Path(dpo_dir) / "inputs.json"
    if check_regular(recorded, "an export's record"):
        digest = json.loads(recorded.read_text()).get("checkpoints", {}).get("model")
        if digest is not None:
            return digest == checkpoint_digest(Path(policy))
    return Path(started).resolve() == Path(policy).resolve()


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


# ----------------------------------------------------------------------------------------------------------
# Files: a run reads and writes only regular files, never through a link


def check_input_file(path: Path, what: str) -> bool:
    """An input the run only reads (a data file, a file of a checkpoint it starts from) may be a link (a Hugging Face
    cache snapshot is all links), but what it leads to must be a regular file (True) or nothing (False): a named pipe
    would hang the run, a directory is a mistake."""
    import stat

    try:
        mode = Path(path).stat().st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(mode):
        kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "no file"
        raise UserError(f"{path} is {kind}, where {what} belongs")
    return True


_DIGESTS: dict = {}  # (path, size, mtime_ns) -> sha256, for this process: a file hashed once


def file_digest(path: Path) -> str:
    """sha256 of an input file (read through links)."""
    import hashlib

    check_input_file(path, "an input of this run")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def checkpoint_digest(d: Path) -> str:
    """A checkpoint's identity: its config.json, tokenizer files and weights. An export of this project lists its
    weights' digests in hf.CHECKSUMS (verified against the files whenever --reuse keeps it); any other checkpoint's
    weight files are hashed."""
    import hashlib

    from hf import CHECKSUMS

    d = Path(d)
    files = sorted(p for p in d.iterdir() if p.name in ("config.json", "tokenizer.json", "tokenizer_config.json",
                                                         "chat_template.jinja", CHECKSUMS))
    if not (d / CHECKSUMS).is_file():
        files += sorted(d.glob("*.safetensors"))
    return hashlib.sha256("".join(f"{p.name}:{file_digest(p)}\n" for p in files).encode()).hexdigest()


def check_regular(path: Path, what: str) -> bool:
    """path is a regular file (True) or nothing (False); anything else (a symbolic link, a named pipe, a directory, a
    device) is refused with its path and what it is, before it is opened: a link would be followed to a file of
    someone else's, a pipe would hang the run."""
    import stat

    try:
        mode = Path(path).lstat().st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISREG(mode):
        return True
    kind = ("a symbolic link" if stat.S_ISLNK(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else
            "a directory" if stat.S_ISDIR(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device file")
    raise UserError(f"{path} is {kind}, where {what} belongs: a run reads and writes only regular files it made; "
                    f"move it away")


# ----------------------------------------------------------------------------------------------------------
# Processes: every rank runs rank 0's config

# environment variables that change what a run computes or reports (a rank started with another of them would run
# another experiment than rank 0's)
SHAPING_ENV = ("RTO_DEBUG", "PYTHONHASHSEED", "CUBLAS_WORKSPACE_CONFIG", "NVIDIA_TF32_OVERRIDE", "OMP_NUM_THREADS",
               "MALLOC_MMAP_THRESHOLD_")


def check_ranks_agree(cfg):
    """Under torchrun, every rank's config and the environment that shapes it equal rank 0's, or every rank stops at
    once with one error naming the first field that differs and the ranks that differ (before any work: a rank with
    its own learning rate would update its shards differently, and train_config.json would record rank 0's)."""
    if D.world == 1:
        return
    import os

    import torch.distributed as dist

    from config import config_json

    mine = {**json.loads(config_json(cfg)), **{f"environment {k}": os.environ.get(k) for k in SHAPING_ENV},
            "torch version": torch.__version__}
    every = [None] * D.world
    dist.all_gather_object(every, mine)
    for key in sorted(set().union(*every)):
        ranks = [r for r, c in enumerate(every) if c.get(key) != every[0].get(key)]
        if ranks:
            field = key if key.startswith(("environment", "torch")) else f"--{key}"
            raise UserError(f"the ranks of this job disagree: {field} is {every[0].get(key)!r} on rank 0 but "
                            f"{every[ranks[0]].get(key)!r} on rank{'s' if len(ranks) > 1 else ''} "
                            f"{', '.join(map(str, ranks))}: start every rank with the same flags and environment")


# ----------------------------------------------------------------------------------------------------------
# Exports: a cast never makes an inf


def check_export_range(named: dict, dtype: torch.dtype):
    """named: HF name -> this rank's shard of each parameter. A weight beyond the largest value of the export dtype
    (fp16: 65504) would be written as inf: refused before any file is written, naming the first such tensor and its
    largest magnitude (the magnitudes are all-reduced, so every rank refuses together)."""
    if dtype.itemsize >= 4:
        return
    local = [t.to_local() if hasattr(t, "to_local") else t for t in named.values()]
    peaks = torch.tensor([float(t.detach().abs().max()) if t.numel() else 0.0 for t in local], dtype=torch.float64,
                         device=D.device)
    if D.world > 1:
        import torch.distributed as dist

        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    limit = torch.finfo(dtype).max
    over = [(name, float(p)) for name, p in zip(named, peaks.tolist()) if p > limit]
    if over:
        name, peak = over[0]
        raise UserError(f"--export_dtype {str(dtype).removeprefix('torch.')}: {name} holds values up to {peak:.6g}, "
                        f"beyond that dtype's largest ({limit:.6g}), so the file would hold inf ({len(over)} tensors "
                        f"do); export in bf16 or fp32 (--export_dtype bf16), nothing was written")


# ----------------------------------------------------------------------------------------------------------
# Fields: a value set for something this run does not do


def warn_unread(cfg, read: dict[str, bool], what: str):
    """read: field -> whether this run reads it. A field set away from its default that this run never reads (an
    R-DPO alpha under the sigmoid loss, a critic learning rate without a critic) is named in a warning."""
    from parallel import print0

    defaults = type(cfg)()
    for name, used in read.items():
        if not used and getattr(cfg, name) != getattr(defaults, name):
            print0(f"warning: --{name} {getattr(cfg, name)}: {what} never reads it")


def ppo_fields_read(cfg) -> dict[str, bool]:
    """The PPOConfig fields only some runs read, and whether this one does (checks.warn_unread)."""
    algo, est = rto.ALGOS[cfg.algo].needs, ppo_math.ESTIMATORS[cfg.estimator]
    dpo_term, rm = "logp_dpo" in algo, "rm_score" in algo
    return {"beta1": dpo_term, "dpo_clip": dpo_term, "delimiters": "delimiter_mask" in algo, "beta3": rm,
            "reward_clip": rm, "normalize_reward": rm, "lam": est.critic, "value_clip": est.critic,
            "critic_lr": est.critic, "grpo_eps": cfg.estimator == "grpo", "task_seed": bool(cfg.task)}


def check_loss_fields(cfg):
    """DPO's fields against its --loss_type: label smoothing is the sigmoid loss's alone (refused for another, which
    would refuse it only at its first step), and a field only another loss reads (dpo.Loss.reads) is warned about."""
    if cfg.label_smoothing and cfg.loss_type != "sigmoid":
        raise UserError(f"--label_smoothing {cfg.label_smoothing}: conservative DPO is the sigmoid loss's; --loss_type "
                        f"{cfg.loss_type} takes none")
    reads = dpo_math.LOSSES[cfg.loss_type].reads
    warn_unread(cfg, {f: f in reads for loss in dpo_math.LOSSES.values() for f in loss.reads},
                f"--loss_type {cfg.loss_type}")
