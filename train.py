"""The loops of the RTO pipeline, SFT -> DPO -> Bradley-Terry reward model -> PPO with the dense token reward, and
their configs. The same file runs as one process or as N under torchrun (FSDP2: nccl on GPUs, gloo on CPUs):

    python train.py                                  # every stage on the built-in task, then a results table
    python train.py all --model DIR --sft_data sft.jsonl --prefs prefs.jsonl --prompts prompts.jsonl --algos ppo,rto
    torchrun --nproc_per_node=8 train.py all --model DIR ... --bf16      # the same on 8 GPUs
    python train.py sft --data sft.jsonl --model path/to/Llama-3.2-1B --out runs/sft
    python train.py dpo --data prefs.jsonl --model runs/sft/final --out runs/dpo
    python train.py rm  --data prefs.jsonl --model runs/sft/final --out runs/rm
    python train.py ppo --algo rto --prompts prompts.jsonl --policy runs/sft/final \\
                        --dpo runs/dpo/final --rm runs/rm/final --out runs/rto
    torchrun --nproc_per_node=8 train.py ppo ...    # any stage, N processes
    python train.py sample --model runs/rto/final --prompt "Why is the sky blue?"
    python train.py ppo --help                      # every field of a stage's config, with its default

Each stage reads JSONL data (data.py) and Hugging Face checkpoints, writes `<out>/final` as a complete HF checkpoint,
one JSON line per step to `<out>/metrics.jsonl`, and with --save_every N a resumable checkpoint (--resume). The math
is in rto.py, ppo.py, dpo.py and reward.py; `all` in pipeline.py; `sample` and `explain` in explain.py.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

import cli
import dpo as dpo_math
import hf
import ppo as ppo_math
import reward as rm_math
import rto
from checkpoint import export_hf, latest_checkpoint, load_checkpoint, open_model, open_tokenizer, save_checkpoint
from checks import (UserError, check_batch, check_finite, check_loss_fields, check_ppo_checkpoints, check_slot,
                    ppo_fields_read, rm_score_stats, warn_unread)
from config import (COUNT, NONNEG, POS, UNIT, Bf16Field, DeviceField, RunDirFields, SamplingFields, SeedField,
                    TaskFields, check_range, option)
from data import (batch_indices, check_context, check_pairs, chunks, collate, encode_examples, global_batch, pad_left,
                  pair_batch, pair_values, read_preferences, read_prompts, read_sft, response_texts, seed_for)
from hf import Tokenizer
from memory import checkpoint_plan, measured_memory, plan_text, reference_cost
from model import Llama, generate, release_compiled
from parallel import D, all_max, all_sum, decode_view, print0, progress, reduce_metrics, to_device
from rundir import INPUTS, Logger, promote_records, recorded_inputs, start_run, write_json
from task import load_task


# ==========================================================================================================
# Configs: one dataclass per stage, every constant that shapes a result a field, declared once (config.option:
# the help --help shows and the range checked at start). Fields all four stages share come first.


@dataclass
class Config(SeedField, DeviceField, Bf16Field, RunDirFields):
    """Fields shared by every training stage."""
    out: str = option("runs/run", "run directory: train_config.json, metrics.jsonl, checkpoints/, final/")
    activation_checkpointing: bool = option(False, "recompute each transformer block in backward to save memory")
    lr: float = option(1e-5, "peak learning rate (cosine schedule)", POS)
    warmup_ratio: float = option(0.03, "fraction of steps of linear warm-up (reference code: 3%)", UNIT)
    min_lr_ratio: float = option(0.1, "the cosine decays to min_lr_ratio * lr (reference code: 0.1)", UNIT)
    weight_decay: float = option(0.0, "AdamW weight decay (reference code: 0)", NONNEG)
    adam_beta1: float = option(0.9, "Adam beta1", "[0, 1)")
    adam_beta2: float = option(0.95, "Adam beta2 (reference code: 0.95)", "[0, 1)")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (reference code: 1.0)", POS)
    batch_size: int = option(32, "examples per optimizer step, over all ranks", COUNT)
    micro_batch_size: int = option(8, "examples per forward pass on one rank (accumulated up to the batch)", COUNT)
    epochs: int = option(1, "passes over the data", COUNT)
    max_steps: int = option(0, "stop after this many optimizer steps (0: run the epochs)", NONNEG)
    max_prompt_len: int = option(256, "prompt tokens kept (a longer prompt loses the middle of its longest message)",
                                 "[2, inf)")
    max_response_len: int = option(256, "response tokens kept (the START of a longer response; a cut one has no EOS)",
                                   COUNT)
    save_every: int = option(0, "write a resumable checkpoint every N steps (0: only the final HF export)", NONNEG)
    resume: bool = option(False, "continue from the latest complete checkpoint in <out>/checkpoints (its config must "
                                 "match, but for rundir.RESUME_MAY_CHANGE)")
    export_dtype: str = option("auto", "dtype of final/'s weights: auto (the input checkpoint's; fp32 for a new model) | "
                                       "fp32 | bf16 | fp16", choices=("auto", "fp32", "bf16", "fp16"))
    offload_frozen: bool = option(False, "keep frozen models' shards in host memory between forwards (FSDP2 CPU "
                                         "offload; with several processes or --bf16)")


@dataclass
class SFTConfig(Config):
    data: str = option("", "SFT JSONL: {prompt, response} or {messages} rows")
    model: str = option("", "HF-format checkpoint directory to start from (with tokenizer.json); empty: a new model")
    preset: str = option("tiny", "model.py preset for a NEW model, used only when --model is empty")
    tokenizer: str = option("", "directory holding tokenizer.json, when --model is empty")
    out: str = option("runs/sft", "run directory")


@dataclass
class PairsConfig(Config):
    """What DPO and the reward model both read: preference pairs and the SFT checkpoint they start from."""
    data: str = option("", "preference JSONL: {prompt, chosen, rejected} rows")
    eval_data: str = option("", "held-out preference JSONL: accuracy (and for the RM the score mean/std stored for "
                                "PPO); optional")
    model: str = option("", "the SFT checkpoint to start from (with tokenizer.json)")


@dataclass
class DPOConfig(PairsConfig):
    out: str = option("runs/dpo", "run directory")
    lr: float = option(5e-7, "peak learning rate", POS)
    loss_type: str = option("sigmoid", f"the preference loss, a row of dpo.LOSSES: {' | '.join(dpo_math.LOSSES)} "
                                       f"(sigmoid: DPO)", choices=tuple(dpo_math.LOSSES))
    beta: float = option(0.1, "DPO beta: strength of the KL anchor to the reference (the SFT model); SimPO's reward "
                              "scale (its paper: 2.0-2.5)", POS)
    label_smoothing: float = option(0.0, "conservative DPO: assumed fraction of flipped labels (0 = plain DPO)",
                                    "[0, 0.5)")
    rdpo_alpha: float = option(0.05, "rdpo: weight of the length margin alpha * (|y_w| - |y_l|), in tokens", NONNEG)
    simpo_gamma: float = option(1.0, "simpo: target reward margin gamma (its paper: gamma / beta about 0.5)", NONNEG)
    tdpo_alpha: float = option(0.5, "tdpo2: weight of the sequential-KL difference (its paper: 0.5)", NONNEG)


@dataclass
class RMConfig(PairsConfig):
    out: str = option("runs/rm", "run directory")
    lr: float = option(9e-6, "peak learning rate", POS)


@dataclass
class PPOConfig(Config, SamplingFields, TaskFields):
    prompts: str = option("", "prompt JSONL: {prompt} or {messages} rows")
    algo: str = option("rto", f"the token reward, a row of rto.ALGOS: {' | '.join(rto.ALGOS)}", choices=tuple(rto.ALGOS))
    policy: str = option("", "the SFT checkpoint: pi_ref (the KL anchor, the reference of RTO's DPO reward) and, "
                             "unless --init, the actor's start")
    init: str = option("", "the checkpoint the actor starts from ('': --policy), e.g. the DPO model")
    dpo: str = option("", "the DPO checkpoint, for the algorithms that need logp_dpo, and for --kl_anchor dpo")
    allow_ref_mismatch: bool = option(False, "accept a --policy that is a DPO model, or a --dpo model that did not "
                                             "start from --policy (its log-ratio to pi_ref is then no implicit reward)")
    rm: str = option("", "the reward model checkpoint, for the algorithms that need rm_score (ppo, rto, semi-rto)")
    critic: str = option("", "critic init (default: --rm, as the reference code does; else --policy + a new head)")
    out: str = option("runs/ppo", "run directory")
    lr: float = option(5e-7, "actor peak learning rate", POS)
    critic_lr: float = option(9e-6, "critic peak learning rate", POS)
    batch_size: int = option(32, "responses per minibatch (one optimizer step), over all ranks", COUNT)
    rollout_batch_size: int = option(64, "responses per rollout (prompts x samples_per_prompt), over all ranks", COUNT)
    ppo_epochs: int = option(1, "passes over each rollout (reference code: 1)", COUNT)
    estimator: str = option("gae", f"advantages, a row of ppo.ESTIMATORS: {' | '.join(ppo_math.ESTIMATORS)} (gae, the "
                                   f"paper's, has a critic)", choices=tuple(ppo_math.ESTIMATORS))
    samples_per_prompt: int = option(1, "responses sampled per prompt in a rollout (k; the group estimators need "
                                        ">= 2); rollout_batch_size and batch_size count responses", COUNT)
    whiten_advantages: bool | None = option(None, "whiten advantages over the whole rollout, all ranks (default: the "
                                                  "estimator's own choice, ppo.ESTIMATORS: gae and reinforce++ yes)")
    grpo_eps: float = option(1e-4, "grpo: added to the group's std before dividing (TRL's 1e-4)", POS)
    kl_anchor: str = option("sft", "the model the KL penalty keeps pi near: sft (reference code; pi_ref) | dpo "
                                   "(needs --dpo)", choices=("sft", "dpo"))
    beta1: float = option(0.05, "RTO: scale of the DPO token reward log(pi_dpo/pi_ref) (reference: 0.05)", POS)
    dpo_clip: float = option(0.05, "RTO: clip each DPO token reward to +-this (reference: 0.05; inf: no clip)",
                             "(0, inf]")
    beta2: float = option(0.01, "KL coefficient: -beta2 * KL(pi || pi_ref) per token (reference: 0.01)", NONNEG)
    beta3: float = option(1.0, "weight of the reward model score on the last token", NONNEG)
    kl_estimator: str = option("k1", "per-token KL estimator: k1 (reference) | k3", choices=("k1", "k3"))
    gamma: float = option(1.0, "GAE discount (reference: 1)", UNIT)
    lam: float = option(0.95, "GAE lambda (reference: 0.95)", UNIT)
    clip_eps: float = option(0.2, "PPO ratio clip (reference: 0.2)", POS)
    value_clip: float = option(0.2, "value clip around the rollout values (reference: 0.2)", POS)
    entropy_coef: float = option(0.0, "entropy bonus: the policy loss minus this x the mean entropy (reference: 0)",
                                 NONNEG)
    reward_clip: float = option(10.0, "clamp the normalised RM score to +-this (reference: 10)", POS)
    normalize_reward: bool = option(True, "(score - mean) / std with the mean/std stored in the RM checkpoint")
    no_eos_penalty: float = option(1.0, "subtracted on the last token of a response cut by max_response_len, in units "
                                        "of the normalised score (our addition: the reference code has no such term)",
                                   NONNEG)
    delimiters: str = option(".,;:!?\n", "semi-rto: a token whose text holds one of these ends a segment")
    plan: bool = option(False, "print the memory plan per GPU from the checkpoints' config.json, and exit")
    plan_world: int = option(0, "the number of GPUs to plan for (0: this run's processes)", NONNEG)
    max_response_len: int = option(128, "max new tokens per response", COUNT)


# ==========================================================================================================
# Shared pieces of the loops


def make_optimizer(model, lr: float, cfg: Config, total_steps: int):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay,
                            foreach=D.world == 1 and not cfg.bf16)
    warmup = max(1, math.ceil(cfg.warmup_ratio * total_steps))

    def lr_lambda(step):  # linear warm-up, then cosine from 1 down to min_lr_ratio (reference schedule)
        if step < warmup:
            return (step + 1) / warmup
        done = (step - warmup) / max(1, total_steps - warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def clip_and_step(model, opt, sched, max_norm: float, step: int, checks: dict) -> float:
    """Clip, check that the gradient norm and the given losses are finite (on every rank), then step: a NaN stops
    the run here, before the weights take it (checks.check_finite)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    check_finite(step, {**checks, "grad_norm": norm})
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


