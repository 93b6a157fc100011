"""Every stage of the RTO pipeline: SFT -> DPO -> Bradley-Terry reward model -> PPO with dense token rewards.

    python train.py                     # the whole pipeline on the built-in task (1-2 min on 2 CPU cores), results table
    python train.py --reuse --algos ppo,rto,r-dpo,simpo,tdpo   # again, keeping the finished SFT / DPO / RM stages
    python train.py sft --data sft.jsonl --model path/to/Llama-3.2-1B --out runs/sft
    python train.py dpo --data prefs.jsonl --model runs/sft/final --out runs/dpo
    python train.py rm  --data prefs.jsonl --model runs/sft/final --out runs/rm
    python train.py ppo --algo rto --prompts prompts.jsonl --policy runs/sft/final \\
                        --dpo runs/dpo/final --rm runs/rm/final --out runs/rto
    python train.py ppo ... --estimator rloo --samples_per_prompt 4   # no critic: a leave-one-out group baseline
    python train.py sample --model runs/rto/final --prompt "Why is the sky blue?"
    torchrun --nproc_per_node=8 train.py ppo ...     # the same file, N processes, FSDP2 (nccl on GPU, gloo on CPU)
    python train.py ppo --help                       # every field of a stage's config, with its default

Each stage reads JSONL data (data.py) and HF-format checkpoints (model.py), writes `<out>/final` as a complete HF
checkpoint (weights, config, tokenizer files, generation_config.json, train_config.json), appends one JSON line per
step to `<out>/metrics.jsonl`, and with --save_every N keeps a sharded, resumable checkpoint in `<out>/checkpoints`
(--resume continues a killed run). The math lives in dpo.py, reward.py, ppo.py and rto.py, the machinery
(processes, FSDP2, checkpoints, the run directory, the checks) in runtime.py; this file is the loops, top to bottom.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import dpo as dpo_math
import ppo as ppo_math
import reward as rm_math
import rto
import hf
from data import (TASKS, DataError, WordTask, collate, load_task, pad_left, read_preferences, read_prompts, read_sft,
                  row_texts)
from hf import Tokenizer, train_tokenizer
from model import Llama, generate
from runtime import (D, Logger, UserError, all_max, all_sum, barrier, check_finite, check_range, check_slot, close_dist,
                     config_json, export_hf, gathered, init_dist, latest_checkpoint, load_checkpoint, open_model,
                     open_tokenizer, print0, reduce_metrics, release_locks, save_checkpoint, start_run,
                     write_json, memory_plan, plan_text, measured_memory, take_dir)


def option(default, help: str, range: str | None = None, choices: tuple | None = None):
    """A config field with its one-line help (shown by --help, printed at start) and what values make sense:
    range "(0, inf)", "[0, 1]", ... (open or closed ends; floats must also be finite) or a tuple of choices,
    checked at start by runtime.check_range."""
    meta = {"help": help + (f" {range}" if range else ""), "range": range, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


POS, NONNEG, UNIT, COUNT = "(0, inf)", "[0, inf)", "[0, 1]", "[1, inf)"  # the ranges most fields use
DEVICES = ("auto", "cpu", "cuda")


# ==========================================================================================================
# Configs: one dataclass per command; every constant that shapes a result is a field, declared once. Fields that
# several commands share live in the small bases first, and each command's config inherits the ones it uses.


@dataclass
class SeedField:
    seed: int = option(0, "seeds init, data order and sampling: the same seed gives the same run on CPU")


@dataclass
class DeviceField:
    device: str = option("auto", "auto | cpu | cuda", choices=DEVICES)


@dataclass
class Bf16Field:
    bf16: bool = option(False, "bf16 parameters/compute with fp32 master weights and fp32 gradient reduction (GPU)")


@dataclass
class RunDirFields:
    overwrite: bool = option(False, "a fresh run may replace a finished run's final/ in --out (at its end)")
    progress: bool = option(True, "show tqdm bars (never when the output is not a terminal's)")


@dataclass
class SamplingFields:
    temperature: float = option(1.0, "sampling temperature (0: greedy, `sample` only); PPO's log-probs use the "
                                     "same one", NONNEG)
    top_k: int = option(0, "sample from the k most likely tokens (0: all); PPO's log-probs stay those of the full "
                           "distribution (as in the reference code), so anything but 0 makes PPO slightly off-policy",
                        NONNEG)
    top_p: float = option(1.0, "nucleus sampling mass (1: all); the same caveat as top_k", "(0, 1]")
    compile_decode: bool = option(False, "decode with a static KV cache and a torch.compile'd step (CUDA graphs on a "
                                         "GPU), compiled once per rollout shape; off by default: on CPU it does not pay "
                                         "at these sizes (README, Throughput), and no GPU has measured it yet")


@dataclass
class TaskFields:
    """A built-in task whose true reward is shown beside the learned ones (ppo: the gold reward every step;
    explain: the gold reward of every token)."""
    task: str = option("", "a built-in task: a name from data.TASKS (words | credit, with --task_seed) or the "
                           "task.json `train.py all` writes under <out>/data ('': none)")
    task_seed: int = option(0, "the seed of a --task given by name (the --seed its data was made with)")


@dataclass
class SetField:
    set: list = option([], "any field of a stage's own config: --set ppo.top_k=50 --set sft.lr=1e-3 (stages sft, "
                           "dpo, rm, ppo; repeat --set)")


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
    micro_batch_size: int = option(8, "examples per forward pass on one rank (gradient accumulation makes up the rest)",
                             COUNT)
    epochs: int = option(1, "passes over the data", COUNT)
    max_steps: int = option(0, "stop after this many optimizer steps (0: run the epochs)", NONNEG)
    max_prompt_len: int = option(256, "prompt tokens kept (the END of a longer prompt, so the generation cue survives)",
                           "[2, inf)")
    max_response_len: int = option(256, "response tokens kept (the START of a longer response; a cut one has no EOS)",
                             COUNT)
    save_every: int = option(0, "write a resumable checkpoint every N steps (0: only the final HF export)", NONNEG)
    resume: bool = option(False, "continue from the latest complete checkpoint in <out>/checkpoints (its config must match, but for runtime.RESUME_MAY_CHANGE)")
    export_dtype: str = option("auto", "dtype of final/'s weights: auto (the input checkpoint's: bf16 in, bf16 out; fp32 "
                                       "for a new model) | fp32 | bf16 | fp16; recorded in config.json",
                               choices=("auto", "fp32", "bf16", "fp16"))
    offload_frozen: bool = option(False, "keep frozen models' shards in host memory between forwards (FSDP2 CPU offload; "
                                    "with several processes or --bf16)")


@dataclass
class SFTConfig(Config):
    data: str = option("", "SFT JSONL: {prompt, response} or {messages} rows")
    model: str = option("", "HF-format checkpoint directory to start from (with tokenizer.json); empty: a new model")
    preset: str = option("tiny", "model.py preset for a NEW model, used only when --model is empty")
    tokenizer: str = option("", "directory holding tokenizer.json, when --model is empty")
    out: str = option("runs/sft", "run directory")
    lr: float = option(1e-5, "peak learning rate", POS)


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
    loss_type: str = option("sigmoid", "the preference loss, a row of dpo.LOSSES: sigmoid (DPO) | ipo | rdpo (R-DPO) | "
                                       "simpo (SimPO: no reference) | tdpo1 | tdpo2 (TDPO)",
                            choices=tuple(dpo_math.LOSSES))
    beta: float = option(0.1, "DPO beta: strength of the KL anchor to the reference (the SFT model); SimPO's reward "
                              "scale (its paper: 2.0-2.5)", POS)
    label_smoothing: float = option(0.0, "conservative DPO: assumed fraction of flipped labels (0 = plain DPO)", "[0, 0.5)")
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
    algo: str = option("rto", "the token reward, a row of rto.ALGOS: ppo (sparse r_MLE) | rto (dense DPO reward + "
                              "r_MLE) | semi-rto | dpo-only | ...", choices=tuple(rto.ALGOS))
    policy: str = option("", "the SFT checkpoint: initial policy and the KL reference pi_ref")
    dpo: str = option("", "the DPO checkpoint, for the algorithms whose rto.ALGOS entry needs logp_dpo (rto, "
                          "semi-rto, dpo-only) and for --kl_anchor dpo")
    rm: str = option("", "the reward model checkpoint, for the algorithms that need rm_score (ppo, rto, semi-rto)")
    critic: str = option("", "critic init (default: --rm, as the reference code does; else --policy + a new head)")
    out: str = option("runs/ppo", "run directory")
    lr: float = option(5e-7, "actor peak learning rate", POS)
    critic_lr: float = option(9e-6, "critic peak learning rate", POS)
    batch_size: int = option(32, "responses per PPO minibatch (one optimizer step of actor and critic), over all ranks",
                            COUNT)
    rollout_batch_size: int = option(64, "responses sampled per rollout (prompts x samples_per_prompt), over all ranks",
                                     COUNT)
    ppo_epochs: int = option(1, "passes over each rollout (reference code: 1)", COUNT)
    estimator: str = option("gae", "advantage estimator (ppo.py): gae (the paper's: a critic, GAE, whitening) | rloo | "
                                   "grpo | rloo-token (critic-free: a group baseline over --samples_per_prompt "
                                   "responses per prompt)", choices=tuple(ppo_math.ESTIMATORS))
    samples_per_prompt: int = option(1, "responses sampled per prompt in a rollout (k; the group baselines need "
                                        ">= 2); rollout_batch_size and batch_size count responses", COUNT)
    whiten_advantages: bool = option(True, "whiten advantages over the whole rollout, all ranks (reference code, "
                                           "for GAE's); applies to every estimator")
    grpo_eps: float = option(1e-4, "grpo: added to the group's std before dividing (TRL's 1e-4)", POS)
    kl_anchor: str = option("sft", "the model the KL penalty keeps pi near: sft (reference code; pi_ref) | dpo "
                                   "(needs --dpo)", choices=("sft", "dpo"))
    beta1: float = option(0.05, "RTO: scale of the DPO token reward log(pi_dpo/pi_ref) (reference dpo_reward_scale 0.05)",
                     POS)
    dpo_clip: float = option(0.05, "RTO: clip each DPO token reward to +-this (reference: 0.05; inf: no clip)", "(0, inf]")
    beta2: float = option(0.01, "KL coefficient: -beta2 * KL(pi || pi_ref) per token (reference init_kl_coef 0.01)", NONNEG)
    beta3: float = option(1.0, "weight of the reward model score on the last token", NONNEG)
    kl_estimator: str = option("k1", "per-token KL estimator: k1 (reference) | k3", choices=("k1", "k3"))
    gamma: float = option(1.0, "GAE discount (reference: 1)", UNIT)
    lam: float = option(0.95, "GAE lambda (reference: 0.95)", UNIT)
    clip_eps: float = option(0.2, "PPO ratio clip (reference: 0.2)", POS)
    value_clip: float = option(0.2, "value clip around the rollout values (reference: 0.2)", POS)
    reward_clip: float = option(10.0, "clamp the normalised RM score to +-this (reference: 10)", POS)
    normalize_reward: bool = option(True, "(score - mean) / std with the mean/std stored in the RM checkpoint")
    no_eos_penalty: float = option(1.0, "subtracted on the last token of a response cut by max_response_len, in units "
                                   "of the normalised score (our addition: the reference code has no such term)", NONNEG)
    delimiters: str = option(".,;:!?\n", "semi-rto: a token whose text holds one of these ends a segment")
    plan: bool = option(False, "print the memory plan (per GPU, per model) for these checkpoints and exit, reading only "
                          "their config.json")
    plan_world: int = option(0, "the number of GPUs to plan for (0: this run's processes)", NONNEG)
    max_response_len: int = option(128, "max new tokens per response", COUNT)


# ==========================================================================================================
# Shared pieces of the loops


def load_tokenizer(cfg: Config) -> Tokenizer:
    src = cfg.model or getattr(cfg, "tokenizer", "")
    if not src:
        raise ValueError("give --model (a checkpoint with tokenizer.json)"
                         + (" or --tokenizer for a new model" if hasattr(cfg, "tokenizer") else ""))
    return open_tokenizer(src)


def encode_rows(rows, encode, tok: Tokenizer):
    """encode(row) for every data row, a template's refusal named with the row's file and line. Text that spells a
    special token ("<|eot_id|>" inside a message) becomes that control token, as transformers tokenizes it too:
    legal, but rarely meant, so the first such row is named in a warning."""
    texts = tok.special_texts()
    specials = re.compile("|".join(map(re.escape, texts))) if texts else None
    out, odd = [], []
    for r in rows:
        try:
            out.append(encode(r))
        except DataError as e:
            raise DataError(f"{r.where}: {e}") from None
        found = next((m.group(0) for text in row_texts(r) if specials and (m := specials.search(text))), None)
        if found is not None:
            odd.append((r.where, found))
    if odd:
        print0(f"warning: {odd[0][0]}: the text holds {odd[0][1]!r}, which the tokenizer reads as that special token "
               f"(a control token mid-text; transformers does the same); {len(odd)} of {len(rows)} rows do")
    return out


def make_optimizer(model, lr: float, cfg: Config, total_steps: int):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay,
                            foreach=D.world == 1 and not cfg.bf16)
    warmup = max(1, math.ceil(cfg.warmup_ratio * total_steps))

    def lr_lambda(step):  # linear warm-up, then cosine from 1 down to min_lr_ratio (reference schedule)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def clip_and_step(model, opt, sched, max_norm: float, step: int, checks: dict) -> float:
    """Clip, check that the gradient norm and the given losses are finite (on every rank), then step: a NaN stops
    the run here, before the weights take it (runtime.check_finite)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    check_finite(step, {**checks, "grad_norm": norm})
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """This rank's share of global batch `step`: epochs are seeded permutations of the n examples, a global
    batch is a contiguous slice of one, rank r takes every world-th item of it. Derived from (seed, step) alone,
    so a resumed run sees exactly the batches the uninterrupted run would have."""
    per_epoch = n // batch_size
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[k * batch_size:(k + 1) * batch_size][D.rank::D.world].tolist()


