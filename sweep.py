"""The sample-efficiency experiment: does RTO's dense token reward let PPO learn more from each sample?

    python sweep.py --quick                 # a reduced grid into runs/sweep_quick, under 5 minutes on 2 CPU cores
    python sweep.py                         # the full grid (5 seeds), about 20 minutes on 2 idle CPU cores
    python sweep.py --out runs/sweep        # rerun: finished runs are kept, a half-finished one is redone
    python sweep.py --estimators gae,rloo,grpo,rloo-token   # also without a critic (the README's table)

Per seed it trains the shared SFT, DPO and reward model once (train.py's stages, on the built-in "credit" task:
responses of 24-48 words whose gold reward is a sum of context-dependent per-word terms; task.TASKS), then runs
PPO with every algorithm (ppo, rto, semi-rto, dpo-only) at 1/8, 1/4, 1/2 and all of the prompt budget (one epoch
over that many prompts: fewer prompts, fewer rollouts), RTO's beta1 / clip ablation at the full budget, and with
--estimators the critic-free advantage estimators (rloo, grpo, rloo-token: --samples_per_prompt responses to each
prompt, no critic) for every algorithm at the full budget, the same number of rollouts and responses. Each
policy answers the held-out prompts once; its gold reward, win rate against SFT, KL to SFT, length and EOS rate go
into <out>/results.md with the mean and a 95% interval over seeds, beside where each PPO iteration's time goes.
It also measures the paper's core assumption: the correlation between the DPO token reward log(pi_dpo / pi_ref)
and the gold per-token reward on held-out SFT responses. With matplotlib installed (an optional extra) it draws
<out>/curves.png (gold reward of the rollouts against rollouts seen, a band over seeds) and <out>/gold_vs_kl.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import explain
import pipeline
import rto
import train
from checkpoint import open_model
from cli import add_fields
from data import read_prompts, seed_for
from hf import Tokenizer
from parallel import D, init_dist, print0
from ppo import ESTIMATORS
from rundir import clear_stale_lock, release_locks, take_dir
from task import TASKS

# two-sided 95% Student-t quantiles for n - 1 degrees of freedom (the interval over n seeds)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


@dataclass
class SweepConfig:
    out: str = ""  # one directory per seed (seed_0/ ...), results.md, results.json, the plots; default
    # runs/sweep, or runs/sweep_quick with --quick (a directory holds one grid: see main)
    task: str = "credit"  # a built-in task (task.TASKS)
    seeds: int = 5  # seeds 0 .. seeds-1: task table, data, every stage
    algos: str = "ppo,rto,semi-rto,dpo-only"  # PPO variants run at every budget
    budgets: str = "0.125,0.25,0.5,1"  # fractions of the prompt budget
    ablation: str = "0.2:0.2,0.5:0.5,0.5:inf"  # rto beta1:clip pairs at the full budget (beside the reference 0.05:0.05)
    ppo_steps: int = 64  # PPO rollouts at the full budget: n_prompts = ppo_steps * batch_size (one epoch)
    batch_size: int = 32  # prompts per rollout (and SFT/DPO/RM examples per step)
    n_sft: int = 2048  # SFT demonstrations
    n_pref: int = 2048  # noisy Bradley-Terry preference pairs (DPO and the RM learn from the same ones)
    n_eval: int = 128  # held-out prompts and pairs
    sft_epochs: int = 3
    pref_epochs: int = 2
    offline: str = "r-dpo,simpo,tdpo"  # the paper's other direct preference methods (pipeline.OFFLINE), once per seed
    estimators: str = "gae"  # advantage estimators (ppo.ESTIMATORS); beyond gae each runs --algos at the full budget
    samples_per_prompt: int = 4  # responses per prompt for the critic-free estimators (a rollout keeps batch_size
    # responses, so they see batch_size / samples_per_prompt prompts per rollout, the same number of samples)
    quick: bool = False  # 2 seeds, budgets 1/4 and 1, 16 full-budget rollouts, one ablation: 2 minutes
    device: str = "auto"

    def __post_init__(self):
        self.out = self.out or ("runs/sweep_quick" if self.quick else "runs/sweep")
        if self.quick:
            self.seeds, self.budgets, self.ablation, self.ppo_steps = 2, "0.25,1", "0.5:inf", 16
            self.n_sft, self.n_pref, self.n_eval, self.sft_epochs, self.pref_epochs = 1024, 512, 64, 2, 1


def variants(cfg: SweepConfig) -> list[dict]:
    """Every PPO run of one seed: name, algo, budget, beta1, clip, estimator."""
    out = [dict(name=f"{a}_b{b}", algo=a, budget=float(b), beta1=0.05, clip=0.05, estimator="gae")
           for a in cfg.algos.split(",") for b in cfg.budgets.split(",")]
    for pair in filter(None, cfg.ablation.split(",")):
        beta1, clip = pair.split(":")
        out.append(dict(name=f"rto_beta{beta1}_clip{clip}", algo="rto", budget=1.0, beta1=float(beta1),
                        clip=float(clip), estimator="gae"))
    for est in [e for e in cfg.estimators.split(",") if e != "gae"]:
        out += [dict(name=f"{a}_{est}_b1", algo=a, budget=1.0, beta1=0.05, clip=0.05, estimator=est)
                for a in cfg.algos.split(",")]
    return out


def finished(path: Path, marker: str) -> bool:
    """A stage is reused only if it completed (its marker exists); a half-finished one is removed and redone. The lock
    a killed sweep left in a finished stage goes too (rundir.clear_stale_lock)."""
    if (path / marker).exists():
        clear_stale_lock(path)
        return True
    shutil.rmtree(path, ignore_errors=True)
    return False


def check_sweep(cfg: SweepConfig):
    """Every argument, before any work: one line each for a name that is no algorithm, estimator, offline method or
    task, a budget outside (0, 1], an ablation that is not BETA1:CLIP pairs, sizes that are not positive."""
    problems = [f"--algos: unknown {a!r} (choose from {', '.join(rto.ALGOS)})" for a in cfg.algos.split(",")
                if a not in rto.ALGOS]
    problems += [f"--estimators: unknown {e!r} (choose from {', '.join(ESTIMATORS)})" for e in cfg.estimators.split(",")
                 if e not in ESTIMATORS]
    problems += [f"--offline: unknown {o!r} (choose from {', '.join(pipeline.OFFLINE)})"
                 for o in filter(None, cfg.offline.split(",")) if o not in pipeline.OFFLINE]
    problems += [] if cfg.task in TASKS else [f"--task {cfg.task!r}: choose from {', '.join(TASKS)}"]
    for b in cfg.budgets.split(","):
        try:
            ok = 0 < float(b) <= 1
        except ValueError:
            ok = False
        problems += [] if ok else [f"--budgets: {b!r} is not a fraction in (0, 1]"]
    for pair in filter(None, cfg.ablation.split(",")):
        try:
            ok = all(float(x) > 0 for x in pair.split(":")) and len(pair.split(":")) == 2
        except ValueError:
            ok = False
        problems += [] if ok else [f"--ablation: {pair!r} is not BETA1:CLIP (two positive numbers, inf allowed)"]
    problems += [f"--{f} {getattr(cfg, f)}: must be at least 1" for f in ("seeds", "ppo_steps", "batch_size", "n_sft",
                 "n_pref", "n_eval", "sft_epochs", "pref_epochs", "samples_per_prompt") if getattr(cfg, f) < 1]
    if problems:
        raise SystemExit("sweep.py: " + "; ".join(problems))


def run_seed(cfg: SweepConfig, seed: int) -> dict:
    d = Path(cfg.out) / f"seed_{seed}"
    stages = [f"sft.epochs={cfg.sft_epochs}", f"dpo.epochs={cfg.pref_epochs}", f"rm.epochs={cfg.pref_epochs}",
              f"ppo.max_steps={cfg.ppo_steps}"]
    pc = pipeline.PipelineConfig(out=str(d), seed=seed, task=cfg.task, max_len=64, n_sft=cfg.n_sft, n_pref=cfg.n_pref,
                              n_prompts=cfg.ppo_steps * cfg.batch_size, n_eval=cfg.n_eval, set=stages,
                              batch_size=cfg.batch_size, progress=False, device=cfg.device, algos="rto")
    if not (d / "tokenizer" / "tokenizer.json").exists():
        task, data = pipeline.task_data(pc)
    else:
        task = pipeline.make_task(pc)
        data = {k: d / "data" / f"{k}.jsonl" for k in pipeline.DATA_FILES}
        data["task"] = d / "data" / "task.json"
    sft_cfg, dpo_cfg, rm_cfg, ppo_cfgs = pipeline.stage_configs(pc, data, d / "tokenizer")
    for stage_cfg, run in ((sft_cfg, train.run_sft), (dpo_cfg, train.run_dpo), (rm_cfg, train.run_rm)):
        if not finished(Path(stage_cfg.out), "final/config.json"):
            run(stage_cfg)
    sft, dpo = Path(sft_cfg.out) / "final", Path(dpo_cfg.out) / "final"
    tok = Tokenizer.from_dir(sft)
    template, judging = ppo_cfgs["rto"], pipeline.eval_settings(pc)
    ref = open_model(str(sft), "lm", judging, tok, frozen=True)
    rm_model = open_model(str(Path(rm_cfg.out) / "final"), "score", judging, tok, frozen=True)
    rows = read_prompts(data["eval_prompts"])

    def judge(policy_dir, name):
        path = d / f"eval_{name}.json"
        if not path.exists():
            r = pipeline.evaluate(policy_dir, ref, tok, rows, judging, task.gold_reward, rm_model)
            path.write_text(json.dumps({k: v.tolist() for k, v in r.items()}))
        return {k: np.array(v) for k, v in json.loads(path.read_text()).items()}

    base = {"sft": judge(sft, "sft"), "dpo": judge(dpo, "dpo")}
    for name in filter(None, cfg.offline.split(",")):  # DPO runs with another loss, on the same pairs, from the same SFT
        offline_cfg = pipeline.offline_config(dpo_cfg, d / name, name)
        if not finished(Path(offline_cfg.out), "final/config.json"):
            train.run_dpo(offline_cfg)
        base[name] = judge(Path(offline_cfg.out) / "final", name)
    results = {}
    all_prompts = data["prompts"].read_text().splitlines(keepends=True)
    for v in variants(cfg):
        run_dir = d / v["name"]
        if not finished(run_dir, "result.json"):
            n = max(cfg.batch_size, round(v["budget"] * len(all_prompts)) // cfg.batch_size * cfg.batch_size)
            subset = d / "data" / f"prompts_{n}.jsonl"
            subset.write_text("".join(all_prompts[:n]))
            k = cfg.samples_per_prompt if v["estimator"] != "gae" else 1
            ppo_cfg = pipeline.only_loaded(dataclasses.replace(
                template, out=str(run_dir), algo=v["algo"], prompts=str(subset), max_steps=n // cfg.batch_size,
                beta1=v["beta1"], dpo_clip=v["clip"], estimator=v["estimator"], samples_per_prompt=k,
                dpo=str(Path(dpo_cfg.out) / "final"), rm=str(Path(rm_cfg.out) / "final")))
            train.run_ppo(ppo_cfg)
            ev = judge(run_dir / "final", v["name"])
            steps = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
            diff = ev["gold"] - base["sft"]["gold"]
            res = {**v, "clip": v["clip"] if math.isfinite(v["clip"]) else None,  # JSON has no inf: null = no clip
                   "rollouts": n, "gold": float(ev["gold"].mean()), "kl": float(ev["kl"].mean()),
                   "len": float(ev["len"].mean()), "eos": float(ev["eos"].mean()),
                   "win_vs_sft": float(((diff > 0) + 0.5 * (diff == 0)).mean()),
                   "curve": [[s["step"] * cfg.batch_size, s["gold"]] for s in steps],
                   **{k: float(np.mean([s[k] for s in steps])) for k in ("time_gen_s", "time_score_s", "time_update_s")}}
            (run_dir / "result.json").write_text(json.dumps(res))
        results[v["name"]] = json.loads((run_dir / "result.json").read_text())
    for name in base:
        diff = base[name]["gold"] - base["sft"]["gold"]
        results[name] = {"name": name, "gold": float(base[name]["gold"].mean()), "kl": float(base[name]["kl"].mean()),
                         "len": float(base[name]["len"].mean()), "eos": float(base[name]["eos"].mean()),
                         "win_vs_sft": float(((diff > 0) + 0.5 * (diff == 0)).mean())}
    for name in results:  # the LC win rate of AlpacaEval 2's minimal GLM against SFT, the gold reward as the judge
        ev = base.get(name) or judge(None, name)
        results[name]["lc_win_vs_sft"] = pipeline.length_controlled_win_rate(ev["gold"] - base["sft"]["gold"],
                                                                          ev["len"] - base["sft"]["len"])
    results["correlation"] = correlation(d, task, tok, sft, dpo, ref, rows, judging)
    results["rm_accuracy"] = json.loads((Path(rm_cfg.out) / "eval.json").read_text())["eval_accuracy"]
    return results


def correlation(d: Path, task, tok, sft: Path, dpo: Path, ref, rows, ev) -> float:
    """Pearson correlation, over every token of one SFT sample per held-out prompt, between the DPO token reward
    log(pi_dpo / pi_ref)(y_h) and the gold reward of that token: the assumption RTO rests on, measured."""
    path = d / "correlation.json"
    if not path.exists():
        policy = open_model(str(sft), "lm", ev, tok, frozen=True)
        dpo_model = open_model(str(dpo), "lm", ev, tok, frozen=True)
        prompts = [tok.encode_prompt(r.prompt, ev.max_prompt_len) for r in rows]
        gen = torch.Generator().manual_seed(seed_for(ev.seed, 2 * 10**6))
        buf = train.sample_responses(policy, tok, prompts, gen, max_new_tokens=ev.max_new_tokens,
                                     temperature=ev.temperature, top_k=ev.top_k, top_p=ev.top_p,
                                     micro=ev.micro_batch_size)
        P, mask = buf["prompt_len"], buf["response_mask"]
        responses = [buf["input_ids"][i, P:][mask[i]].tolist() for i in range(len(rows))]
        xs, ys = [], []
        for lo in range(0, len(rows), ev.micro_batch_size):
            hi = lo + ev.micro_batch_size
            lrs = explain.dpo_log_ratios(dpo_model, ref, tok, prompts[lo:hi], responses[lo:hi])
            for r, ids, lr in zip(rows[lo:hi], responses[lo:hi], lrs):
                gold = explain.gold_per_token(task, r.prompt, tok, ids)
                if gold is not None:
                    body = [k for k, i in enumerate(ids) if i not in tok.stop_ids]
                    xs += [lr[k] for k in body]
                    ys += [gold[k] for k in body]
        path.write_text(json.dumps({"pearson": float(np.corrcoef(xs, ys)[0, 1]), "tokens": len(xs)}))
    return json.loads(path.read_text())["pearson"]


def interval(xs) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval over seeds (Student t)."""
    xs = np.asarray(xs, dtype=float)
    if len(xs) < 2:
        return float(xs.mean()), float("nan")
    return float(xs.mean()), T95.get(len(xs) - 1, 1.96) * float(xs.std(ddof=1)) / math.sqrt(len(xs))


