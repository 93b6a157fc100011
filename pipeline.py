"""`train.py all`: every stage in one command (SFT -> DPO -> reward model -> each PPO variant), then every policy
judged on held-out prompts, in a results table.

    python train.py                                   # the built-in task (task.py), its gold reward as the judge
    python train.py all --model DIR --sft_data sft.jsonl --prefs prefs.jsonl --prompts prompts.jsonl --algos ppo,rto
    python train.py all ... --reuse --algos ppo,rto-pos # keep the finished SFT / DPO / RM stages, rerun the PPO ones

On the built-in task a tiny model is trained from scratch, with DEMO's values below. With --model it is your own
checkpoint and JSONL files, with each stage's own defaults (the paper's values); the reward model is then the judge,
as no gold reward exists. `--set STAGE.FIELD=VALUE` sets any field of a stage's config in either case.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import rto
import train
from checkpoint import open_model
from checks import UserError, check_regular, ppo_fields_read
from config import (COUNT, NONNEG, POS, Bf16Field, DeviceField, RunDirFields, SeedField, SetField, check_range,
                    config_json, option)
from cli import parse_sets
from data import chunks, read_prompts, response_texts, seed_for
from hf import Tokenizer
from parallel import D, all_sum, barrier, print0
from rundir import changed_fields, take_dir, why_not_kept, write_json
from task import TASKS, WordTask, train_tokenizer


@dataclass
class PipelineConfig(SeedField, DeviceField, Bf16Field, RunDirFields, SetField):
    """`python train.py` / `python train.py all`: every stage, then a results table. The stages' own fields keep their
    one declaration in their configs: DEMO below sets the built-in task's values, --set STAGE.FIELD=VALUE any of them."""
    out: str = option("runs/demo", "run directory: data/, sft/, dpo/, rm/, <algo>/, results.md (and tokenizer/ for "
                                   "the built-in task)")
    algos: str = option("ppo,rto", "comma-separated PPO variants (rto.ALGOS) and offline methods (r-dpo, simpo, tdpo) "
                                   "to train and compare")
    model: str = option("", "your checkpoint (HF directory with tokenizer.json); '': a new model on the built-in task")
    sft_data: str = option("", "with --model: SFT JSONL ('': --model is already the SFT model, the SFT stage is skipped)")
    prefs: str = option("", "with --model: preference JSONL, for DPO and the reward model")
    eval_prefs: str = option("", "with --model: held-out preference JSONL (accuracy, the RM's score statistics); optional")
    prompts: str = option("", "with --model: PPO prompt JSONL")
    eval_prompts: str = option("", "with --model: held-out prompts to judge every policy on ('': the first --n_eval "
                                   "rows of --prompts are held out, PPO trains on the rest)")
    n_eval: int = option(256, "held-out prompts and preference pairs", COUNT)
    preset: str = option("tiny", "built-in task: model.py preset of the policy trained from scratch")
    task: str = option("words", "built-in task: words (short responses, the demo) | credit (24-48 words, a "
                                "context-dependent per-word gold reward, noisy labels)", choices=tuple(TASKS))
    length_cost: float | None = option(None, "built-in task: override the gold length cost per word of distance from "
                                             "target_words", NONNEG)
    target_words: int | None = option(None, "built-in task: override the response length the gold reward prefers (0: "
                                             "a plain per-word cost)", NONNEG)
    n_sft: int = option(4096, "built-in task: SFT demonstrations (neutral responses)", COUNT)
    n_pref: int = option(4096, "built-in task: preference pairs labelled by Bradley-Terry on the gold reward", COUNT)
    n_prompts: int = option(2048, "built-in task: PPO training prompts", COUNT)
    vocab_size: int = option(512, "built-in task: BPE vocabulary trained on its text (every word one token)",
                             "[64, inf)")
    max_len: int = option(16, "built-in task: max prompt tokens and max response tokens", "[2, inf)")
    batch_size: int = option(64, "built-in task: SFT / DPO / RM examples per step, and responses per PPO rollout",
                             "[2, inf)")
    eval_temperature: float = option(1.0, "sampling temperature of the held-out evaluation (its log-probs use it too)",
                                     POS)
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