def set_grad_sync(model, on: bool):
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP: reduce-scatter once, after a batch's last micro-batch
        model.set_requires_gradient_sync(on)


def resume(cfg: Config, run_dir, models: dict, optims: dict, scheds: dict) -> int:
    """--resume: restore the latest checkpoint's state in place; returns the step to continue from (0: a fresh run)."""
    if not (cfg.resume and (ckpt := latest_checkpoint(run_dir)) is not None):
        return 0
    start = load_checkpoint(ckpt, models, optims, scheds)
    print0(f"resumed from {ckpt} at step {start}")
    return start


def export(model, tok: Tokenizer, run_dir, cfg):
    """The trained model as <out>/final, a complete HF checkpoint (a DPO-stage one says in its config.json which loss
    made it, and whether that leaves an implicit reward); then the run's records are its own."""
    loss = getattr(cfg, "loss_type", None)
    model.args.loss_type, model.args.implicit_reward = loss, dpo_math.LOSSES[loss].token_reward if loss else None
    export_hf(model, tok, run_dir / "final", cfg, {INPUTS: recorded_inputs(run_dir)})  # (what --reuse checks)
    promote_records(run_dir)
    return run_dir / "final"


# ==========================================================================================================
# SFT, DPO and the reward model share one loop: batches of examples, a loss summed over "units" (response
# tokens for SFT, pairs for DPO and the RM), normalised by the global number of units in the batch.