def table(cfg: SweepConfig, per_seed: list[dict]) -> str:
    names = ["sft", "dpo", *filter(None, cfg.offline.split(","))] + [v["name"] for v in variants(cfg)]
    lines = [f"Task `{cfg.task}`, {len(per_seed)} seeds, {cfg.ppo_steps} rollouts of {cfg.batch_size} prompts at the "
             f"full budget; mean and 95% interval over seeds.", "",
             "| policy | prompt budget | gold reward | win rate vs SFT | LC win rate vs SFT (minimal GLM) | KL to SFT | length | "
             "EOS rate | s/iteration: generate / score / update |", "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        rs = [s[name] for s in per_seed]
        g, gi = interval([r["gold"] for r in rs])
        w, wi = interval([r["win_vs_sft"] for r in rs])
        k, _ = interval([r["kl"] for r in rs])
        budget = f"{rs[0]['budget']:g} ({rs[0]['rollouts']} prompts)" if "budget" in rs[0] else "-"
        times = (" / ".join(f"{np.mean([r[t] for r in rs]):.2f}" for t in ("time_gen_s", "time_score_s", "time_update_s"))
                 if "time_gen_s" in rs[0] else "-")
        lc, lci = interval([r["lc_win_vs_sft"] for r in rs])
        lines.append(f"| {name} | {budget} | {g:.2f} ± {gi:.2f} | {w:.2f} ± {wi:.2f} | {lc:.2f} ± {lci:.2f} | {k:.2f} | "
                     f"{np.mean([r['len'] for r in rs]):.1f} | {np.mean([r['eos'] for r in rs]):.2f} | {times} |")
    # Paired by seed (the same SFT, DPO model and RM): each algorithm minus PPO at the same budget. The seeds'
    # own spread (their SFT models differ) cancels, so these intervals are the ones to read for "beats PPO".
    lines += ["", "| gold reward minus PPO's, paired by seed | " + " | ".join(f"budget {b}" for b in
                                                                         cfg.budgets.split(",")) + " |",
              "|---|" + "---|" * len(cfg.budgets.split(","))]
    for algo in [a for a in cfg.algos.split(",") if a != "ppo"]:
        cells = []
        for b in cfg.budgets.split(","):
            m, h = interval([s[f"{algo}_b{b}"]["gold"] - s[f"ppo_b{b}"]["gold"] for s in per_seed])
            cells.append(f"{m:+.2f} ± {h:.2f}")
        lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    full = cfg.budgets.split(",")[-1]
    for name in ["dpo", *filter(None, cfg.offline.split(","))]:  # offline: no prompt budget, against PPO's full one
        m, h = interval([s[name]["gold"] - s[f"ppo_b{full}"]["gold"] for s in per_seed])
        lines.append(f"| {name} (offline) | " + " | ".join(["-"] * (len(cfg.budgets.split(",")) - 1))
                     + f"{' | ' if len(cfg.budgets.split(',')) > 1 else ''}{m:+.2f} ± {h:.2f} |")
    others = [e for e in cfg.estimators.split(",") if e != "gae"]
    if others and "ppo" in cfg.algos.split(","):
        # the same question without a critic: does the dense reward still beat the sparse one?
        lines += ["", f"| estimator (full budget; critic-free ones: {cfg.samples_per_prompt} samples per prompt) | "
                      + " | ".join(f"{a} gold" for a in cfg.algos.split(",")) + " | "
                      + " | ".join(f"{a} minus ppo, paired" for a in cfg.algos.split(",") if a != "ppo") + " |",
                  "|---|" + "---|" * (2 * len(cfg.algos.split(",")) - 1)]
        for est in ["gae", *others]:
            name = (lambda a: f"{a}_b1") if est == "gae" else (lambda a, e=est: f"{a}_{e}_b1")
            cells = ["{:.2f} ± {:.2f}".format(*interval([s[name(a)]["gold"] for s in per_seed]))
                     for a in cfg.algos.split(",")]
            cells += ["{:+.2f} ± {:.2f}".format(*interval([s[name(a)]["gold"] - s[name("ppo")]["gold"]
                                                           for s in per_seed]))
                      for a in cfg.algos.split(",") if a != "ppo"]
            lines.append(f"| {est} | " + " | ".join(cells) + " |")
    c, ci = interval([s["correlation"] for s in per_seed])
    a, _ = interval([s["rm_accuracy"] for s in per_seed])
    lines += ["", f"Correlation of the DPO token reward log(pi_dpo/pi_ref) with the gold per-token reward on held-out "
                  f"SFT samples: {c:.3f} ± {ci:.3f}. Reward-model held-out accuracy: {a:.3f}."]
    return "\n".join(lines) + "\n"


def plots(cfg: SweepConfig, per_seed: list[dict]) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        print0("matplotlib is not installed (pip install matplotlib): the table is written, the plots are not")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(cfg.out)
    budgets = [float(b) for b in cfg.budgets.split(",")]
    algos = cfg.algos.split(",")
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.2 * len(budgets), 3.6), sharey=True, squeeze=False)
    for ax, b in zip(axes[0], budgets):
        for algo in algos:
            name = f"{algo}_b{cfg.budgets.split(',')[budgets.index(b)]}"
            curves = np.array([[g for _, g in s[name]["curve"]] for s in per_seed])  # (seeds, steps)
            x = np.array([r for r, _ in per_seed[0][name]["curve"]])
            k = max(1, len(x) // 8)  # a moving average over k rollouts: one rollout's gold is noisy
            smooth = np.array([np.convolve(c, np.ones(k) / k, mode="valid") for c in curves])
            m, s = smooth.mean(0), smooth.std(0, ddof=1) / math.sqrt(len(per_seed)) * T95.get(len(per_seed) - 1, 1.96)
            xs = x[k - 1:]
            ax.plot(xs, m, label=algo)
            ax.fill_between(xs, m - s, m + s, alpha=0.2)
        ax.axhline(np.mean([s["sft"]["gold"] for s in per_seed]), color="gray", ls=":", label="sft")
        ax.set_title(f"budget {b:g}")
        ax.set_xlabel("prompts seen (rollouts x batch)")
    axes[0][0].set_ylabel("gold reward of the rollouts")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    markers = dict(zip(budgets, "v^so"))
    for i, algo in enumerate(algos):
        for b in budgets:
            name = f"{algo}_b{cfg.budgets.split(',')[budgets.index(b)]}"
            ax.scatter([s[name]["kl"] for s in per_seed], [s[name]["gold"] for s in per_seed], color=f"C{i}",
                       marker=markers.get(b, "o"), label=f"{algo} {b:g}", s=18)
    for j, v in enumerate(x for x in variants(cfg) if x["name"].startswith("rto_beta")):
        ax.scatter([s[v["name"]]["kl"] for s in per_seed], [s[v["name"]]["gold"] for s in per_seed], color="k",
                   marker="x+*12"[j % 5], label=v["name"], s=24)
    ax.set_xlabel("KL to SFT (held-out)")
    ax.set_ylabel("gold reward (held-out)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "gold_vs_kl.png", dpi=110)
    return [str(out / "curves.png"), str(out / "gold_vs_kl.png")]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fields(ap, SweepConfig)
    cfg = SweepConfig(**vars(ap.parse_args(argv)))
    check_sweep(cfg)
    init_dist(cfg.device)
    if D.world > 1:
        raise SystemExit("sweep.py runs its many small runs one process at a time: start it with python, not torchrun")
    take_dir(Path(cfg.out))  # one sweep per directory, before anything is written
    try:
        return run_sweep(cfg)
    finally:
        release_locks(True)


def run_sweep(cfg: SweepConfig) -> dict:
    # A rerun reuses finished runs, so a directory must hold one grid: refuse other settings instead of mixing
    # their results into one table (the device may change)
    saved = Path(cfg.out) / "sweep_config.json"
    # (the device may change, and fields that only add rows: a grid with more estimators or offline methods keeps
    # every run it had)
    adds = ("device", "estimators", "offline")
    now = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in adds}
    if saved.exists() and {k: v for k, v in json.loads(saved.read_text()).items() if k not in adds} != now:
        old = json.loads(saved.read_text())
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {now.get(k)!r}" for k in sorted(now) if old.get(k) != now.get(k))
        raise SystemExit(f"{cfg.out} holds a sweep run with other settings ({diff}): give another --out")
    saved.write_text(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if k != "device"}, indent=2) + "\n")
    print0("== SweepConfig\n" + json.dumps(dataclasses.asdict(cfg), indent=2))
    t0 = time.perf_counter()
    per_seed = [run_seed(cfg, s) for s in range(cfg.seeds)]
    text = table(cfg, per_seed) + f"\nwall time of this invocation: {time.perf_counter() - t0:.0f} s\n"
    (Path(cfg.out) / "results.md").write_text(text)
    (Path(cfg.out) / "results.json").write_text(json.dumps(per_seed, indent=1))
    pictures = plots(cfg, per_seed)
    print0("\n" + text + "".join(f"wrote {p}\n" for p in pictures))
    return {"per_seed": per_seed, "plots": pictures}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