def check_batch(cfg: Config, n: int, batch_size: int, what: str) -> int:
    """Validate the batch arithmetic once, with errors that say which numbers do not fit. Returns steps."""
    if batch_size % D.world:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {D.world} processes")
    if (batch_size // D.world) % cfg.micro_batch_size:
        raise ValueError(f"per-rank batch {batch_size // D.world} is not divisible by micro_batch_size "
                         f"{cfg.micro_batch_size}")
    if n < batch_size:
        raise ValueError(f"{what}: {n} examples are fewer than one batch of {batch_size}")
    return cfg.max_steps or cfg.epochs * (n // batch_size)


def chunks(xs: list, size: int):
    return [xs[i:i + size] for i in range(0, len(xs), size)]


def response_logprobs(model, batch: dict, temperature: float = 1.0, entropy: bool = False):
    """Log-probs (B, R) of the response tokens under `model`: the token at column P+j is predicted by the
    logits at column P+j-1. With entropy=True, also the entropy (B, R) of each predictive distribution."""
    P = batch["prompt_len"]
    logits = model(batch["input_ids"], batch["attention_mask"])[:, P - 1:-1]
    logp = ppo_math.logprobs_from_logits(logits, batch["input_ids"][:, P:], temperature)
    if entropy:
        with torch.no_grad():
            return logp, ppo_math.entropy_from_logits(logits, temperature)
    return logp


def to_device(batch: dict) -> dict:
    return {k: v.to(D.device) if torch.is_tensor(v) else v for k, v in batch.items()}


# ==========================================================================================================
# SFT, DPO and the reward model share one loop: batches of examples, a loss summed over "units" (response
# tokens for SFT, pairs for DPO and the RM), normalised by the global number of units in the batch.


def fit(cfg: Config, run_dir: Path, model: Llama, n: int, units, loss_fn, keys: list[str]) -> int:
    """Train `model` for the configured steps. units(i) -> how many loss units example i holds; loss_fn(idx)
    -> (loss summed over the units of examples idx, {metric: sum over the same units}). Returns steps run."""
    total = check_batch(cfg, n, cfg.batch_size, cfg.out)
    opt, sched = make_optimizer(model, cfg.lr, cfg, total)
    start = 0
    if cfg.resume and (ckpt := latest_checkpoint(run_dir)) is not None:
        start = load_checkpoint(ckpt, {"model": model}, {"model": opt}, {"model": sched})
        print0(f"resumed from {ckpt} at step {start}")
    logger = Logger(run_dir, start, keys)
    bar = tqdm(total=total, initial=start, disable=not (D.main and cfg.progress), desc=cfg.out, leave=False)
    model.train()
    for step in range(start, total):
        t0 = time.perf_counter()
        idx = batch_indices(step, n, cfg.batch_size, cfg.seed)
        local_units = sum(units(i) for i in idx)
        global_units = float(all_sum(torch.tensor(float(local_units))))
        sums, tokens = {}, 0
        micro = chunks(idx, cfg.micro_batch_size)
        for k, mb in enumerate(micro):
            if hasattr(model, "set_requires_gradient_sync"):  # FSDP: reduce-scatter once, after the last micro
                model.set_requires_gradient_sync(k == len(micro) - 1)
            loss_sum, metric_sums, n_tok = loss_fn(mb)
            # FSDP averages gradients over ranks, so scale by world: the result is the global per-unit mean
            (loss_sum * D.world / global_units).backward()
            sums["loss"] = sums.get("loss", 0.0) + float(loss_sum.detach())
            for k2, v in metric_sums.items():
                sums[k2] = sums.get(k2, 0.0) + float(v)
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


def load_pairs(cfg):
    """DPO's and the RM's data: the tokenizer, the training rows and pairs (checked), the held-out pairs."""
    if not cfg.model:
        raise UserError("give --model (the SFT checkpoint, with tokenizer.json)")
    tok = load_tokenizer(cfg)
    context = hf.read_config(cfg.model).max_seq_len
    rows = read_preferences(cfg.data)
    pairs = encode_pairs(tok, rows, cfg)
    check_pairs(rows, pairs, cfg.data)
    check_context(rows, pairs, context)
    eval_rows = read_preferences(cfg.eval_data) if cfg.eval_data else []
    eval_pairs = encode_pairs(tok, eval_rows, cfg)
    check_context(eval_rows, eval_pairs, context)  # held-out rows as strictly as training rows (the RM's score std)
    return tok, rows, pairs, eval_pairs


def encode_pairs(tok: Tokenizer, rows, cfg: Config):
    return encode_rows(rows, lambda r: (tok.encode_prompt(r.prompt, cfg.max_prompt_len),
                                        tok.encode_response(r.prompt, r.chosen, cfg.max_response_len),
                                        tok.encode_response(r.prompt, r.rejected, cfg.max_response_len)), tok)


def pair_batch(pairs, tok: Tokenizer) -> dict:
    """[chosen rows; rejected rows] in one batch (one forward pass), same prompt layout for both halves."""
    prompts = [p for p, _, _ in pairs]
    return to_device(collate(prompts + prompts, [c for _, c, _ in pairs] + [r for _, _, r in pairs], tok.pad_id))


def check_context(rows, seqs, max_seq_len: int):
    """Every example must fit the model's context (config.json max_position_embeddings); name the first that
    does not. seqs: per row, the id lists that are concatenated into one sequence."""
    for r, parts in zip(rows, seqs):
        n = max(len(parts[0]) + len(p) for p in parts[1:])
        if n > max_seq_len:
            raise UserError(f"{r.where}: prompt + response is {n} tokens, more than the model's context of "
                            f"{max_seq_len} (config.json max_position_embeddings): lower --max_prompt_len or "
                            f"--max_response_len")


def check_pairs(rows, pairs, path: str):
    """A pair whose chosen and rejected responses are the same ids carries no preference; all of them: an error."""
    same = [r.where for r, (_, c, rj) in zip(rows, pairs) if c == rj]
    if len(same) == len(pairs):
        raise UserError(f"{path}: in every pair the chosen and rejected responses are identical (after tokenizing): "
                        f"nothing to learn from")
    if same:
        print0(f"warning: {len(same)} of {len(pairs)} pairs have identical chosen and rejected responses "
               f"(first: {same[0]}); they add nothing but a constant to the loss")


def run_sft(cfg: SFTConfig) -> Path:
    run_dir = start_run(cfg)
    if cfg.model:
        check_slot(cfg.model, "model", "lm")
    tok = load_tokenizer(cfg)
    rows = read_sft(cfg.data)
    data = encode_rows(rows, lambda r: (tok.encode_prompt(r.prompt, cfg.max_prompt_len),
                                        tok.encode_response(r.prompt, r.response, cfg.max_response_len)), tok)
    model = open_model(cfg.model, "lm", cfg, tok)
    check_context(rows, data, model.args.max_seq_len)
    print0(f"{len(data)} SFT examples, model {model.num_params() / 1e6:.2f}M parameters")

    def loss_fn(idx):
        b = to_device(collate([data[i][0] for i in idx], [data[i][1] for i in idx], tok.pad_id))
        logp = response_logprobs(model, b)
        loss_sum = -ppo_math.masked_sum(logp, b["response_mask"])  # next-token NLL of response tokens only
        return loss_sum, {}, int(b["attention_mask"].sum())

    fit(cfg, run_dir, model, len(data), lambda i: len(data[i][1]), loss_fn, ["loss", "grad_norm", "tokens_per_s"])
    export_hf(model, tok, run_dir / "final", cfg)
    return run_dir / "final"


@torch.no_grad()
def pair_values(fn, pairs, tok: Tokenizer, micro: int) -> torch.Tensor:
    """(n, 2) values [chosen, rejected] of every pair, fn(batch) -> (2k,) for a pair batch of k. Each rank
    computes every world-th pair and all ranks receive the whole table."""
    n = len(pairs)
    out = torch.zeros(n, 2, dtype=torch.float64, device=D.device)
    mine = list(range(D.rank, n, D.world))
    for k in range(math.ceil(math.ceil(n / D.world) / micro)):  # the same number of forwards on every rank (FSDP)
        idx = mine[k * micro:(k + 1) * micro]
        v = fn(pair_batch([pairs[i] for i in idx or [0]], tok)).double()
        if idx:
            out[idx, 0], out[idx, 1] = v[:len(idx)], v[len(idx):]
    return all_sum(out)


def summed_logps(model):
    """batch -> (B,) summed response log-probs under model (DPO's log pi(y|x))."""
    return lambda b: dpo_math.sequence_logps(response_logprobs(model, b), b["response_mask"])


def scores(model):
    """batch -> (B,) reward-model score read at each row's last real token (the EOS of a complete response)."""
    return lambda b: rm_math.gather_last(model(b["input_ids"], b["attention_mask"]).float(), b["attention_mask"])


def pair_logps_and_kl(model, ref_model, b: dict):
    """The policy's summed response log-probs (2k,) of a pair batch and, with a reference model (TDPO), each row's
    sequential KL(pi_ref || pi) over the full vocabulary (2k,), from the reference's logits of this micro-batch
    only (never a (B, T, V) cache of the data set)."""
    if ref_model is None:
        return summed_logps(model)(b), None
    P = b["prompt_len"]
    logits = model(b["input_ids"], b["attention_mask"])[:, P - 1:-1]
    logp = ppo_math.logprobs_from_logits(logits, b["input_ids"][:, P:])
    with torch.no_grad():
        ref_logits = ref_model(b["input_ids"], b["attention_mask"])[:, P - 1:-1]
    return (dpo_math.sequence_logps(logp, b["response_mask"]),
            dpo_math.sequential_kl(ref_logits, logits, b["response_mask"]))


def pair_inputs(pol, kl, ref, lengths) -> dict:
    """preference_loss's inputs for k pairs from the (2k,) [chosen; rejected] values and the (k, 2) tables."""
    k = pol.shape[0] // 2
    x = {"pol_chosen": pol[:k], "pol_rejected": pol[k:], "len_chosen": lengths[:, 0], "len_rejected": lengths[:, 1]}
    if ref is not None:
        x.update(ref_chosen=ref[:, 0].to(pol.dtype), ref_rejected=ref[:, 1].to(pol.dtype))
    if kl is not None:
        x.update(kl_chosen=kl[:k], kl_rejected=kl[k:])
    return x


def run_dpo(cfg: DPOConfig) -> Path:
    run_dir = start_run(cfg)
    check_slot(cfg.model, "model", "lm")
    tok, rows, pairs, eval_pairs = load_pairs(cfg)
    needs = dpo_math.LOSSES[cfg.loss_type]
    model = open_model(cfg.model, "lm", cfg, tok)
    # The reference is the starting (SFT) model itself: its log-probs are computed once, before the first
    # step, so no frozen copy has to stay in memory. On a resumed run they come from the checkpoint's
    # starting point, which is the same model: --model is still the SFT checkpoint. TDPO also needs the reference's
    # whole distribution at every token while training: only then it stays loaded (frozen, bf16 under --bf16).
    # SimPO has no reference at all.
    ref_model = open_model(cfg.model, "lm", cfg, tok, frozen=True) if needs.kl else None
    if ref_model is not None:  # what TDPO costs beyond DPO, printed like the PPO memory plan
        a, width = ref_model.args, 2 if cfg.bf16 else 4
        logits = 2 * cfg.micro_batch_size * (cfg.max_prompt_len + cfg.max_response_len) * a.vocab_size * width
        print0(f"{cfg.loss_type}: the reference stays loaded, {a.num_params() * width / D.world / 2**30:.2f} GiB of "
               f"frozen weights per rank, plus one micro-batch of its logits at a time ({logits / 2**30:.2f} GiB)")
    model.eval()
    ref = pair_values(summed_logps(model), pairs, tok, cfg.micro_batch_size) if needs.ref else None
    ref_eval = (pair_values(summed_logps(model), eval_pairs, tok, cfg.micro_batch_size)
                if needs.ref and eval_pairs else None)
    hp = {"beta": cfg.beta, "label_smoothing": cfg.label_smoothing, "rdpo_alpha": cfg.rdpo_alpha,
          "simpo_gamma": cfg.simpo_gamma, "tdpo_alpha": cfg.tdpo_alpha}
    print0(f"{len(pairs)} preference pairs; loss {cfg.loss_type}" + ("; reference log-probs computed" if needs.ref
                                                                     else " (reference-free)"))

    def loss_fn(idx):
        b = pair_batch([pairs[i] for i in idx], tok)
        pol, kl = pair_logps_and_kl(model, ref_model, b)
        lengths = b["response_mask"].sum(-1).view(2, -1).T  # (k, 2) response tokens, EOS included
        loss, m = dpo_math.preference_loss(cfg.loss_type, pair_inputs(pol, kl, ref[idx] if ref is not None else None,
                                                                      lengths), hp)
        return loss * len(idx), {key: v * len(idx) for key, v in m.items()}, int(b["attention_mask"].sum())

    fit(cfg, run_dir, model, len(pairs), lambda i: 1, loss_fn,
        ["loss", "accuracy", "chosen_reward", "rejected_reward", "margin", "grad_norm", "tokens_per_s"])
    if eval_pairs:  # the implicit reward of the loss itself on held-out pairs: how often it ranks them right
        model.eval()
        pol = pair_values(summed_logps(model), eval_pairs, tok, cfg.micro_batch_size)
        kl = (pair_values(lambda b: pair_logps_and_kl(model, ref_model, b)[1], eval_pairs, tok, cfg.micro_batch_size)
              if needs.kl else None)
        lengths = torch.tensor([[len(c), len(r)] for _, c, r in eval_pairs], device=pol.device)
        x = pair_inputs(torch.cat([pol[:, 0], pol[:, 1]]), None if kl is None else torch.cat([kl[:, 0], kl[:, 1]]),
                        ref_eval, lengths)
        _, m = dpo_math.preference_loss(cfg.loss_type, x, hp)
        result = {"eval_accuracy": m["accuracy"].item(), "eval_margin": m["margin"].item()}
        print0(f"DPO ({cfg.loss_type}) held-out implicit-reward accuracy {result['eval_accuracy']:.3f}")
        write_json(run_dir / "eval.json", result)
    del ref_model
    export_hf(model, tok, run_dir / "final", cfg)
    return run_dir / "final"


def run_rm(cfg: RMConfig) -> Path:
    run_dir = start_run(cfg)
    check_slot(cfg.model, "model", None)  # a policy (a new head) or a reward model to train further
    tok, rows, pairs, eval_pairs = load_pairs(cfg)
    model = open_model(cfg.model, "score", cfg, tok)

    def loss_fn(idx):
        b = pair_batch([pairs[i] for i in idx], tok)
        r, k = scores(model)(b), len(idx)
        loss, m = rm_math.bt_loss(r[:k], r[k:])
        return loss * k, {key: v * k for key, v in m.items()}, int(b["attention_mask"].sum())

    fit(cfg, run_dir, model, len(pairs), lambda i: 1, loss_fn, ["loss", "accuracy", "margin", "grad_norm", "tokens_per_s"])
    # Score statistics for PPO's reward normalisation, on held-out pairs when given (else on the training
    # pairs, which the RM has fit: say so), stored in the checkpoint's config.json (rto_score_mean/std).
    model.eval()
    held = eval_pairs or pairs
    r = pair_values(scores(model), held, tok, cfg.micro_batch_size)
    model.args.score_mean, model.args.score_std = r.mean().item(), r.flatten().std().item()
    result = {"eval_accuracy": (r[:, 0] > r[:, 1]).double().mean().item(), "on": "eval" if eval_pairs else "train",
              "score_mean": model.args.score_mean, "score_std": model.args.score_std}
    print0(f"RM accuracy on {result['on']} pairs {result['eval_accuracy']:.3f}; score mean "
           f"{result['score_mean']:.3f} std {result['score_std']:.3f}")
    write_json(run_dir / "eval.json", result)
    export_hf(model, tok, run_dir / "final", cfg)
    return run_dir / "final"


# ==========================================================================================================
# PPO with the dense RTO reward. One step: rollout (sample, score) -> token rewards -> advantages -> update -> log.


def seed_for(*parts: int) -> int:
    """A 63-bit seed derived from (seed, step, rank, ...): every random draw in a step is a function of these."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


@torch.no_grad()
def sample_responses(model: Llama, tok: Tokenizer, prompts: list[list[int]], gen, *, max_new_tokens: int,
                     temperature: float, top_k: int, top_p: float, micro: int, compile_decode: bool = False) -> dict:
    """Sample one response per prompt row, in micro-batches; returns the [left-padded prompt | right-padded response]
    batch with response_mask True up to and including each row's EOS."""
    p_ids, p_mask = pad_left(prompts, tok.pad_id)
    p_ids, p_mask = p_ids.to(D.device), p_mask.to(D.device)
    model.eval()
    outs = []
    with gathered(model):
        for rows in chunks(list(range(len(prompts))), micro):
            outs.append(generate(model, p_ids[rows], p_mask[rows], max_new_tokens, stop_ids=tok.stop_ids,
                                 pad_id=tok.pad_id, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen,
                                 compile_decode=compile_decode))
    R = max(t.shape[1] for t, _ in outs)
    tokens = torch.cat([torch.nn.functional.pad(t, (0, R - t.shape[1]), value=tok.pad_id) for t, _ in outs])
    mask = torch.cat([torch.nn.functional.pad(m, (0, R - m.shape[1]), value=False) for _, m in outs])
    return {"input_ids": torch.cat([p_ids, tokens], 1), "attention_mask": torch.cat([p_mask, mask.long()], 1),
            "response_mask": mask, "prompt_len": p_ids.shape[1]}


def micro_view(buf: dict, rows) -> dict:
    return {k: (v[rows] if torch.is_tensor(v) else v) for k, v in buf.items()}


def ppo_steps(cfg: PPOConfig, n_prompts: int) -> int:
    """The batch arithmetic of a PPO run, checked once. A rollout is rollout_batch_size responses, samples_per_prompt
    to each prompt, every rank holding whole groups (the group baselines need no communication); it splits into
    minibatches of batch_size responses, each a whole number of micro-batches on every rank. Returns the rollouts."""
    k, world = cfg.samples_per_prompt, D.world
    if cfg.temperature == 0:
        raise UserError("--temperature 0: must be in (0, inf) for PPO, which needs a sampling distribution (0, "
                        "greedy, is for `sample`)")
    if not ppo_math.ESTIMATORS[cfg.estimator].critic and k < 2:
        raise UserError(f"--estimator {cfg.estimator} compares the responses to one prompt: give --samples_per_prompt "
                        f"2 or more (RLOO and GRPO use 4 to 64)")
    if cfg.rollout_batch_size % (k * world):
        raise UserError(f"rollout_batch_size {cfg.rollout_batch_size} is not a multiple of samples_per_prompt {k} x "
                        f"{world} processes: each rank samples every response of its prompts")
    if cfg.rollout_batch_size % cfg.batch_size:
        raise UserError(f"rollout_batch_size {cfg.rollout_batch_size} is not a multiple of batch_size {cfg.batch_size}")
    if cfg.batch_size % world:
        raise UserError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
    if (cfg.batch_size // world) % cfg.micro_batch_size:
        raise UserError(f"per-rank batch {cfg.batch_size // world} is not divisible by micro_batch_size "
                        f"{cfg.micro_batch_size}")
    per_rollout = cfg.rollout_batch_size // k
    if n_prompts < per_rollout:
        raise UserError(f"{cfg.prompts}: {n_prompts} prompts are fewer than one rollout's {per_rollout}")
    return cfg.max_steps or cfg.epochs * (n_prompts // per_rollout)


def reward_normalisation(cfg: PPOConfig, rm_model) -> tuple[float, float]:
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


def set_grad_sync(model, on: bool):
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP: reduce-scatter once, after a minibatch's last micro
        model.set_requires_gradient_sync(on)


class Critic:
    """The value model V(s_h) that GAE needs, its optimizer and its loss, in one place. It exists only for an
    estimator that needs it (gae): the critic-free ones load no critic, build no optimizer and save none.

    It starts from the reward model, as the reference code's does (--critic another checkpoint; an algorithm without
    an RM: the SFT backbone with a new head). A critic that starts as a reward model predicts raw scores while the
    returns it regresses on are built from normalised ones, so, as the reference code's, its outputs are read
    through its own stored normalisation."""

    def __init__(self, cfg: PPOConfig, tok: Tokenizer, path: str, updates: int):
        self.model = open_model(path, "score", cfg, tok)
        stats = self.model.args.score_std is not None and cfg.normalize_reward and "rm_score" in rto.ALGOS[cfg.algo].needs
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
def rollout(actor, models: dict, critic: Critic | None, tok: Tokenizer, prompts: list[list[int]], cfg: PPOConfig,
            gen) -> dict:
    """1. Sample, then score every response token with the frozen models (no grad): the policy's own log-probs
    (logp_old), the SFT reference's, the DPO model's and the RM's score where the algorithm needs them, and the
    critic's values. All log-probs use the sampling temperature, as the reference code does; at temperature != 1
    the DPO term is then the log-ratio of the two tempered distributions, not exactly DPO's implicit reward.
    The update's micro-batches are exactly these rows, so its first minibatch reproduces logp_old bit for bit."""
    t0 = time.perf_counter()
    buf = sample_responses(actor, tok, prompts, gen, max_new_tokens=cfg.max_response_len, temperature=cfg.temperature,
                           top_k=cfg.top_k, top_p=cfg.top_p, micro=cfg.micro_batch_size,
                           compile_decode=cfg.compile_decode)
    t_gen = time.perf_counter()
    P, mask = buf["prompt_len"], buf["response_mask"]
    stop = torch.tensor(tok.stop_ids, device=mask.device)
    buf["ended"] = (torch.isin(buf["input_ids"][:, P:], stop) & mask).any(-1)  # any stop id (Llama-3.1 has three)
    parts = {}
    for rows in chunks(list(range(len(prompts))), cfg.micro_batch_size):
        b = micro_view(buf, rows)
        got = {"logp_old": response_logprobs(actor, b, cfg.temperature),
               "logp_ref": response_logprobs(models["ref"], b, cfg.temperature)}
        if models["dpo"] is not None:
            got["logp_dpo"] = response_logprobs(models["dpo"], b, cfg.temperature)
        if models["rm"] is not None:
            got["score"] = scores(models["rm"])(b)
        if critic is not None:
            got["values_old"] = critic.values(b)
        for key, v in got.items():
            parts.setdefault(key, []).append(v)
    buf.update({k: torch.cat(v) for k, v in parts.items()})
    buf["time_gen_s"], buf["time_score_s"] = t_gen - t0, time.perf_counter() - t_gen
    return buf


def token_rewards(cfg: PPOConfig, buf: dict, score_norm: tuple[float, float], delim_ids):
    """2. The dense per-token reward of cfg.algo (rto.dense_rewards): returns (rewards (B, R), components)."""
    P, mask = buf["prompt_len"], buf["response_mask"]
    score = (rm_math.normalize_score(buf["score"], *score_norm, cfg.reward_clip) if "score" in buf else None)
    delimiters = delim_ids[buf["input_ids"][:, P:]] & mask if delim_ids is not None else None
    anchor = buf["logp_ref"] if cfg.kl_anchor == "sft" else buf["logp_dpo"]
    return rto.dense_rewards(cfg.algo, logp=buf["logp_old"], logp_anchor=anchor, logp_ref=buf["logp_ref"], mask=mask,
                             rm_score=score, logp_dpo=buf.get("logp_dpo"), delimiter_mask=delimiters,
                             ended=buf["ended"], beta1=cfg.beta1, dpo_clip=cfg.dpo_clip, beta2=cfg.beta2,
                             beta3=cfg.beta3, kl_estimator=cfg.kl_estimator, no_eos_penalty=cfg.no_eos_penalty)


def advantages(cfg: PPOConfig, rewards, mask, values=None):
    """3. The advantage estimator (ppo.ESTIMATORS): (advantages, returns), returns None without a critic. GAE is the
    paper's; the others compare the samples_per_prompt responses to each prompt (rows grouped by the loop).
    Whitened over the whole rollout on all ranks, as the reference code whitens GAE's."""
    hp = {"k": cfg.samples_per_prompt, "gamma": cfg.gamma, "lam": cfg.lam, "grpo_eps": cfg.grpo_eps}
    adv, returns = ppo_math.ESTIMATORS[cfg.estimator].fn(rewards, mask, values, hp)
    if cfg.whiten_advantages:
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
                logp, ent = response_logprobs(actor, b, cfg.temperature, entropy=True)
                pl, pst = ppo_math.policy_loss(logp, b["logp_old"], b["advantages"], b["response_mask"], cfg.clip_eps)
                (pl / len(minibatch)).backward()
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


def gold_rewards(gold, buf: dict, prompts: list, tok: Tokenizer) -> list[float]:
    """The built-in task's true reward of every sampled response (the judge no model sees)."""
    P, mask = buf["prompt_len"], buf["response_mask"]
    return [gold(p, tok.decode(buf["input_ids"][r, P:][mask[r]].tolist())) for r, p in enumerate(prompts)]


def ppo_metrics(buf: dict, rewards, comp: dict, upd: dict, texts_gold: list[float] | None) -> dict:
    """5. One step's metrics: per-sequence sums averaged over every rank's responses, the update's stats."""
    mask, N = buf["response_mask"], buf["response_mask"].shape[0]
    seq = {"score": buf["score"] if "score" in buf else torch.zeros(N, device=D.device),
           "reward": ppo_math.masked_sum(rewards, mask, -1), "kl": ppo_math.masked_sum(comp["kl"], mask, -1),
           "dpo_reward": ppo_math.masked_sum(comp["dpo"], mask, -1), "resp_len": mask.sum(-1).float(),
           "eos_frac": buf["ended"].float()}
    if texts_gold is not None:
        seq["gold"] = torch.tensor(texts_gold, device=D.device)
    stats = upd["stats"]
    metrics = reduce_metrics({k: float(v.sum()) for k, v in seq.items()}, N)
    metrics.update(reduce_metrics({k: float(np.mean(v)) for k, v in stats.items()}, 1))
    metrics["ratio_max"] = all_max(max(stats["ratio_max"]))  # a max over every minibatch and rank, not a mean
    if "returns" in buf:
        metrics["explained_var"] = reduce_metrics({"ev": ppo_math.explained_variance(
            buf["values_old"], buf["returns"], mask)}, 1)["ev"]
    metrics["first_logp_dev"] = float(all_sum(torch.tensor(upd["first_dev"])))  # exactly 0 when on-policy
    return metrics


def ppo_slots(cfg: PPOConfig) -> dict[str, tuple[str, bool, str]]:
    """The checkpoints a PPO run loads, by role -> (path, trained, head). The algorithm table's `needs` and the
    estimator decide which; a missing one is an error that names its flag, and nothing given goes unused."""
    needs = rto.ALGOS[cfg.algo].needs
    uses_dpo, uses_rm = "logp_dpo" in needs or cfg.kl_anchor == "dpo", "rm_score" in needs
    uses_critic = ppo_math.ESTIMATORS[cfg.estimator].critic
    why = f"--algo {cfg.algo}"
    for flag, needed, who in (("policy", True, why), ("prompts", not cfg.plan, why), ("rm", uses_rm, why),
                              ("dpo", uses_dpo, why + (" --kl_anchor dpo" if cfg.kl_anchor == "dpo" else ""))):
        if needed and not getattr(cfg, flag):
            raise UserError(f"{who} needs --{flag}")
    if cfg.critic and not uses_critic:
        raise UserError(f"--critic {cfg.critic}: --estimator {cfg.estimator} has no critic (gae has one)")
    slots = {"actor": (cfg.policy, True, "lm"), "ref": (cfg.policy, False, "lm")}
    if uses_dpo:
        slots["dpo"] = (cfg.dpo, False, "lm")
    if uses_rm:
        slots["rm"] = (cfg.rm, False, "score")
    if uses_critic:  # from the RM, as the reference code's; without an RM, the SFT backbone with a new head
        slots["critic"] = (cfg.critic or (cfg.rm if uses_rm else cfg.policy), True, "score")
    return slots


def check_ppo_slots(cfg: PPOConfig, slots: dict):
    """Before any weights are read: each checkpoint is the right kind and speaks the policy's vocabulary, and RTO's
    pi_ref (--policy) is the model the DPO run started from (else its token reward is no DPO reward)."""
    check_slot(cfg.policy, "policy", "lm")
    for flag, want, used in (("dpo", "lm", "dpo" in slots), ("rm", "score", "rm" in slots),
                             ("critic", None, bool(cfg.critic))):
        if used:
            check_slot(getattr(cfg, flag), flag, want, policy=cfg.policy)
    dpo_cfg = Path(cfg.dpo) / "train_config.json"
    if "dpo" in slots and dpo_cfg.is_file():
        check_implicit_reward(cfg.dpo)
        dpo_ref = json.loads(dpo_cfg.read_text()).get("model")
        if dpo_ref is not None and Path(dpo_ref).resolve() != Path(cfg.policy).resolve():
            print0(f"warning: {cfg.dpo} was trained from {dpo_ref}, but --policy (pi_ref) is {cfg.policy}")


def check_implicit_reward(dpo_dir: str):
    """RTO's DPO term is log(pi_dpo / pi_ref): a model trained without a reference (SimPO) has no such implicit
    reward, and its log-ratio to the SFT model would be a number with no meaning. Refused, naming the run."""
    saved = Path(dpo_dir) / "train_config.json"
    loss_type = json.loads(saved.read_text()).get("loss_type", "sigmoid") if saved.is_file() else "sigmoid"
    if loss_type in dpo_math.LOSSES and not dpo_math.LOSSES[loss_type].token_reward:
        raise UserError(f"--dpo {dpo_dir} was trained with loss_type {loss_type!r}, which has no reference model: its "
                        f"log-ratio to pi_ref is no implicit reward, so it gives RTO no token reward; use a run of "
                        f"sigmoid (DPO), ipo, rdpo or tdpo")


def ppo_plan(cfg: PPOConfig, slots: dict) -> dict:
    """The memory plan of a PPO run from its checkpoints' config.json alone (runtime.memory_plan)."""
    return memory_plan({k: (dataclasses.replace(hf.read_config(p), head=h,
                                                tie_embeddings=hf.read_config(p).tie_embeddings and h == "lm"), trained)
                        for k, (p, trained, h) in slots.items()}, cfg, cfg.plan_world or D.world, cfg.max_prompt_len)


def run_ppo(cfg: PPOConfig) -> Path:
    check_range(cfg)
    slots = ppo_slots(cfg)
    plan = ppo_plan(cfg, slots)
    print0(plan_text(plan))
    if cfg.plan:
        return None
    run_dir = start_run(cfg)
    check_ppo_slots(cfg, slots)
    tok = open_tokenizer(cfg.policy)
    prompt_rows = read_prompts(cfg.prompts)
    prompts = encode_rows(prompt_rows, lambda r: tok.encode_prompt(r.prompt, cfg.max_prompt_len), tok)
    gold = load_task(cfg.task, cfg.task_seed).gold_reward if cfg.task else None
    total = ppo_steps(cfg, len(prompts))

    # The models: the actor (trained), the frozen SFT reference (pi_ref, for KL and RTO), the DPO model and the
    # reward model where the algorithm needs them, the critic where the estimator needs one.
    actor = open_model(cfg.policy, "lm", cfg, tok)
    check_context(prompt_rows, [(p, [0] * cfg.max_response_len) for p in prompts], actor.args.max_seq_len)
    models = {"ref": open_model(cfg.policy, "lm", cfg, tok, frozen=True),
              "dpo": open_model(cfg.dpo, "lm", cfg, tok, frozen=True) if "dpo" in slots else None,
              "rm": open_model(cfg.rm, "score", cfg, tok, frozen=True) if "rm" in slots else None}
    score_norm = reward_normalisation(cfg, models["rm"])
    updates = total * cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.batch_size)
    actor_opt, actor_sched = make_optimizer(actor, cfg.lr, cfg, updates)
    critic = Critic(cfg, tok, slots["critic"][0], updates) if "critic" in slots else None
    # semi-rto: which token ids end a segment (a token whose text holds a delimiter character)
    delim_ids = (torch.tensor([any(c in tok.decode([i], skip_special=False) for c in cfg.delimiters)
                               for i in range(actor.args.vocab_size)], device=D.device)
                 if "delimiter_mask" in rto.ALGOS[cfg.algo].needs else None)
    ckpt_models, ckpt_optims, ckpt_scheds = {"actor": actor}, {"actor": actor_opt}, {"actor": actor_sched}
    if critic is not None:  # what a checkpoint holds: the trained models, their optimizers and schedules
        ckpt_models["critic"], ckpt_optims["critic"], ckpt_scheds["critic"] = critic.model, critic.opt, critic.sched
    start = 0
    if cfg.resume and (ckpt := latest_checkpoint(run_dir)) is not None:
        start = load_checkpoint(ckpt, ckpt_models, ckpt_optims, ckpt_scheds)
        print0(f"resumed from {ckpt} at step {start}")
    logger = Logger(run_dir, start, ["gold", "score", "reward", "kl", "resp_len", "eos_frac", "policy_loss",
                                     "value_loss", "approx_kl", "clipfrac", "explained_var", "entropy", "tokens_per_s"])
    bar = tqdm(total=total, initial=start, disable=not (D.main and cfg.progress), desc=cfg.out, leave=False)
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
        golds = gold_rewards(gold, buf, [prompt_rows[i].prompt for i in idx], tok) if gold is not None else None
        metrics = ppo_metrics(buf, rewards, comp, upd, golds)
        metrics["tokens_per_s"] = float(all_sum(buf["attention_mask"].sum().float().cpu())) / (time.perf_counter() - t0)
        # where the step's time goes: sampling, the scoring passes (policy, reference, DPO model, RM, critic), update
        metrics.update(time_gen_s=buf["time_gen_s"], time_score_s=buf["time_score_s"],
                       time_update_s=t_updated - t_scored)
        logger.log(step + 1, metrics)
        bar.update(1)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
            save_checkpoint(run_dir, step + 1, ckpt_models, ckpt_optims, ckpt_scheds, cfg)
    bar.close()
    print0(f"{measured_memory()}; planned {plan['total'] / 2**30:.2f} GiB per GPU")
    export_hf(actor, tok, run_dir / "final", cfg)
    return run_dir / "final"


# ==========================================================================================================
# Evaluation and the built-in task: `python train.py` runs everything above on a task whose true per-token
# reward is known (data.WordTask), so each policy is judged against the truth, not only against its own RM.


@dataclass
class EvalSettings:
    """How a policy is judged: one sampled response per held-out prompt, seeded, with sampling settings of its own
    (not those of any PPO run). Built from PipelineConfig by eval_settings()."""
    seed: int
    max_prompt_len: int
    max_new_tokens: int
    micro_batch_size: int
    temperature: float
    top_k: int
    top_p: float


@torch.no_grad()
def evaluate(policy_dir: Path, ref: Llama, tok: Tokenizer, prompt_rows, ev: EvalSettings, gold=None, rm_model=None):
    """Sample one response per prompt (seeded) from the policy; per prompt: gold reward, RM score and the
    sequence KL sum_h log(pi/pi_ref)(y_h) on the policy's own samples. Prompts are split over ranks."""
    policy = open_model(str(policy_dir), "lm", ev, tok, frozen=True)
    n = len(prompt_rows)
    own = list(range(D.rank, n, D.world))
    mine = own + [own[0] if own else 0] * (math.ceil(n / D.world) - len(own))  # equal work on every rank (FSDP)
    out = {k: torch.zeros(n, dtype=torch.float64, device=D.device) for k in ("gold", "score", "kl", "len", "eos")}
    gen = torch.Generator(device=D.device).manual_seed(seed_for(ev.seed, 10**6, D.rank))
    prompts = [tok.encode_prompt(prompt_rows[i].prompt, ev.max_prompt_len) for i in mine]
    buf = sample_responses(policy, tok, prompts, gen, max_new_tokens=ev.max_new_tokens, temperature=ev.temperature,
                           top_k=ev.top_k, top_p=ev.top_p, micro=ev.micro_batch_size)
    P, mask = buf["prompt_len"], buf["response_mask"]
    seen = set()
    for rows in chunks(list(range(len(mine))), ev.micro_batch_size):
        b = micro_view(buf, rows)
        kl = ppo_math.masked_sum(response_logprobs(policy, b, ev.temperature)
                                 - response_logprobs(ref, b, ev.temperature), b["response_mask"], -1)
        sc = scores(rm_model)(b) if rm_model is not None else torch.zeros(len(rows), device=D.device)
        for j, r in enumerate(rows):
            i = mine[r]
            if r >= len(own) or i in seen:  # padding rows: another rank (or an earlier row) owns this prompt
                continue
            seen.add(i)
            text = tok.decode(buf["input_ids"][r, P:][mask[r]].tolist())
            out["gold"][i] = gold(prompt_rows[i].prompt, text) if gold else 0.0
            out["score"][i], out["kl"][i], out["len"][i] = sc[j], kl[j], mask[r].sum()
            out["eos"][i] = float(buf["input_ids"][r, P:][mask[r]][-1].item() in tok.stop_ids)
    del policy
    return {k: all_sum(v).cpu() for k, v in out.items()}


@dataclass
class PipelineConfig(SeedField, DeviceField, RunDirFields, SetField):
    """`python train.py` / `python train.py all`: every stage on the built-in WordTask, then a results table.
    The stages' own fields keep their one declaration in their configs: DEMO below sets the built-in task's values,
    --set STAGE.FIELD=VALUE changes any of them."""
    out: str = option("runs/demo", "run directory: data/, tokenizer/, sft/, dpo/, rm/, <algo>/, results.md")
    algos: str = option("ppo,rto", f"comma-separated PPO variants to train and compare, from {','.join(rto.ALGOS)}")
    preset: str = option("tiny", "model.py preset of the policy trained from scratch")
    task: str = option("words", "the built-in task (data.TASKS): words (short responses, the demo) | credit (24-48 "
                           "words, context-dependent per-word gold reward, noisy labels)", choices=tuple(TASKS))
    length_cost: float | None = option(None, "override the task's gold length cost per word of distance from "
                                        "target_words", NONNEG)
    target_words: int | None = option(None, "override the response length the task's gold reward prefers (0: a plain "
                                       "per-word cost)", NONNEG)
    n_sft: int = option(4096, "SFT demonstrations (neutral responses)", COUNT)
    n_pref: int = option(4096, "preference pairs labelled by Bradley-Terry on the gold reward", COUNT)
    n_prompts: int = option(2048, "PPO training prompts", COUNT)
    n_eval: int = option(256, "held-out prompts and preference pairs", COUNT)
    vocab_size: int = option(512, "BPE vocabulary trained on the task's text (every task word becomes one token)",
                        "[64, inf)")
    max_len: int = option(16, "max prompt tokens and max response tokens", "[2, inf)")
    batch_size: int = option(64, "SFT / DPO / RM examples per step, and responses per PPO rollout", "[2, inf)")
    eval_temperature: float = option(1.0, "sampling temperature of the held-out evaluation (its log-probs use it too)", POS)
    eval_top_k: int = option(0, "top-k of the held-out evaluation's sampling (0: all)", NONNEG)
    eval_top_p: float = option(1.0, "nucleus mass of the held-out evaluation's sampling (1: all)", "(0, 1]")
    reuse: bool = option(False, "keep a finished sft/dpo/rm stage whose final/train_config.json equals the one this run "
                           "would write (and whose data and upstream stages are unchanged); the PPO stages always "
                           "run, replacing their final/: the fast loop for trying an idea (a code change to dpo.py "
                           "or reward.py needs those stages rerun: drop --reuse)")


# The built-in task's stage settings, on top of each stage config's defaults: a 2-layer model learns in seconds, at
# learning rates far above the paper's 8B values; everything RTO-specific keeps the reference values. Batch sizes
# come from PipelineConfig.batch_size (a PPO rollout of batch_size responses is two minibatches).
DEMO = {"sft": dict(lr=3e-3, epochs=3),
        "dpo": dict(lr=1e-3, epochs=2, beta=0.1),
        "rm": dict(lr=1e-3, epochs=2),
        "ppo": dict(lr=3e-4, critic_lr=1e-3, max_steps=150)}


def stage_configs(pc: PipelineConfig, data: dict, tok_dir: Path):
    """The four stages' configs for the built-in task: the pipeline's paths and sizes, DEMO's values, --set."""
    out, over = Path(pc.out), stage_overrides(pc.set)
    common = dict(seed=pc.seed, device=pc.device, progress=pc.progress, max_prompt_len=pc.max_len,
                  max_response_len=pc.max_len, overwrite=pc.overwrite)
    micro = pc.batch_size // D.world  # each rank's share of a batch in one forward pass
    sft = SFTConfig(**common, out=str(out / "sft"), data=str(data["sft"]), tokenizer=str(tok_dir), preset=pc.preset,
                    batch_size=pc.batch_size, micro_batch_size=micro, **{**DEMO["sft"], **over["sft"]})
    pref = dict(common, data=str(data["prefs"]), eval_data=str(data["eval_prefs"]), model=str(out / "sft" / "final"),
                batch_size=pc.batch_size, micro_batch_size=micro)
    dpo_cfg = DPOConfig(**pref, out=str(out / "dpo"), **{**DEMO["dpo"], **over["dpo"]})
    rm_cfg = RMConfig(**pref, out=str(out / "rm"), **{**DEMO["rm"], **over["rm"]})
    ppo_cfgs = {algo: PPOConfig(**{**common, "overwrite": pc.overwrite or pc.reuse}, out=str(out / algo), algo=algo,
                                prompts=str(data["prompts"]), policy=str(out / "sft" / "final"),
                                dpo=str(out / "dpo" / "final"), rm=str(out / "rm" / "final"), task=str(data["task"]),
                                rollout_batch_size=pc.batch_size, batch_size=pc.batch_size // 2,
                                micro_batch_size=micro // 2, **{**DEMO["ppo"], **over["ppo"]})
                for algo in pc.algos.split(",") if algo in rto.ALGOS}
    return sft, dpo_cfg, rm_cfg, ppo_cfgs


# The direct preference methods of the paper's Table 1 besides DPO, as `--algos` names: DPO runs with another loss,
# from the same SFT model on the same pairs (their own fields as DPOConfig declares them; SimPO's beta is its paper's).
OFFLINE = {"r-dpo": dict(loss_type="rdpo"), "simpo": dict(loss_type="simpo", beta=2.0), "tdpo": dict(loss_type="tdpo2")}


def offline_configs(pc: PipelineConfig, dpo_cfg: DPOConfig) -> dict:
    """The DPO stage config of every offline method in --algos, each in <out>/<name>; --set dpo.* applies to them too,
    but for the fields OFFLINE sets (SimPO keeps its beta 2.0)."""
    return {name: offline_config(dpo_cfg, Path(pc.out) / name, name) for name in pc.algos.split(",") if name in OFFLINE}


def offline_config(dpo_cfg: DPOConfig, out: Path, name: str) -> DPOConfig:
    """The DPO stage config of one offline method (OFFLINE[name]) writing into out."""
    return dataclasses.replace(dpo_cfg, out=str(out), **OFFLINE[name])


def length_controlled_win_rate(judge_diff, len_diff) -> float:
    """AlpacaEval 2's length-controlled win rate (Dubois et al. 2024), for one policy against one baseline: a
    logistic regression of the judge's preference (1 win, 0 loss, 0.5 tie; judge_diff = the judge's score of the
    policy's response minus the baseline's, per prompt) on the policy's identity (an intercept) and
    tanh(len_diff / std(len_diff)), the normalised length difference; read at zero length difference: sigmoid of
    the intercept. AlpacaEval's GLM also fits an instruction-difficulty term across many models; with one pair of
    models per prompt there is no such term to fit. numpy only: Newton's method on the cross-entropy, with an L2 of
    1e-6 so a perfect separation still converges. Returns the LC win rate in [0, 1]."""
    y = np.where(judge_diff > 0, 1.0, np.where(judge_diff < 0, 0.0, 0.5))
    sd = np.std(len_diff)
    x = np.stack([np.ones_like(y), np.tanh(len_diff / sd) if sd > 0 else np.zeros_like(y)], 1)  # (n, 2)
    w = np.zeros(2)
    for _ in range(100):
        p = 1 / (1 + np.exp(-x @ w))
        grad = x.T @ (p - y) / len(y) + 1e-6 * w
        hess = (x * (p * (1 - p))[:, None]).T @ x / len(y) + 1e-6 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(1 / (1 + np.exp(-w[0])))


def eval_settings(pc: PipelineConfig) -> EvalSettings:
    return EvalSettings(seed=pc.seed, max_prompt_len=pc.max_len, max_new_tokens=pc.max_len,
                        micro_batch_size=pc.batch_size // D.world // 2, temperature=pc.eval_temperature,
                        top_k=pc.eval_top_k, top_p=pc.eval_top_p)


def stage_overrides(items: list[str]) -> dict[str, dict]:
    """--set STAGE.FIELD=VALUE items -> {stage: {field: value}}, each value parsed as the field's type, so every
    stage flag reaches `all` without being declared twice."""
    classes = {"sft": SFTConfig, "dpo": DPOConfig, "rm": RMConfig, "ppo": PPOConfig}
    out = {k: {} for k in classes}
    for item in items:
        key, eq, value = item.partition("=")
        stage, _, name = key.partition(".")
        if not eq or stage not in classes:
            raise UserError(f"--set {item!r}: expected STAGE.FIELD=VALUE with STAGE one of {', '.join(classes)}")
        fields = {f.name: f for f in dataclasses.fields(classes[stage])}
        if name not in fields or name in ("out", "data", "eval_data", "model", "prompts", "policy", "dpo", "rm", "task"):
            raise UserError(f"--set {item!r}: {stage} has no field {name!r} that `all` lets you set "
                            f"(see `train.py {stage} --help`)")
        kind = fields[name].type
        try:
            out[stage][name] = (value.lower() in ("1", "true", "yes") if kind in ("bool", bool) else
                                {"int": int, "float": float}.get(kind, str)(value))
        except ValueError:
            raise UserError(f"--set {item!r}: {value!r} is not a valid {kind}") from None
    return out


def make_task(pc: PipelineConfig) -> WordTask:
    overrides = {k: v for k, v in (("length_cost", pc.length_cost), ("target_words", pc.target_words)) if v is not None}
    task = WordTask(seed=pc.seed, **{**TASKS[pc.task], **overrides})
    if pc.max_len < task.max_words + 1:
        raise UserError(f"--max_len {pc.max_len}: the {pc.task} task's responses have up to {task.max_words} words "
                        f"(+ EOS): give --max_len {task.max_words + 1} or more")
    return task


DATA_FILES = ("sft", "prefs", "prompts", "eval_prefs", "eval_prompts")


def task_data(pc: PipelineConfig):
    """The task, its data files and task.json under <out>/data, and a tokenizer trained on it under <out>/tokenizer
    (rank 0). Returns (task, paths, changed): changed is False when every file came out byte for byte as it was."""
    out, task = Path(pc.out), make_task(pc)
    data = {k: out / "data" / f"{k}.jsonl" for k in DATA_FILES}
    data["task"] = out / "data" / "task.json"
    files = [*data.values(), out / "tokenizer" / "tokenizer.json"]
    before = [f.read_bytes() if f.is_file() else None for f in files]
    if D.main:
        task.write_data(out / "data", pc.n_sft, pc.n_pref, pc.n_prompts, pc.n_eval, rng_seed=pc.seed)
        data["task"].write_text(json.dumps(task.spec(), indent=2) + "\n")
        train_tokenizer(task.corpus(), vocab_size=pc.vocab_size).save(out / "tokenizer")
    barrier()
    changed = any(b != (f.read_bytes() if f.is_file() else None) for b, f in zip(before, files))
    return task, data, changed


def same_run(cfg, final: Path) -> bool:
    """final/ was written by a finished run of this very config (up to fields that change nothing it computed)."""
    saved = final / "train_config.json"
    if not saved.is_file():
        return False
    ignore = ("progress", "overwrite", "save_every", "resume")
    now, then = json.loads(config_json(cfg)), json.loads(saved.read_text())
    return {k: v for k, v in now.items() if k not in ignore} == {k: v for k, v in then.items() if k not in ignore}


def run_or_reuse(cfg, fn, may_keep: bool, reuse: bool) -> bool:
    """Run a shared stage, or (--reuse) keep the finished run it would make. Returns True when it was kept."""
    final = Path(cfg.out) / "final"
    if may_keep and same_run(cfg, final):
        print0(f"--reuse: {final} is what this stage would make (same config, data and upstream stage): kept")
        return True
    fn(dataclasses.replace(cfg, overwrite=True) if reuse else cfg)
    return False


def run_all(pc: PipelineConfig):
    out = Path(pc.out)
    check_range(pc)
    print0("== PipelineConfig\n" + config_json(pc))
    for algo in pc.algos.split(","):
        if algo not in rto.ALGOS and algo not in OFFLINE:
            raise UserError(f"--algos: unknown {algo!r}; choose from {', '.join([*rto.ALGOS, *OFFLINE])}")
    take_dir(out)  # one `all` per directory, before anything is written (its data files included)
    task, data, data_changed = task_data(pc)
    sft_cfg, dpo_cfg, rm_cfg, ppo_cfgs = stage_configs(pc, data, out / "tokenizer")
    t0 = time.perf_counter()
    # --reuse: a shared stage is kept when it is the run this one would make, on the same data, after the same
    # upstream stage (DPO and the RM both start from SFT); otherwise it runs, and so does everything after it
    fresh = pc.reuse and not data_changed
    sft_kept = run_or_reuse(sft_cfg, run_sft, fresh, pc.reuse)
    for stage_cfg, fn in ((dpo_cfg, run_dpo), (rm_cfg, run_rm)):
        run_or_reuse(stage_cfg, fn, fresh and sft_kept, pc.reuse)
    policies = {"sft": out / "sft" / "final", "dpo": out / "dpo" / "final"}
    for name, offline_cfg in offline_configs(pc, dpo_cfg).items():  # the other direct preference methods
        run_or_reuse(offline_cfg, run_dpo, fresh and sft_kept, pc.reuse)
        policies[name] = Path(offline_cfg.out) / "final"
    for algo, cfg in ppo_cfgs.items():
        policies[algo] = run_ppo(cfg)
    train_s = time.perf_counter() - t0

    # Judge every policy on the held-out prompts against the gold reward.
    ev = eval_settings(pc)
    tok = Tokenizer.from_dir(policies["sft"])
    ref = open_model(str(policies["sft"]), "lm", ev, tok, frozen=True)
    rm_model = open_model(str(out / "rm" / "final"), "score", ev, tok, frozen=True)
    rows = read_prompts(data["eval_prompts"])
    res = {name: evaluate(path, ref, tok, rows, ev, task.gold_reward, rm_model) for name, path in policies.items()}
    rm_eval = json.loads((out / "rm" / "eval.json").read_text())
    dpo_eval = json.loads((out / "dpo" / "eval.json").read_text())
    table = ["| policy | gold reward | win rate vs SFT (gold) | RM score | KL to SFT | response length | "
             "LC win rate vs SFT (gold) |", "|---|---|---|---|---|---|---|"]
    summary = {}
    for name, r in res.items():
        diff = r["gold"] - res["sft"]["gold"]
        win = ((diff > 0).double() + 0.5 * (diff == 0).double()).mean().item()
        lc = length_controlled_win_rate(diff.numpy(), (r["len"] - res["sft"]["len"]).numpy())
        summary[name] = {"gold": r["gold"].mean().item(), "win_vs_sft": win, "rm_score": r["score"].mean().item(),
                         "kl": r["kl"].mean().item(), "len": r["len"].mean().item(), "lc_win_vs_sft": lc}
        s = summary[name]
        table.append(f"| {name} | {s['gold']:.3f} | {s['win_vs_sft']:.3f} | {s['rm_score']:.3f} | {s['kl']:.3f} "
                     f"| {s['len']:.2f} | {lc:.3f} |")
    notes = [f"reward model accuracy on {pc.n_eval} held-out pairs: {rm_eval['eval_accuracy']:.3f}",
             f"DPO implicit-reward accuracy on the same pairs: {dpo_eval['eval_accuracy']:.3f}",
             f"training time (all stages, {D.world} process{'es' if D.world > 1 else ''}): {train_s:.0f} s"]
    text = "\n".join(table + [""] + notes) + "\n"
    print0("\n" + text)
    if D.main:
        (out / "results.md").write_text(text)
        write_json(out / "results.json", {"policies": summary, "rm": rm_eval, "dpo": dpo_eval, "train_seconds": train_s})
    return summary


# ==========================================================================================================
# Talk to a checkpoint


@dataclass
class SampleConfig(SeedField, DeviceField, Bf16Field, SamplingFields):
    model: str = option("", "HF-format Llama directory with tokenizer.json (any stage's final/, or a downloaded model)")
    prompt: list = option([], "prompt text (repeat --prompt for several)")
    n: int = option(1, "completions per prompt", COUNT)
    max_new_tokens: int = option(128, "tokens to generate at most", COUNT)


@torch.no_grad()
def run_sample(cfg: SampleConfig):
    check_range(cfg)
    if not cfg.model or not cfg.prompt:
        raise UserError("give --model DIR and at least one --prompt TEXT")
    check_slot(cfg.model, "model", "lm")
    tok = open_tokenizer(cfg.model)
    model = open_model(cfg.model, "lm", cfg, tok, frozen=True)  # the one loader every stage uses
    prompts = [tok.encode_prompt([{"role": "user", "content": p}], model.args.max_seq_len) for p in cfg.prompt
               for _ in range(cfg.n)]
    ids, mask = pad_left(prompts, tok.pad_id)
    gen = torch.Generator(device=D.device).manual_seed(cfg.seed)
    toks, tmask = generate(model, ids.to(D.device), mask.to(D.device), cfg.max_new_tokens, stop_ids=tok.stop_ids,
                           pad_id=tok.pad_id, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                           generator=gen, compile_decode=cfg.compile_decode)
    for k, p in enumerate(prompts):
        print(f"--- {cfg.prompt[k // cfg.n]!r} ({'chat template' if tok.chat else 'plain format'})")
        print(tok.decode(toks[k][tmask[k]].tolist()))


# ==========================================================================================================
# The token reward made visible: `train.py explain` colours a response by RTO's per-token DPO reward


@dataclass
class ExplainConfig(DeviceField, TaskFields, SetField):
    """Show RTO's dense reward beta1 * log(pi_dpo / pi_ref) on every token of a response (and the gold per-token
    reward beside it on a built-in task)."""
    dpo: str = option("", "the DPO checkpoint (pi_dpo)")
    ref: str = option("", "the reference the DPO run started from (pi_ref, the SFT checkpoint)")
    prompt: list = option([], "prompt text (repeat --prompt for several)")
    response: list = option([], "response text, one per --prompt (default: the DPO model's greedy answer)")
    max_new_tokens: int = option(64, "tokens to generate when no --response is given", COUNT)
    html: str = option("explain.html", "write the same view as a standalone HTML file here ('' for none)")


@torch.no_grad()
def dpo_log_ratios(dpo_model, ref, tok: Tokenizer, prompts: list, responses: list) -> list[list[float]]:
    """log(pi_dpo / pi_ref)(y_h) for every response token (no beta1, no clip), one list per (prompt, response)."""
    b = to_device(collate(prompts, responses, tok.pad_id))
    diff = response_logprobs(dpo_model, b) - response_logprobs(ref, b)
    return [diff[i, :len(r)].tolist() for i, r in enumerate(responses)]


def gold_per_token(task: WordTask, prompt_msgs, tok: Tokenizer, response_ids: list[int]) -> list[float | None] | None:
    """The task's true reward term of each response token (each task word is one token; the EOS earns 0), or None
    when the tokens do not line up one to one with the words."""
    body = [i for i in response_ids if i not in tok.stop_ids]
    text = tok.decode(body)
    words = task.word_rewards(prompt_msgs, text)
    if len(words) != len(body):
        return None
    return words + [0.0] * (len(response_ids) - len(body))


def ansi(text: str, r: float, scale: float) -> str:
    """text on a background from red (negative) through none to green (positive), by |r| / scale."""
    level = min(5, round(5 * abs(r) / scale)) if scale > 0 else 0
    if level == 0:
        return text
    code = 16 + (36 * level if r < 0 else 6 * level)  # the 6x6x6 colour cube: pure red or pure green
    return f"\x1b[48;5;{code}m{text}\x1b[0m"


def run_explain(cfg: ExplainConfig):
    import html as html_mod

    check_range(cfg)
    if not (cfg.dpo and cfg.ref and cfg.prompt):
        raise UserError("give --dpo DIR --ref DIR and at least one --prompt TEXT")
    if cfg.response and len(cfg.response) != len(cfg.prompt):
        raise UserError(f"{len(cfg.response)} --response for {len(cfg.prompt)} --prompt: give one per prompt, or none")
    check_slot(cfg.dpo, "dpo", "lm")
    check_slot(cfg.ref, "ref", "lm", policy=cfg.dpo)
    check_implicit_reward(cfg.dpo)
    tok = open_tokenizer(cfg.dpo)
    dpo_model = open_model(cfg.dpo, "lm", cfg, tok, frozen=True)
    ref = open_model(cfg.ref, "lm", cfg, tok, frozen=True)
    task = load_task(cfg.task, cfg.task_seed) if cfg.task else None
    ppo = PPOConfig(**stage_overrides(cfg.set)["ppo"])  # beta1 and dpo_clip, declared once: PPO's
    check_range(ppo)
    msgs = [[{"role": "user", "content": p}] for p in cfg.prompt]
    prompts = [tok.encode_prompt(m, dpo_model.args.max_seq_len // 2) for m in msgs]
    if cfg.response:
        responses = [tok.encode_response(m, r, dpo_model.args.max_seq_len // 2) for m, r in zip(msgs, cfg.response)]
    else:  # the DPO model's own greedy answer
        ids, mask = pad_left(prompts, tok.pad_id)
        toks, tmask = generate(dpo_model, ids.to(D.device), mask.to(D.device), cfg.max_new_tokens,
                               stop_ids=tok.stop_ids, pad_id=tok.pad_id, temperature=0)
        responses = [toks[i][tmask[i]].tolist() for i in range(len(prompts))]
    logratios = dpo_log_ratios(dpo_model, ref, tok, prompts, responses)
    tty = sys.stdout.isatty()
    page = ["<!doctype html><meta charset='utf-8'><title>RTO token rewards</title><body style='font-family:monospace'>",
            f"<p>RTO token reward r = clip({ppo.beta1} * log(pi_dpo / pi_ref), +-{ppo.dpo_clip}); dpo {html_mod.escape(cfg.dpo)}, "
            f"ref {html_mod.escape(cfg.ref)}</p>"]
    for p_text, m, r_ids, lr in zip(cfg.prompt, msgs, responses, logratios):
        rewards = [max(-ppo.dpo_clip, min(ppo.dpo_clip, ppo.beta1 * x)) for x in lr]
        gold = gold_per_token(task, m, tok, r_ids) if task else None
        pieces = [tok.decode([i], skip_special=False) for i in r_ids]
        scale = max((abs(x) for x in rewards), default=0.0)
        print(f"--- {p_text!r}: {len(r_ids)} tokens, summed token reward {sum(rewards):+.4f}"
              + (f", gold {sum(g for g in gold):+.3f}" if gold else ""))
        if tty:
            print("".join(ansi(s, x, scale) for s, x in zip(pieces, rewards)))
        head = "token\treward\tlog_ratio" + ("\tgold" if gold else "")
        print(head)
        for k, (s, x, raw) in enumerate(zip(pieces, rewards, lr)):
            print(f"{s!r}\t{x:+.5f}\t{raw:+.5f}" + (f"\t{gold[k]:+.4f}" if gold else ""))
        spans = []
        for k, (s, x) in enumerate(zip(pieces, rewards)):
            a = 0.0 if scale == 0 else abs(x) / scale
            color = f"rgba({'200,0,0' if x < 0 else '0,160,0'},{a:.2f})"
            tip = f"reward {x:+.5f}, log-ratio {lr[k]:+.5f}" + (f", gold {gold[k]:+.4f}" if gold else "")
            spans.append(f"<span style='background:{color}' title='{tip}'>{html_mod.escape(s)}</span>")
        page.append(f"<h3>{html_mod.escape(p_text)}</h3><p>{''.join(spans)}</p>")
        rows = "".join(f"<tr><td>{html_mod.escape(repr(s))}</td><td>{x:+.5f}</td><td>{raw:+.5f}</td>"
                       + (f"<td>{gold[k]:+.4f}</td>" if gold else "") + "</tr>"
                       for k, (s, x, raw) in enumerate(zip(pieces, rewards, lr)))
        page.append("<table><tr><th>token</th><th>reward</th><th>log-ratio</th>" + ("<th>gold</th>" if gold else "")
                    + f"</tr>{rows}</table>")
    if cfg.html:
        Path(cfg.html).write_text("\n".join(page) + "\n</body>\n", encoding="utf-8")
        print(f"wrote {cfg.html}")
    return {"responses": responses, "log_ratios": logratios}


# ==========================================================================================================
# Command line: `train.py STAGE --field value ...`, fields straight from the dataclasses above.

STAGES = {"all": (PipelineConfig, run_all), "sft": (SFTConfig, run_sft), "dpo": (DPOConfig, run_dpo),
          "rm": (RMConfig, run_rm), "ppo": (PPOConfig, run_ppo), "sample": (SampleConfig, run_sample),
          "explain": (ExplainConfig, run_explain)}


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage")
    for name, (cls, _) in STAGES.items():
        p = sub.add_parser(name, help=(cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        for f in dataclasses.fields(cls):
            f_help = f.metadata.get("help", "").replace("%", "%%")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if f.type in ("bool", bool):
                p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default,
                               help=f_help)
            elif f.type in ("list", list):
                p.add_argument(f"--{f.name}", action="append", default=None, help=f_help)
            else:
                typ = {"int": int, "float": float, "str": str, "int | None": int, "float | None": float}.get(
                    f.type, type(default))
                p.add_argument(f"--{f.name}", type=typ, default=default, help=f_help)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["all", *argv]  # `python train.py --seed 1` is the pipeline with a flag
    ns = parser.parse_args(argv)
    cls, fn = STAGES[ns.stage or "all"]
    kwargs = {k: v for k, v in vars(ns).items() if k != "stage" and v is not None}
    return cls(**kwargs), fn


def main(argv=None):
    cfg, fn = parse_args(sys.argv[1:] if argv is None else argv)
    init_dist(cfg.device)
    ok = False
    try:
        torch.manual_seed(getattr(cfg, "seed", 0))
        result = fn(cfg)
        ok = True
        return result
    except Exception:
        if D.world > 1:  # name the rank: torchrun prints every worker's output interleaved
            print(f"[rank {D.rank}] failed:", file=sys.stderr, flush=True)
        raise
    finally:
        release_locks(ok)
        close_dist(ok)


# A mistake in the command line, the data or a checkpoint is reported in one line, not a traceback; these are the
# errors this project raises with a message that says what and where (--debug or RTO_DEBUG=1: the traceback).
USER_ERRORS = (ValueError, KeyError, OSError)


def cli():
    debug = "--debug" in sys.argv or os.environ.get("RTO_DEBUG", "") not in ("", "0")
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
    try:
        main()
    except USER_ERRORS as e:
        if debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        where = f"[rank {D.rank}] " if D.world > 1 else ""
        print(f"{where}error: {msg}\n(run with --debug or RTO_DEBUG=1 for the traceback)", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    record(cli)()  # under torchrun, a failing rank's traceback (not a user error's) is in the job's error summary
    if D.world > 1:
        # gloo occasionally aborts the process during interpreter shutdown after a clean destroy (seen on
        # torch 2.13 CPU, about 1 run in 5), which torchrun reports as a failed job: leave without the shutdown
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)