def fit(cfg: Config, run_dir, model: Llama, n: int, units, loss_fn, keys: list[str]) -> int:
    """Train `model` for the configured steps. units(i) -> how many loss units example i holds; loss_fn(idx)
    -> (loss summed over the units of examples idx, {metric: sum over the same units}, tokens). Returns steps run."""
    total = check_batch(cfg, n, cfg.batch_size, cfg.out)
    opt, sched = make_optimizer(model, cfg.lr, cfg, total)
    start = resume(cfg, run_dir, {"model": model}, {"model": opt}, {"model": sched})
    logger = Logger(run_dir, start, keys)
    bar = progress(total, start, cfg.progress, cfg.out)
    model.train()
    for step in range(start, total):
        t0 = time.perf_counter()
        idx = batch_indices(step, n, cfg.batch_size, cfg.seed)
        local_units = sum(units(i) for i in idx)
        global_units = float(all_sum(torch.tensor(float(local_units))))
        sums, tokens = {}, 0
        micro = chunks(idx, cfg.micro_batch_size)
        for k, mb in enumerate(micro):
            set_grad_sync(model, k == len(micro) - 1)
            loss_sum, metric_sums, n_tok = loss_fn(mb)
            # FSDP averages gradients over ranks, so scale by world: the result is the global per-unit mean
            (loss_sum * D.world / global_units).backward()
            for key, v in {"loss": loss_sum.detach(), **metric_sums}.items():
                sums[key] = sums.get(key, 0.0) + float(v)
            tokens += n_tok
        metrics = reduce_metrics(sums, local_units)
        metrics["grad_norm"] = clip_and_step(model, opt, sched, cfg.grad_clip, step + 1, {"loss": sums["loss"]})
        metrics["lr"] = sched.get_last_lr()[0]
        metrics["tokens_per_s"] = float(all_sum(torch.tensor(float(tokens)))) / (time.perf_counter() - t0)
        logger.log(step + 1, metrics)
        bar.update(1)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
            save_checkpoint(run_dir, step + 1, {"model": model}, {"model": opt}, {"model": sched}, cfg)
    bar.close()
    return total


def load_tokenizer(cfg: Config) -> Tokenizer:
    src = cfg.model or getattr(cfg, "tokenizer", "")
    if not src:
        raise UserError("give --model (a checkpoint with tokenizer.json)"
                        + (" or --tokenizer for a new model" if hasattr(cfg, "tokenizer") else ""))
    return open_tokenizer(src)


def run_sft(cfg: SFTConfig):
    run_dir = start_run(cfg)
    if cfg.model:
        check_slot(cfg.model, "model", "lm")
    tok = load_tokenizer(cfg)
    rows = read_sft(cfg.data)
    data = encode_examples(rows, tok, cfg.max_prompt_len, cfg.max_response_len, lambda r: [r.response])
    model = open_model(cfg.model, "lm", cfg, tok)
    check_context(rows, data, model.args.max_seq_len)
    print0(f"{len(data)} SFT examples, model {model.num_params() / 1e6:.2f}M parameters")

    def loss_fn(idx):
        b = to_device(collate([data[i][0] for i in idx], [data[i][1] for i in idx], tok.pad_id))
        logp = ppo_math.response_logprobs(model, b)
        loss_sum = -ppo_math.masked_sum(logp, b["response_mask"])  # next-token NLL of response tokens only
        return loss_sum, {}, int(b["attention_mask"].sum())

    fit(cfg, run_dir, model, len(data), lambda i: len(data[i][1]), loss_fn, ["loss", "grad_norm", "tokens_per_s"])
    return export(model, tok, run_dir, cfg)


# ----------------------------------------------------------------------------------------------------------
# DPO and the reward model: preference pairs, [chosen rows; rejected rows] in one batch (one forward pass)