# The direct preference methods of the paper's Table 1 besides DPO, as `--algos` names: DPO runs with another loss,
# from the same SFT model on the same pairs (their own fields as DPOConfig declares them; SimPO's beta is its paper's).
OFFLINE = {"r-dpo": dict(loss_type="rdpo"), "simpo": dict(loss_type="simpo", beta=2.0), "tdpo": dict(loss_type="tdpo2")}

STAGES = {"sft": train.SFTConfig, "dpo": train.DPOConfig, "rm": train.RMConfig, "ppo": train.PPOConfig}
PATHS = ("out", "data", "eval_data", "model", "prompts", "policy", "dpo", "rm", "task", "tokenizer")  # `all` sets these
OWN_DATA = ("sft_data", "prefs", "eval_prefs", "prompts", "eval_prompts")


@dataclass
class EvalSettings:
    """How a policy is judged: one sampled response per held-out prompt, seeded, with sampling settings of its own
    (not those of any PPO run)."""
    seed: int
    max_prompt_len: int
    max_new_tokens: int
    micro_batch_size: int
    temperature: float
    top_k: int
    top_p: float
    bf16: bool = False


# ==========================================================================================================
# The data and the stage configs: the built-in task's, or the user's


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
    (rank 0). Returns (task, paths)."""
    out, task = Path(pc.out), make_task(pc)
    data = {k: out / "data" / f"{k}.jsonl" for k in DATA_FILES}
    data["task"] = out / "data" / "task.json"
    if D.main:
        task.write_data(out / "data", pc.n_sft, pc.n_pref, pc.n_prompts, pc.n_eval, rng_seed=pc.seed)
        data["task"].write_text(json.dumps(task.spec(), indent=2) + "\n")
        train_tokenizer(task.corpus(), vocab_size=pc.vocab_size).save(out / "tokenizer")
    barrier()
    return task, data


def own_data(pc: PipelineConfig) -> dict:
    """The user's files by role; without --eval_prompts the first n_eval rows of --prompts are held out for judging
    (written under <out>/data, the rest is what PPO trains on)."""
    for flag in ("prefs", "prompts"):
        if not getattr(pc, flag):
            raise UserError(f"all --model needs --{flag} (and --sft_data unless --model is already an SFT model)")
    data = {"sft": pc.sft_data, "prefs": pc.prefs, "eval_prefs": pc.eval_prefs, "prompts": pc.prompts,
            "eval_prompts": pc.eval_prompts}
    if not pc.eval_prompts:
        lines = [line for line in Path(pc.prompts).read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]
        if len(lines) <= pc.n_eval:
            raise UserError(f"{pc.prompts}: {len(lines)} prompts, not more than --n_eval {pc.n_eval} to hold out for "
                            f"judging: lower --n_eval or give --eval_prompts")
        data["eval_prompts"], data["prompts"] = Path(pc.out) / "data" / "eval_prompts.jsonl", \
            Path(pc.out) / "data" / "prompts.jsonl"
        if D.main:
            data["prompts"].parent.mkdir(parents=True, exist_ok=True)
            data["eval_prompts"].write_text("".join(lines[:pc.n_eval]), encoding="utf-8")
            data["prompts"].write_text("".join(lines[pc.n_eval:]), encoding="utf-8")
        barrier()
    return {k: str(v) for k, v in data.items()}


def stage_configs(pc: PipelineConfig, data: dict, tok_dir: Path | None):
    """The stages' configs: the pipeline's paths and shared fields, DEMO's values on the built-in task (tok_dir: its
    trained tokenizer), the stage defaults on the user's model, then --set. Returns (sft or None, dpo, rm, {algo: ppo})."""
    out, over = Path(pc.out), parse_sets(pc.set, STAGES, PATHS)
    common = dict(seed=pc.seed, device=pc.device, progress=pc.progress, overwrite=pc.overwrite, bf16=pc.bf16)
    demo = {k: {} for k in STAGES} if pc.model else DEMO
    if pc.model:
        sizes = {k: {} for k in STAGES}
    else:  # the built-in task: its lengths, and batch sizes from --batch_size (each rank's share in one pass)
        lens = dict(max_prompt_len=pc.max_len, max_response_len=pc.max_len)
        micro = pc.batch_size // D.world
        size = dict(lens, batch_size=pc.batch_size, micro_batch_size=micro)
        sizes = {"sft": size, "dpo": size, "rm": size, "ppo": dict(lens, rollout_batch_size=pc.batch_size,
                                                                  batch_size=pc.batch_size // 2,
                                                                  micro_batch_size=micro // 2)}

    def merged(stage):  # the pipeline's sizes, DEMO's values, then --set (later wins)
        return {**common, **sizes[stage], **demo[stage], **over[stage]}

    sft_final = out / "sft" / "final" if not pc.model or pc.sft_data else Path(pc.model)
    sft = None if pc.model and not pc.sft_data else train.SFTConfig(
        **merged("sft"), out=str(out / "sft"), data=str(data["sft"]), model=pc.model,
        **({} if pc.model else dict(tokenizer=str(tok_dir), preset=pc.preset)))
    pref = dict(data=str(data["prefs"]), eval_data=str(data["eval_prefs"] or ""), model=str(sft_final))
    dpo_cfg = train.DPOConfig(**merged("dpo"), **pref, out=str(out / "dpo"))
    rm_cfg = train.RMConfig(**merged("rm"), **pref, out=str(out / "rm"))
    ppo_cfgs = {algo: only_loaded(train.PPOConfig(**{**merged("ppo"), "overwrite": pc.overwrite or pc.reuse},
                                                  out=str(out / algo), algo=algo, prompts=str(data["prompts"]),
                                                  policy=str(sft_final), dpo=str(out / "dpo" / "final"),
                                                  rm=str(out / "rm" / "final"), task=str(data.get("task", ""))),
                                  kept=over["ppo"])
                for algo in pc.algos.split(",") if algo in rto.ALGOS}
    return sft, dpo_cfg, rm_cfg, ppo_cfgs


def only_loaded(cfg, kept=()):
    """A PPO stage config without what it never reads: the DPO model or RM it does not load (a PPO run refuses a
    --dpo it never reads), and DEMO's values of fields it does not read (a critic's learning rate under a critic-free
    estimator) back at their defaults, but for the fields in `kept` (the user's --set: those are warned about)."""
    defaults, read = train.PPOConfig(), ppo_fields_read(cfg)
    unread = {f: getattr(defaults, f) for f, used in read.items() if not used and f not in kept}
    return dataclasses.replace(cfg, **unread, **{flag: "" for flag in train.HEADS if flag not in train.frozen_models(cfg)})


def offline_config(dpo_cfg, out: Path, name: str):
    """The DPO stage config of one offline method (OFFLINE[name]) writing into out; --set dpo.* applies to it too,
    but for the fields OFFLINE sets (SimPO keeps its beta 2.0)."""
    return dataclasses.replace(dpo_cfg, out=str(out), **OFFLINE[name])


def eval_settings(pc: PipelineConfig, ppo_cfg=None) -> EvalSettings:
    """The built-in task's evaluation lengths and micro-batch; on the user's data the PPO stage's."""
    sampling = dict(seed=pc.seed, temperature=pc.eval_temperature, top_k=pc.eval_top_k, top_p=pc.eval_top_p,
                    bf16=pc.bf16)
    if ppo_cfg is not None:
        return EvalSettings(max_prompt_len=ppo_cfg.max_prompt_len, max_new_tokens=ppo_cfg.max_response_len,
                            micro_batch_size=ppo_cfg.micro_batch_size, **sampling)
    return EvalSettings(max_prompt_len=pc.max_len, max_new_tokens=pc.max_len,
                        micro_batch_size=pc.batch_size // D.world // 2, **sampling)


# ==========================================================================================================
# --reuse: a shared stage is kept when it is the run this one would make


def same_run(cfg, final: Path) -> bool:
    """final/ was written by a finished run of this very config (up to fields that change nothing it computed). A
    field the finished run did not have yet (a fork's new hyper-parameter) counts as equal at its default value."""
    saved = final / "train_config.json"
    if not check_regular(saved, "a run's config"):
        return False
    return not changed_fields(json.loads(saved.read_text()), cfg, ("progress", "overwrite", "save_every", "resume"))


def run_or_reuse(cfg, fn, reuse: bool) -> bool:
    """Run a shared stage, or (--reuse) keep the finished run it would make: the same config, the same inputs by
    content (data files, the checkpoint it started from: rundir.INPUTS) and its own weights as it wrote them. Anything
    else reruns it, and says why. Returns True when it was kept."""
    final = Path(cfg.out) / "final"
    if reuse and final.is_dir():
        why = "its config differs" if not same_run(cfg, final) else why_not_kept(final, cfg)
        if why is None:
            print0(f"--reuse: {final} is what this stage would make (same config, inputs and weights): kept")
            return True
        print0(f"--reuse: {final} is run again: {why}")
    fn(dataclasses.replace(cfg, overwrite=True) if reuse else cfg)
    return False


# ==========================================================================================================
# Judging: every policy answers the held-out prompts once


@torch.no_grad()
def evaluate(policy_dir: Path, ref, tok: Tokenizer, prompt_rows, ev: EvalSettings, gold=None, rm_model=None):
    """Sample one response per prompt (seeded) from the policy; per prompt: gold reward (a built-in task), RM score,
    the sequence KL sum_h log(pi/pi_ref)(y_h) on the policy's own samples, length and EOS. Prompts split over ranks."""
    policy = open_model(str(policy_dir), "lm", ev, tok, frozen=True)
    n = len(prompt_rows)
    own = list(range(D.rank, n, D.world))
    mine = own + [own[0] if own else 0] * (math.ceil(n / D.world) - len(own))  # equal work on every rank (FSDP)
    out = {k: torch.zeros(n, dtype=torch.float64, device=D.device) for k in ("gold", "score", "kl", "len", "eos")}
    gen = torch.Generator(device=D.device).manual_seed(seed_for(ev.seed, 10**6, D.rank))
    prompts = [tok.encode_prompt(prompt_rows[i].prompt, ev.max_prompt_len) for i in mine]
    buf = train.sample_responses(policy, tok, prompts, gen, max_new_tokens=ev.max_new_tokens,
                                 temperature=ev.temperature, top_k=ev.top_k, top_p=ev.top_p, micro=ev.micro_batch_size)
    P, mask = buf["prompt_len"], buf["response_mask"]
    texts = response_texts(buf, tok)
    seen = set()
    for rows in chunks(list(range(len(mine))), ev.micro_batch_size):
        b = train.micro_view(buf, rows)
        kl = train.ppo_math.masked_sum(train.ppo_math.response_logprobs(policy, b, ev.temperature)
                                       - train.ppo_math.response_logprobs(ref, b, ev.temperature),
                                       b["response_mask"], -1)
        sc = train.rm_math.sequence_scores(rm_model, b) if rm_model is not None else torch.zeros(len(rows),
                                                                                                 device=D.device)
        for j, r in enumerate(rows):
            i = mine[r]
            if r >= len(own) or i in seen:  # padding rows: another rank (or an earlier row) owns this prompt
                continue
            seen.add(i)
            out["gold"][i] = gold(prompt_rows[i].prompt, texts[r]) if gold else 0.0
            out["score"][i], out["kl"][i], out["len"][i] = sc[j], kl[j], mask[r].sum()
            out["eos"][i] = float(buf["input_ids"][r, P:][mask[r]][-1].item() in tok.stop_ids)
    del policy
    return {k: all_sum(v).cpu() for k, v in out.items()}


def length_controlled_win_rate(judge_diff, len_diff) -> float:
    """The LC win rate of AlpacaEval 2's minimal GLM (Dubois et al. 2024, their "length_controlled_minimal"), for one
    policy against one baseline: a logistic regression of the judge's preference (1 win, 0 loss, 0.5 tie; judge_diff =
    the judge's score of the policy's response minus the baseline's, per prompt) on an intercept and
    tanh(len_diff / std(len_diff)), the normalised length difference, read at zero length difference: sigmoid of the
    intercept. It is not AlpacaEval 2's published LC: that one adds a per-instruction difficulty term fitted across
    many models, fits with cross-validated L1 on soft labels and pools in the gamed baselines (on its own released
    judgements this function is a median 4.2 points from the published LC). numpy only: Newton's method on the
    cross-entropy, with an L2 of 1e-6 so a perfect separation still converges. Returns a rate in [0, 1]."""
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


def results_table(res: dict, judge: str) -> tuple[list[str], dict]:
    """The table of every policy against SFT, judged by `judge`: "gold" (the built-in task's true reward, the RM score
    a column beside it) or "score" (the reward model's, on your data). Returns (markdown lines, summary)."""
    gold = judge == "gold"
    head = (["| policy | gold reward | win rate vs SFT (gold) | RM score | KL to SFT | response length | "
             "LC win rate vs SFT (gold, minimal GLM) |", "|---|---|---|---|---|---|---|"] if gold else
            ["| policy | RM score | win rate vs SFT (RM) | LC win rate vs SFT (RM, minimal GLM) | KL to SFT | "
             "response length | EOS rate |", "|---|---|---|---|---|---|---|"])
    lines, summary = list(head), {}
    for name, r in res.items():
        diff = r[judge] - res["sft"][judge]
        win = ((diff > 0).double() + 0.5 * (diff == 0).double()).mean().item()
        lc = length_controlled_win_rate(diff.numpy(), (r["len"] - res["sft"]["len"]).numpy())
        s = summary[name] = {"gold": r["gold"].mean().item(), "win_vs_sft": win, "rm_score": r["score"].mean().item(),
                             "kl": r["kl"].mean().item(), "len": r["len"].mean().item(), "lc_win_vs_sft": lc,
                             "eos": r["eos"].mean().item()}
        lines.append(f"| {name} | {s['gold']:.3f} | {win:.3f} | {s['rm_score']:.3f} | {s['kl']:.3f} | {s['len']:.2f} "
                     f"| {lc:.3f} |" if gold else
                     f"| {name} | {s['rm_score']:.3f} | {win:.3f} | {lc:.3f} | {s['kl']:.3f} | {s['len']:.2f} "
                     f"| {s['eos']:.3f} |")
    return lines, summary


# ==========================================================================================================
# The pipeline


def check_pipeline(pc: PipelineConfig):
    """Before anything is written: ranges, --algos names, and own data only with --model."""
    check_range(pc)
    for algo in pc.algos.split(","):
        if algo not in rto.ALGOS and algo not in OFFLINE:
            raise UserError(f"--algos: unknown {algo!r}; choose from {', '.join([*rto.ALGOS, *OFFLINE])}")
    given = [f"--{k}" for k in OWN_DATA if getattr(pc, k)]
    if given and not pc.model:
        raise UserError(f"{' '.join(given)} need --model (your checkpoint, with its tokenizer); without --model "
                        f"`all` runs the built-in task")


def train_stages(pc: PipelineConfig, data: dict, tok_dir) -> tuple[dict, dict]:
    """SFT, DPO, the RM, the offline methods and every PPO variant, each kept or rerun under --reuse. Returns
    ({policy name: its final/}, the stage configs by name)."""
    sft_cfg, dpo_cfg, rm_cfg, ppo_cfgs = stage_configs(pc, data, tok_dir)
    # --reuse: a shared stage is kept when it is the run this one would make: its config, its inputs by content (a
    # DPO run made from another SFT model than today's, or from data since rewritten, is run again) and its weights
    if sft_cfg is not None:
        run_or_reuse(sft_cfg, train.run_sft, pc.reuse)
    for stage_cfg, fn in ((dpo_cfg, train.run_dpo), (rm_cfg, train.run_rm)):
        run_or_reuse(stage_cfg, fn, pc.reuse)
    policies = {"sft": Path(dpo_cfg.model), "dpo": Path(dpo_cfg.out) / "final"}
    for name in [a for a in pc.algos.split(",") if a in OFFLINE]:  # the other direct preference methods
        offline_cfg = offline_config(dpo_cfg, Path(pc.out) / name, name)
        run_or_reuse(offline_cfg, train.run_dpo, pc.reuse)
        policies[name] = Path(offline_cfg.out) / "final"
    for algo, cfg in ppo_cfgs.items():
        policies[algo] = train.run_ppo(cfg)
    # (the evaluation's lengths on your data: the PPO stage's, or a PPO config's defaults and --set when none runs)
    ppo = next(iter(ppo_cfgs.values()), None) or train.PPOConfig(**parse_sets(pc.set, STAGES, PATHS)["ppo"])
    return policies, {"rm": rm_cfg, "ppo": ppo}


def run_all(pc: PipelineConfig):
    out = Path(pc.out)
    check_pipeline(pc)
    print0("== PipelineConfig\n" + config_json(pc))
    take_dir(out)  # one `all` per directory, before anything is written (its data files included)
    if pc.model:
        task, data, tok_dir = None, own_data(pc), None
    else:
        task, data = task_data(pc)
        tok_dir = out / "tokenizer"
    t0 = time.perf_counter()
    policies, cfgs = train_stages(pc, data, tok_dir)
    train_s = time.perf_counter() - t0

    # Judge every policy on the held-out prompts: against the gold reward on the built-in task, else the RM's score.
    ev = eval_settings(pc, cfgs["ppo"] if pc.model else None)
    tok = Tokenizer.from_dir(policies["sft"])
    ref = open_model(str(policies["sft"]), "lm", ev, tok, frozen=True)
    rm_model = open_model(str(out / "rm" / "final"), "score", ev, tok, frozen=True)
    rows = read_prompts(data["eval_prompts"])
    res = {name: evaluate(path, ref, tok, rows, ev, task.gold_reward if task else None, rm_model)
           for name, path in policies.items()}
    rm_eval = json.loads((out / "rm" / "eval.json").read_text())
    dpo_eval = json.loads((out / "dpo" / "eval.json").read_text()) if (out / "dpo" / "eval.json").is_file() else None
    table, summary = results_table(res, "gold" if task else "score")
    pairs = ("training" if rm_eval["on"] == "train" else "held-out") if pc.model else f"{pc.n_eval} held-out"
    notes = [f"reward model accuracy on {pairs} pairs: {rm_eval['eval_accuracy']:.3f}"]
    if dpo_eval is not None:
        notes.append(f"DPO implicit-reward accuracy on the same pairs: {dpo_eval['eval_accuracy']:.3f}")
    notes.append(f"training time (all stages, {D.world} process{'es' if D.world > 1 else ''}): {train_s:.0f} s")
    text = "\n".join(table + [""] + notes) + "\n"
    print0("\n" + text)
    if D.main:
        (out / "results.md").write_text(text)
    write_json(out / "results.json", {"policies": summary, "rm": rm_eval, "dpo": dpo_eval, "train_seconds": train_s,
                                      "judge": "gold" if task else "reward model"})
    return summary