def load_pairs(cfg: PairsConfig):
    """DPO's and the RM's data: the tokenizer, the training pairs (checked) and the held-out pairs, as id triples."""
    if not cfg.model:
        raise UserError("give --model (the SFT checkpoint, with tokenizer.json)")
    tok = load_tokenizer(cfg)
    context = hf.read_config(cfg.model).max_seq_len

    def encode(rows):
        return encode_examples(rows, tok, cfg.max_prompt_len, cfg.max_response_len, lambda r: [r.chosen, r.rejected])

    rows = read_preferences(cfg.data)
    pairs = encode(rows)
    check_pairs(rows, pairs, cfg.data)
    check_context(rows, pairs, context)
    eval_rows = read_preferences(cfg.eval_data) if cfg.eval_data else []
    eval_pairs = encode(eval_rows)
    check_context(eval_rows, eval_pairs, context)  # held-out rows as strictly as training rows (the RM's score std)
    return tok, pairs, eval_pairs


def reference_logps(cfg: DPOConfig, model, pairs, tok: Tokenizer) -> torch.Tensor:
    """(n, 2) summed log-probs of every pair the run will train on under the starting model, the reference: all of
    them for a whole epoch, only those of its batches for a --max_steps run (NaN for the others, never read)."""
    steps = check_batch(cfg, len(pairs), cfg.batch_size, cfg.out)
    used = sorted({i for s in range(steps) for i in global_batch(s, len(pairs), cfg.batch_size, cfg.seed)})
    ref = torch.full((len(pairs), 2), float("nan"), dtype=torch.float64, device=D.device)
    ref[used] = pair_values(dpo_math.summed_logps(model), [pairs[i] for i in used], tok, cfg.micro_batch_size,
                            f"{cfg.out}: reference log-probs" if cfg.progress else "")
    return ref


def run_dpo(cfg: DPOConfig):
    run_dir = start_run(cfg)
    check_slot(cfg.model, "model", "lm")
    tok, pairs, eval_pairs = load_pairs(cfg)
    needs = dpo_math.LOSSES[cfg.loss_type]
    check_loss_fields(cfg)
    model = open_model(cfg.model, "lm", cfg, tok)
    # The reference is the starting (SFT) model itself: its log-probs are computed once, before the first step, so no
    # frozen copy has to stay in memory (a resumed run's --model is still the SFT checkpoint). TDPO also needs the
    # reference's whole distribution at every token while training: only then it stays loaded (frozen, bf16 under
    # --bf16), one micro-batch of its logits at a time. SimPO has no reference at all.
    ref_model = open_model(cfg.model, "lm", cfg, tok, frozen=True) if needs.kl else None
    if ref_model is not None:
        print0(reference_cost(ref_model.args, cfg))
    model.eval()
    ref = reference_logps(cfg, model, pairs, tok) if needs.ref else None
    ref_eval = pair_values(dpo_math.summed_logps(model), eval_pairs, tok, cfg.micro_batch_size) if needs.ref and eval_pairs \
        else None
    hp = dataclasses.asdict(cfg)  # beta, label_smoothing and each loss's own fields, read by name (dpo.LOSSES)
    print0(f"{len(pairs)} preference pairs; loss {cfg.loss_type}" + ("; reference log-probs computed" if needs.ref
                                                                     else " (reference-free)"))

    def loss_fn(idx):
        b = pair_batch([pairs[i] for i in idx], tok)
        pol, kl = dpo_math.pair_logps_and_kl(model, ref_model, b)
        lengths = b["response_mask"].sum(-1).view(2, -1).T  # (k, 2) response tokens, EOS included
        x = dpo_math.pair_inputs(pol, kl, ref[idx] if ref is not None else None, lengths)
        loss, m = dpo_math.preference_loss(cfg.loss_type, x, hp)
        return loss * len(idx), {key: v * len(idx) for key, v in m.items()}, int(b["attention_mask"].sum())

    fit(cfg, run_dir, model, len(pairs), lambda i: 1, loss_fn,
        ["loss", "accuracy", "chosen_reward", "rejected_reward", "margin", "grad_norm", "tokens_per_s"])
    if eval_pairs:  # the implicit reward of the loss itself on held-out pairs: how often it ranks them right
        model.eval()
        pol = pair_values(dpo_math.summed_logps(model), eval_pairs, tok, cfg.micro_batch_size)
        kl = (pair_values(lambda b: dpo_math.pair_logps_and_kl(model, ref_model, b)[1], eval_pairs, tok, cfg.micro_batch_size)
              if needs.kl else None)
        lengths = torch.tensor([[len(c), len(r)] for _, c, r in eval_pairs], device=pol.device)
        x = dpo_math.pair_inputs(torch.cat([pol[:, 0], pol[:, 1]]),
                                 None if kl is None else torch.cat([kl[:, 0], kl[:, 1]]), ref_eval, lengths)
        _, m = dpo_math.preference_loss(cfg.loss_type, x, hp)
        result = {"eval_accuracy": m["accuracy"].item(), "eval_margin": m["margin"].item()}
        print0(f"DPO ({cfg.loss_type}) held-out implicit-reward accuracy {result['eval_accuracy']:.3f}")
        write_json(run_dir / "eval.json", result)
    ref_model = None  # the frozen reference (TDPO) is freed before the export
    return export(model, tok, run_dir, cfg)


def run_rm(cfg: RMConfig):
    run_dir = start_run(cfg)
    check_slot(cfg.model, "model", None)  # a policy (a new head) or a reward model to train further
    tok, pairs, eval_pairs = load_pairs(cfg)
    model = open_model(cfg.model, "score", cfg, tok)

    def loss_fn(idx):
        b = pair_batch([pairs[i] for i in idx], tok)
        r, k = rm_math.sequence_scores(model, b), len(idx)
        loss, m = rm_math.bt_loss(r[:k], r[k:])
        return loss * k, {key: v * k for key, v in m.items()}, int(b["attention_mask"].sum())

    fit(cfg, run_dir, model, len(pairs), lambda i: 1, loss_fn, ["loss", "accuracy", "margin", "grad_norm",
                                                                 "tokens_per_s"])
    # Score statistics for PPO's reward normalisation, on held-out pairs when given (else on the training
    # pairs, which the RM has fit: say so), stored in the checkpoint's config.json (rto_score_mean/std).
    model.eval()
    held = eval_pairs or pairs
    r = pair_values(lambda b: rm_math.sequence_scores(model, b), held, tok, cfg.micro_batch_size)
    model.args.score_mean, model.args.score_std = r.mean().item(), r.flatten().std().item()
    result = {"eval_accuracy": (r[:, 0] > r[:, 1]).double().mean().item(), "on": "eval" if eval_pairs else "train",
              "score_mean": model.args.score_mean, "score_std": model.args.score_std}
    print0(f"RM accuracy on {result['on']} pairs {result['eval_accuracy']:.3f}; score mean "
           f"{result['score_mean']:.3f} std {result['score_std']:.3f}")
    write_json(run_dir / "eval.json", result)
    return export(model, tok, run_dir, cfg)


# ==========================================================================================================
# PPO with the dense RTO reward. One step: rollout (sample, score) -> token rewards -> advantages -> update -> log.

# What the rollout scores with a frozen model, by the name an rto.ALGOS entry `needs`: name -> (the model it reads,
# fn(model, batch, cfg) -> (B, R) per token or (B,) per response). A new input of a reward term is one entry here.
SCORERS = {
    "logp_dpo": ("dpo", lambda m, b, cfg: ppo_math.response_logprobs(m, b, cfg.temperature)),
    "rm_score": ("rm", lambda m, b, cfg: rm_math.sequence_scores(m, b)),
}
HEADS = {"dpo": "lm", "rm": "score"}  # the frozen models by their flag: a policy or a reward model


def ppo_inputs(cfg: PPOConfig) -> list[str]:
    """The rollout inputs of this run: what its algorithm's terms need, and logp_dpo for --kl_anchor dpo."""
    needs = list(rto.ALGOS[cfg.algo].needs)
    return needs + ["logp_dpo"] if cfg.kl_anchor == "dpo" and "logp_dpo" not in needs else needs


def frozen_models(cfg: PPOConfig) -> list[str]:
    """The frozen models the algorithm's inputs read (SCORERS), by flag."""
    return sorted({SCORERS[n][0] for n in ppo_inputs(cfg) if n in SCORERS})


def ppo_slots(cfg: PPOConfig) -> dict[str, tuple[str, bool, str]]:
    """The checkpoints a PPO run loads, by role -> (path, trained, head). The algorithm's inputs (SCORERS) and the
    estimator decide which; a missing one is an error that names its flag, and so is one given that is never loaded."""
    frozen = frozen_models(cfg)
    uses_critic = ppo_math.ESTIMATORS[cfg.estimator].critic
    for flag in (f for f in HEADS if getattr(cfg, f) and f not in frozen):
        raise UserError(f"--{flag} {getattr(cfg, flag)}: --algo {cfg.algo} (--kl_anchor {cfg.kl_anchor}) never loads "
                        f"it: drop it")
    for flag in ["policy", *([] if cfg.plan else ["prompts"]), *frozen]:
        if not getattr(cfg, flag):
            anchor = " --kl_anchor dpo" if flag == "dpo" and cfg.kl_anchor == "dpo" else ""
            raise UserError(f"--algo {cfg.algo}{anchor} needs --{flag}")
    if cfg.critic and not uses_critic:
        raise UserError(f"--critic {cfg.critic}: --estimator {cfg.estimator} has no critic (gae has one)")
    slots = {"actor": (cfg.init or cfg.policy, True, "lm"), "ref": (cfg.policy, False, "lm")}
    slots.update({name: (getattr(cfg, name), False, HEADS[name]) for name in frozen})
    if uses_critic:  # from the RM, as the reference code's; without an RM, the SFT backbone with a new head
        slots["critic"] = (cfg.critic or (cfg.rm if "rm" in frozen else cfg.policy), True, "score")
    return slots


def ppo_steps(cfg: PPOConfig, n_prompts: int) -> int:
    """The batch arithmetic of a PPO run, checked once. A rollout is rollout_batch_size responses, samples_per_prompt
    to each prompt, every rank holding whole groups (the group baselines need no communication); it splits into
    minibatches of batch_size responses, each a whole number of micro-batches on every rank. Returns the rollouts."""
    k, world = cfg.samples_per_prompt, D.world
    if cfg.temperature == 0:
        raise UserError("--temperature 0: must be in (0, inf) for PPO, which needs a sampling distribution (0, "
                        "greedy, is for `sample`)")
    if ppo_math.ESTIMATORS[cfg.estimator].groups and k < 2:
        raise UserError(f"--estimator {cfg.estimator} compares the responses to one prompt: give --samples_per_prompt "
                        f"2 or more (RLOO and GRPO use 4 to 64)")
    if cfg.rollout_batch_size % (k * world):
        raise UserError(f"rollout_batch_size {cfg.rollout_batch_size} is not a multiple of samples_per_prompt {k} x "
                        f"{world} processes: each rank samples every response of its prompts")
    if cfg.rollout_batch_size % cfg.batch_size:
        raise UserError(f"rollout_batch_size {cfg.rollout_batch_size} is not a multiple of batch_size {cfg.batch_size}")
    check_batch(cfg, cfg.rollout_batch_size, cfg.batch_size, "rollout")
    per_rollout = cfg.rollout_batch_size // k
    if n_prompts < per_rollout:
        raise UserError(f"{cfg.prompts}: {n_prompts} prompts are fewer than one rollout's {per_rollout}")
    return cfg.max_steps or cfg.epochs * (n_prompts // per_rollout)


class Critic:
    """The value model V(s_h) that GAE needs, its optimizer and its loss, in one place. It exists only for an
    estimator that needs it (gae): the critic-free ones load no critic, build no optimizer and save none.

    It starts from the reward model, as the reference code's does (--critic another checkpoint; an algorithm without
    an RM: the SFT backbone with a new head). A critic that starts as a reward model predicts raw scores while the
    returns it regresses on are built from normalised ones, so, as the reference code's, its outputs are read
    through its own stored normalisation."""

    def __init__(self, cfg: PPOConfig, tok: Tokenizer, path: str, updates: int):
        self.model = open_model(path, "score", cfg, tok)
        stats = self.model.args.score_std is not None and cfg.normalize_reward and "rm_score" in ppo_inputs(cfg)
        self.shift, self.scale = (self.model.args.score_mean, self.model.args.score_std) if stats else (0.0, 1.0)
        self.opt, self.sched = make_optimizer(self.model, cfg.critic_lr, cfg, updates)
        self.value_clip, self.grad_clip = cfg.value_clip, cfg.grad_clip

    def values(self, b: dict):
        """V(s_h) for every response token: the critic's output at the position before token h. (B, R)."""
        P = b["prompt_len"]
        return (self.model(b["input_ids"], b["attention_mask"])[:, P - 1:-1].float() - self.shift) / self.scale

    def backward(self, b: dict, n_micro: int, last: bool) -> dict:
        """The clipped value loss of one micro-batch, backward (scaled for a minibatch of n_micro), its stats."""
        set_grad_sync(self.model, last)
        loss, stats = ppo_math.value_loss(self.values(b), b["values_old"], b["returns"], b["response_mask"],
                                          self.value_clip)
        (loss / n_micro).backward()
        return {"value_loss": loss, **stats}

    def step(self, step: int, losses: list[float]):
        clip_and_step(self.model, self.opt, self.sched, self.grad_clip, step, {"value_loss": losses})


@torch.no_grad()
def sample_responses(model: Llama, tok: Tokenizer, prompts: list[list[int]], gen, *, max_new_tokens: int,
                     temperature: float, top_k: int, top_p: float, micro: int, compile_decode: bool = False) -> dict:
    """Sample one response per prompt row, in micro-batches; returns the [left-padded prompt | right-padded response]
    batch with response_mask True up to and including each row's EOS. A sharded model decodes on its plain copy,
    refreshed from the shards first (parallel.decode_view): no FSDP hook runs per token."""
    p_ids, p_mask = pad_left(prompts, tok.pad_id)
    p_ids, p_mask = p_ids.to(D.device), p_mask.to(D.device)
    model.eval()
    decoder = decode_view(model)
    outs = []
    for rows in chunks(list(range(len(prompts))), micro):
        outs.append(generate(decoder, p_ids[rows], p_mask[rows], max_new_tokens, stop_ids=tok.stop_ids,
                             pad_id=tok.pad_id, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen,
                             compile_decode=compile_decode))
    R = max(t.shape[1] for t, _ in outs)
    tokens = torch.cat([torch.nn.functional.pad(t, (0, R - t.shape[1]), value=tok.pad_id) for t, _ in outs])
    mask = torch.cat([torch.nn.functional.pad(m, (0, R - m.shape[1]), value=False) for _, m in outs])
    return {"input_ids": torch.cat([p_ids, tokens], 1), "attention_mask": torch.cat([p_mask, mask.long()], 1),
            "response_mask": mask, "prompt_len": p_ids.shape[1]}


def micro_view(buf: dict, rows) -> dict:
    return {k: (v[rows] if torch.is_tensor(v) else v) for k, v in buf.items()}


@torch.no_grad()
def rollout(actor, models: dict, critic: Critic | None, tok: Tokenizer, prompts: list[list[int]], cfg: PPOConfig,
            gen) -> dict:
    """1. Sample, then score every response token with the frozen models (no grad): the policy's own log-probs
    (logp_old), the SFT reference's, every input the algorithm needs (SCORERS: the DPO model's log-probs, the RM's
    score) and the critic's values. All log-probs use the sampling temperature, as the reference code does; at
    temperature != 1 the DPO term is then the log-ratio of the two tempered distributions, not exactly DPO's implicit
    reward. The update's micro-batches are exactly these rows, so its first minibatch reproduces logp_old bit for bit."""
    t0 = time.perf_counter()
    buf = sample_responses(actor, tok, prompts, gen, max_new_tokens=cfg.max_response_len, temperature=cfg.temperature,
                           top_k=cfg.top_k, top_p=cfg.top_p, micro=cfg.micro_batch_size,
                           compile_decode=cfg.compile_decode)
    t_gen = time.perf_counter()
    P, mask = buf["prompt_len"], buf["response_mask"]
    stop = torch.tensor(tok.stop_ids, device=mask.device)
    buf["ended"] = (torch.isin(buf["input_ids"][:, P:], stop) & mask).any(-1)  # any stop id (Llama-3.1 has three)
    scorers = {name: SCORERS[name] for name in ppo_inputs(cfg) if name in SCORERS}
    parts = {}
    for rows in chunks(list(range(len(prompts))), cfg.micro_batch_size):
        b = micro_view(buf, rows)
        got = {"logp_old": ppo_math.response_logprobs(actor, b, cfg.temperature),
               "logp_ref": ppo_math.response_logprobs(models["ref"], b, cfg.temperature)}
        got.update({name: fn(models[slot], b, cfg) for name, (slot, fn) in scorers.items()})
        if critic is not None:
            got["values_old"] = critic.values(b)
        for key, v in got.items():
            parts.setdefault(key, []).append(v)
    buf.update({k: torch.cat(v) for k, v in parts.items()})
    buf["time_gen_s"], buf["time_score_s"] = t_gen - t0, time.perf_counter() - t_gen
    return buf


def token_rewards(cfg: PPOConfig, buf: dict, score_norm: tuple[float, float], delim_ids):
    """2. The dense per-token reward of cfg.algo (rto.dense_rewards): returns (rewards (B, R), components). Every
    PPOConfig field reaches the algorithm's terms by name (hp), so a term's own hyper-parameter is one field."""
    P, mask = buf["prompt_len"], buf["response_mask"]
    inputs = {name: buf[name] for name in ppo_inputs(cfg) if name in buf}
    if "rm_score" in inputs:
        inputs["rm_score"] = rm_math.normalize_score(inputs["rm_score"], *score_norm, cfg.reward_clip)
    if delim_ids is not None:
        inputs["delimiter_mask"] = delim_ids[buf["input_ids"][:, P:]] & mask
    anchor = buf["logp_ref"] if cfg.kl_anchor == "sft" else buf["logp_dpo"]
    return rto.dense_rewards(cfg.algo, logp=buf["logp_old"], logp_anchor=anchor, logp_ref=buf["logp_ref"], mask=mask,
                             ended=buf["ended"], beta1=cfg.beta1, dpo_clip=cfg.dpo_clip, beta2=cfg.beta2,
                             beta3=cfg.beta3, kl_estimator=cfg.kl_estimator, no_eos_penalty=cfg.no_eos_penalty,
                             hp=dataclasses.asdict(cfg), **inputs)


def advantages(cfg: PPOConfig, rewards, mask, values=None):
    """3. The advantage estimator (ppo.ESTIMATORS): (advantages, returns), returns None without a critic. GAE is the
    paper's; the group ones compare the samples_per_prompt responses to each prompt (rows grouped by the loop).
    Whitened over the whole rollout on all ranks where the estimator's source does (the reference code for GAE's)."""
    est = ppo_math.ESTIMATORS[cfg.estimator]
    hp = {"k": cfg.samples_per_prompt, "gamma": cfg.gamma, "lam": cfg.lam, "grpo_eps": cfg.grpo_eps}
    adv, returns = est.fn(rewards, mask, values, hp)
    if est.whiten if cfg.whiten_advantages is None else cfg.whiten_advantages:
        adv = ppo_math.masked_whiten(adv, mask)
    return adv, returns


def update(cfg: PPOConfig, actor, actor_opt, actor_sched, critic: Critic | None, buf: dict, step: int) -> dict:
    """4. PPO epochs over the rollout: minibatches of whole micro-batches in a seeded order, one optimizer step
    (actor, and critic if any) per minibatch. Returns the per-micro-batch stats and first_dev, the largest
    |logp - logp_old| of the first micro-batch (exactly 0 when on-policy: no dropout, fp32 log-softmax)."""
    micro_rows = chunks(list(range(buf["response_mask"].shape[0])), cfg.micro_batch_size)
    per_minibatch = cfg.batch_size // D.world // cfg.micro_batch_size  # micro-batches per minibatch on this rank
    actor.train()
    if critic is not None:
        critic.model.train()
    stats, first_dev = {}, None
    for epoch in range(cfg.ppo_epochs):
        order = np.random.default_rng(seed_for(cfg.seed, step, epoch)).permutation(len(micro_rows))
        for m0 in range(0, len(order), per_minibatch):
            minibatch = [micro_rows[j] for j in order[m0:m0 + per_minibatch]]
            for i, rows in enumerate(minibatch):
                b, last = micro_view(buf, rows), i == len(minibatch) - 1
                set_grad_sync(actor, last)
                logp, ent = ppo_math.response_logprobs(actor, b, cfg.temperature, entropy=True,
                                                       entropy_grad=cfg.entropy_coef > 0)
                pl, pst = ppo_math.policy_loss(logp, b["logp_old"], b["advantages"], b["response_mask"], cfg.clip_eps)
                bonus = cfg.entropy_coef * ppo_math.seq_mean(ent, b["response_mask"]) if cfg.entropy_coef else 0.0
                ((pl - bonus) / len(minibatch)).backward()
                vst = critic.backward(b, len(minibatch), last) if critic is not None else {}
                if first_dev is None:
                    first_dev = float((logp.detach() - b["logp_old"]).abs().masked_fill(~b["response_mask"], 0).max())
                for key, v in {"policy_loss": pl, **pst, **vst,
                               "entropy": ppo_math.masked_mean(ent, b["response_mask"])}.items():
                    stats.setdefault(key, []).append(float(v.detach()))
            # this minibatch's losses are checked with the gradient norms, before each optimizer step
            clip_and_step(actor, actor_opt, actor_sched, cfg.grad_clip, step + 1,
                          {"policy_loss": stats["policy_loss"][-len(minibatch):]})
            if critic is not None:
                critic.step(step + 1, stats["value_loss"][-len(minibatch):])
    return {"stats": stats, "first_dev": first_dev}


def ppo_metrics(buf: dict, rewards, comp: dict, upd: dict, golds: list[float] | None) -> dict:
    """5. One step's metrics: per-sequence sums averaged over every rank's responses, the update's stats."""
    mask, N = buf["response_mask"], buf["response_mask"].shape[0]
    seq = {"score": buf["rm_score"] if "rm_score" in buf else torch.zeros(N, device=D.device),
           "reward": ppo_math.masked_sum(rewards, mask, -1), "kl": ppo_math.masked_sum(comp["kl"], mask, -1),
           "dpo_reward": ppo_math.masked_sum(comp["dpo"], mask, -1), "resp_len": mask.sum(-1).float(),
           "eos_frac": buf["ended"].float()}
    seq.update({f"{name}_reward": ppo_math.masked_sum(v, mask, -1) for name, v in comp.items()
                if name not in ("kl", "dpo", "score")})  # any other term of the algorithm, by its name in rto.ALGOS
    if golds is not None:
        seq["gold"] = torch.tensor(golds, device=D.device)
    stats = upd["stats"]
    metrics = reduce_metrics({k: float(v.sum()) for k, v in seq.items()}, N)
    metrics.update(reduce_metrics({k: float(np.mean(v)) for k, v in stats.items()}, 1))
    metrics["ratio_max"] = all_max(max(stats["ratio_max"]))  # a max over every minibatch and rank, not a mean
    if "returns" in buf:
        metrics["explained_var"] = reduce_metrics({"ev": ppo_math.explained_variance(
            buf["values_old"], buf["returns"], mask)}, 1)["ev"]
    metrics["first_logp_dev"] = float(all_sum(torch.tensor(upd["first_dev"])))  # exactly 0 when on-policy
    return metrics


def open_ppo_models(cfg: PPOConfig, slots: dict, tok: Tokenizer, updates: int):
    """The actor (trained) and its optimizer; the frozen pi_ref (KL anchor, RTO's reference) and the frozen models the
    inputs need; the critic where the estimator needs one."""
    actor = open_model(slots["actor"][0], "lm", cfg, tok)
    models = {name: open_model(path, head, cfg, tok, frozen=True)
              for name, (path, trained, head) in slots.items() if not trained}
    actor_opt, actor_sched = make_optimizer(actor, cfg.lr, cfg, updates)
    critic = Critic(cfg, tok, slots["critic"][0], updates) if "critic" in slots else None
    return actor, actor_opt, actor_sched, models, critic


def run_ppo(cfg: PPOConfig):
    check_range(cfg)
    warn_unread(cfg, ppo_fields_read(cfg), f"--algo {cfg.algo} --estimator {cfg.estimator}")
    slots = ppo_slots(cfg)
    plan = checkpoint_plan(slots, cfg, cfg.plan_world or D.world)
    print0(plan_text(plan))
    if cfg.plan:
        return None
    run_dir = start_run(cfg)
    check_ppo_checkpoints(cfg, slots)
    tok = open_tokenizer(cfg.policy)
    prompt_rows = read_prompts(cfg.prompts)
    prompts = [p for p, in encode_examples(prompt_rows, tok, cfg.max_prompt_len, cfg.max_response_len)]
    gold = load_task(cfg.task, cfg.task_seed).gold_reward if cfg.task else None
    total = ppo_steps(cfg, len(prompts))
    updates = total * cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.batch_size)
    actor, actor_opt, actor_sched, models, critic = open_ppo_models(cfg, slots, tok, updates)
    check_context(prompt_rows, [(p, [0] * cfg.max_response_len) for p in prompts], actor.args.max_seq_len)
    score_norm = rm_score_stats(cfg, models.get("rm"))
    delim_ids = (torch.tensor([any(c in tok.decode([i], skip_special=False) for c in cfg.delimiters)  # semi-rto
                               for i in range(actor.args.vocab_size)], device=D.device)
                 if "delimiter_mask" in rto.ALGOS[cfg.algo].needs else None)
    trained = {"actor": (actor, actor_opt, actor_sched), **({"critic": (critic.model, critic.opt, critic.sched)}
                                                            if critic is not None else {})}
    state = [{name: t[i] for name, t in trained.items()} for i in range(3)]  # models, optimizers, schedules
    start = resume(cfg, run_dir, *state)
    logger = Logger(run_dir, start, ["gold", "score", "reward", "kl", "resp_len", "eos_frac", "policy_loss",
                                     "value_loss", "approx_kl", "clipfrac", "explained_var", "entropy", "tokens_per_s"])
    bar = progress(total, start, cfg.progress, cfg.out)
    per_rollout = cfg.rollout_batch_size // cfg.samples_per_prompt  # prompts per rollout, over all ranks

    for step in range(start, total):
        t0 = time.perf_counter()
        # this rank's prompts, each samples_per_prompt times in a row (a group stays on one rank)
        idx = [i for i in batch_indices(step, len(prompts), per_rollout, cfg.seed) for _ in range(cfg.samples_per_prompt)]
        gen = torch.Generator(device=D.device).manual_seed(seed_for(cfg.seed, step, D.rank))
        buf = rollout(actor, models, critic, tok, [prompts[i] for i in idx], cfg, gen)
        t_scored = time.perf_counter()
        rewards, comp = token_rewards(cfg, buf, score_norm, delim_ids)
        buf["advantages"], returns = advantages(cfg, rewards, buf["response_mask"], buf.get("values_old"))
        if returns is not None:
            buf["returns"] = returns
        check_finite(step + 1, {"reward": rewards, "advantage": buf["advantages"],
                                **({"value": buf["values_old"]} if critic is not None else {})})
        upd = update(cfg, actor, actor_opt, actor_sched, critic, buf, step)
        t_updated = time.perf_counter()
        golds = [gold(prompt_rows[i].prompt, text) for i, text in zip(idx, response_texts(buf, tok))] if gold else None
        metrics = ppo_metrics(buf, rewards, comp, upd, golds)
        metrics["tokens_per_s"] = float(all_sum(buf["attention_mask"].sum().float().cpu())) / (time.perf_counter() - t0)
        # where the step's time goes: sampling, the scoring passes (policy, reference, DPO model, RM, critic), update
        metrics.update(time_gen_s=buf["time_gen_s"], time_score_s=buf["time_score_s"],
                       time_update_s=t_updated - t_scored)
        logger.log(step + 1, metrics)
        bar.update(1)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
            save_checkpoint(run_dir, step + 1, *state, cfg)
    bar.close()
    release_compiled()  # the compiled decode steps (and their CUDA graphs) end with the stage
    print0(f"{measured_memory()}; planned {plan['total'] / 2**30:.2f} GiB per GPU")
    return export(actor, tok, run_dir, cfg)


# ==========================================================================================================
# The command line (cli.py): `train.py COMMAND --field value ...`, the flags straight from the configs


def commands() -> dict:
    """Every command: name -> (its config class, the function that runs it)."""
    import explain, pipeline  # noqa: E401 (`all`, `sample` and `explain` build on the loops above)

    return {"all": (pipeline.PipelineConfig, pipeline.run_all), "sft": (SFTConfig, run_sft),
            "dpo": (DPOConfig, run_dpo), "rm": (RMConfig, run_rm), "ppo": (PPOConfig, run_ppo),
            "sample": (explain.SampleConfig, explain.run_sample), "explain": (explain.ExplainConfig, explain.run_explain)}


def main(argv=None):
    return cli.main(commands(), sys.argv[1:] if argv is None else argv, __doc__)


if __name__ == "__main__":
    import train  # run as the module `train`, the one pipeline.py and explain.py import: one copy of this file

    cli.run(train.main)
