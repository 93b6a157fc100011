"""train.py end to end: torchrun smoke runs, 1-process vs 2-process equivalence, kill-and-resume, and
interrupted checkpoint saves.

Every comparison is against an independent run (or a copy taken before the fact), never against numbers
captured from an earlier run. Everything runs on CPU with tiny budgets; the inputs (data, tokenizer, SFT,
DPO and RM checkpoints) are built once per session by `train.py all`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds, for any one subprocess (the slowest, a 2-process stage, takes ~15 s on 2 busy cores)

# One thread per process: 2 cores, up to 3 processes at once. Drop any torchrun variables of an outer launcher
# so a plain `python train.py` really is a single process.
ENV = {k: v for k, v in os.environ.items()
       if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
       and not k.startswith("TORCHELASTIC")}
ENV["OMP_NUM_THREADS"] = "1"

SHAPE = ["--max_prompt_len", "16", "--max_response_len", "16", "--no-progress"]


# ----------------------------------------------------------------------------------------------------------
# helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(nproc: int, stage: str, *args) -> list[str]:
    if nproc == 1:
        launcher = [sys.executable, "train.py"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                    f"--master_port={free_port()}", "train.py"]
    return launcher + [stage, *map(str, args)]


def start(cmd: list[str], log: Path, **kw) -> subprocess.Popen:
    """Launch cmd from the repository root; stdout+stderr go to `log` (a file: no pipe can fill up)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    f = open(log, "w")
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT, **kw)
    p._log_file, p._log, p._cmd = f, log, cmd
    return p


def finish(p: subprocess.Popen, timeout: float = TIMEOUT) -> str:
    """Wait for p (killing it on timeout), assert it exited 0, return its output."""
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise
    finally:
        p._log_file.close()
    out = p._log.read_text()
    assert p.returncode == 0, f"{' '.join(p._cmd)} exited {p.returncode}:\n{out[-6000:]}"
    return out


def run(cmd: list[str], log: Path, timeout: float = TIMEOUT) -> str:
    return finish(start(cmd, log), timeout)


def run_parallel(cmds: list[tuple[list[str], Path]], timeout: float = TIMEOUT) -> list[str]:
    """Independent runs at the same time (most of a run is process start-up and gloo waits)."""
    procs = [start(c, log) for c, log in cmds]
    try:
        return [finish(p, timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def by_step(rows: list[dict]) -> dict[int, dict]:
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"duplicate metrics rows: steps {steps}"
    return {r["step"]: r for r in rows}


def safetensors_weights(final: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(final.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    assert sd, f"no safetensors in {final}"
    return sd


def complete_checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name[len("step_"):]) for p in (out / "checkpoints").glob("step_*")
                  if not p.name.endswith(".tmp"))


def children(pid: int) -> list[int]:
    """Direct child processes of pid (Linux /proc)."""
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d.name))
    return kids


def gone(pid: int) -> bool:
    """pid has exited (no such process, or a zombie waiting to be reaped)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def run_until_checkpoint_then_kill(cmd: list[str], out: Path, log: Path, timeout: float = TIMEOUT) -> list[int]:
    """Start cmd, wait until <out>/checkpoints holds a complete checkpoint, then SIGKILL every process of the run:
    torchrun starts its workers in sessions of their own, so they are killed by pid, together with the launcher.
    Returns the complete checkpoint steps left behind. Fails if the run ended on its own."""
    p = start(cmd, log)
    deadline = time.monotonic() + timeout
    try:
        while not complete_checkpoints(out):
            assert p.poll() is None, f"run exited ({p.returncode}) before its first checkpoint:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "no checkpoint before the timeout"
            time.sleep(0.01)
        workers = children(p.pid)
        for pid in workers + [p.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait(timeout=60)
        while not all(gone(w) for w in workers):  # nothing of the run may go on writing
            assert time.monotonic() < deadline, f"workers {workers} survived SIGKILL"
            time.sleep(0.01)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p._log_file.close()
    if "torch.distributed.run" in cmd:
        assert len(workers) == 2, f"expected torchrun's 2 workers, found {workers}"
    # the kill must have interrupted the run: a run that completed on its own proves nothing about resuming
    assert p.returncode == -signal.SIGKILL, f"run was not killed (exit {p.returncode}):\n{log.read_text()[-4000:]}"
    assert not (out / "final").exists(), "the run had already finished when it was killed"
    return complete_checkpoints(out)


# ----------------------------------------------------------------------------------------------------------
# session inputs: data, tokenizer, SFT/DPO/RM checkpoints; plus a policy whose greedy answers vary in length

# Each topic's one fixed response, of a different length. The built-in task's responses are uniformly random
# words, so a policy SFT'd on them answers EOS first under greedy decoding (--top_k 1): every PPO response would
# be one token and the policy loss ~0. A policy that memorised these answers greedily writes 4, 7, 10 or 13
# tokens: real responses, a non-trivial loss, and still deterministic whatever the per-rank RNG.
MEMO = {"rain": "calm new light", "cats": "dirty calm wet full kind happy",
        "music": "dark late brave red sour poor dull blue tiny",
        "ships": "blue red fast red brave small poor blue tiny kind happy new"}


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("inputs")
    run(command(1, "all", "--out", base, "--n_sft", 256, "--n_pref", 256, "--n_prompts", 128, "--n_eval", 32,
                "--set", "sft.epochs=1", "--set", "dpo.epochs=1", "--set", "rm.epochs=1", "--set", "ppo.max_steps=1", "--algos", "rto", "--no-progress"),
        base / "all.log")
    for p in ("data/sft.jsonl", "data/prefs.jsonl", "data/prompts.jsonl", "tokenizer/tokenizer.json",
              "sft/final/config.json", "dpo/final/config.json", "rm/final/config.json"):
        assert (base / p).is_file(), p
    with open(base / "data" / "memo.jsonl", "w") as f:
        for i in range(256):
            topic = list(MEMO)[i % 4]
            f.write(json.dumps({"prompt": f"topic {topic}", "response": MEMO[topic]}) + "\n")
    run(command(1, "sft", "--data", base / "data" / "memo.jsonl", "--tokenizer", base / "tokenizer",
                "--out", base / "memo", "--batch_size", 64, "--micro_batch_size", 64, "--max_steps", 30,
                "--lr", 3e-3, *SHAPE), base / "memo.log")
    return base


def stage_args(stage: str, inp: Path, out: Path) -> list:
    """The tiny configuration of each stage (a 32-example global batch: 2 micro-batches of 8 per rank on 2
    processes, 4 on one). SFT runs 12 steps with a checkpoint every 3, so that its runs are also the
    uninterrupted references of the kill-and-resume tests; the others run 3 steps."""
    d = inp / "data"
    common = ["--out", out, "--batch_size", 32, "--micro_batch_size", 8, *SHAPE]
    if stage == "sft":  # from scratch: a new model sized to the tokenizer
        return ["--data", d / "sft.jsonl", "--tokenizer", inp / "tokenizer", "--lr", 1e-3, "--max_steps", 12,
                "--save_every", 3, *common]
    if stage in ("dpo", "rm"):
        return ["--data", d / "prefs.jsonl", "--eval_data", d / "eval_prefs.jsonl", "--model", inp / "sft" / "final",
                "--lr", 1e-3, "--max_steps", 3, *common]
    if stage == "ppo":  # --top_k 1: greedy, so both runs sample the same responses whatever each rank's RNG;
        # rollout == batch: one rollout is one minibatch in both runs (no per-rank minibatch composition); the actor
        # starts from the memo policy (--init), pi_ref is the SFT model the DPO run started from
        return ["--algo", "rto", "--prompts", d / "prompts.jsonl", "--policy", inp / "sft" / "final",
                "--init", inp / "memo" / "final",
                "--dpo", inp / "dpo" / "final", "--rm", inp / "rm" / "final", "--rollout_batch_size", 32,
                "--top_k", 1, "--lr", 3e-4, "--critic_lr", 1e-3, "--max_steps", 3, *common]
    raise ValueError(stage)


STAGES = ["sft", "dpo", "rm", "ppo"]
STEPS = {"sft": 12, "dpo": 3, "rm": 3, "ppo": 3}


@pytest.fixture(scope="session")
def stage_runs(inputs, tmp_path_factory):
    """stage -> (1-process run dir, 2-process run dir), the two runs made side by side on first use."""
    root, cache = tmp_path_factory.mktemp("stages"), {}

    def get(stage: str) -> tuple[Path, Path]:
        if stage not in cache:
            one, two = root / f"{stage}_1proc", root / f"{stage}_2proc"
            run_parallel([(command(1, stage, *stage_args(stage, inputs, one)), root / f"{stage}_1proc.log"),
                          (command(2, stage, *stage_args(stage, inputs, two)), root / f"{stage}_2proc.log")])
            cache[stage] = one, two
        return cache[stage]

    return get


# ----------------------------------------------------------------------------------------------------------
# 1. torchrun smoke run of every stage


@pytest.mark.parametrize("stage", STAGES)
def test_torchrun_two_processes_smoke(stage, stage_runs):
    _, out = stage_runs(stage)
    final = out / "final"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "train_config.json"):
        assert (final / f).is_file(), f"{final / f} missing"
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification" if stage == "rm" else "LlamaForCausalLM"]
    rows = metrics(out)
    # one row per optimizer step, written once (rank 0 only)
    assert [r["step"] for r in rows] == list(range(1, STEPS[stage] + 1))
    keys = ["policy_loss", "value_loss", "score", "kl", "first_logp_dev"] if stage == "ppo" else ["loss", "grad_norm"]
    for r in rows:
        for k in keys:
            assert k in r and math.isfinite(r[k]), (r["step"], k, r.get(k))
    if stage == "ppo":  # on-policy check: the first minibatch's log-probs reproduce the rollout's bit for bit
        assert all(r["first_logp_dev"] == 0.0 for r in rows)
        assert all(r["resp_len"] > 1 for r in rows)  # real responses (see MEMO), not a lone EOS
    if stage == "rm":
        assert cfg.get("rto_score_std") is not None and cfg["rto_score_std"] > 0  # stored for PPO's normalisation
    if stage in ("dpo", "rm"):
        assert (out / "eval.json").is_file()
    if stage == "sft":  # the last checkpoint before the end (12 is exported, not checkpointed), older ones pruned
        assert complete_checkpoints(out) == [9]
    train_cfg = json.loads((final / "train_config.json").read_text())
    assert train_cfg["max_steps"] == STEPS[stage] and train_cfg["batch_size"] == 32


# ----------------------------------------------------------------------------------------------------------
# 2. 2 processes == 1 process on the same global batch

# Tolerance: the two runs do the same arithmetic except for the order of float32 summations (FSDP's
# reduce-scatter of gradients, per-rank partial sums of the loss, foreach vs per-parameter AdamW) and
# per-batch padding widths. Measured on CPU: the metrics of steps 1-3 agree to ~1e-7 relative for every stage,
# PPO's kl (a small difference of log-probs, exactly 0 at step 1) to ~3e-8 absolute. rel 1e-5 is 100x that
# margin; a real bug (a batch seen twice, a gradient averaged over the wrong count, a parameter not updated,
# a rank sampling other prompts) moves these numbers by 1e-3 or more. abs 1e-6 only matters for values near 0.
REL, ABS = 1e-5, 1e-6
# Final weights after 3 steps: Adam divides each gradient by its own running RMS, so for a weight whose gradient
# is ~0 the float noise above becomes a visible update: measured max |difference| 2.3e-5 (lr 1e-3). A weight the
# optimizer skipped, or an update on the wrong shard, is off by ~lr = 1e-3 per step; 2e-4 separates the two.
WEIGHT_ATOL = 2e-4
COMPARED = {"sft": ["loss", "grad_norm"], "dpo": ["loss", "grad_norm", "accuracy", "margin"],
            "rm": ["loss", "grad_norm", "accuracy", "margin"],
            "ppo": ["policy_loss", "value_loss", "score", "kl", "resp_len"]}


@pytest.mark.parametrize("stage", STAGES)
def test_two_processes_match_one(stage, stage_runs):
    # Regression guard (dpo): a no-grad pass before training (DPO's reference log-probs) used to leave FSDP2's
    # root unsharded, so the embeddings, final norm and head were never updated on 2 processes (step-2 loss
    # 0.6906 vs 0.6862, final weights off by 2.5e-3); fixed by reshard_after_forward=True on the root.
    one, two = stage_runs(stage)
    a, b = by_step(metrics(one)), by_step(metrics(two))
    assert sorted(a) == sorted(b) == list(range(1, STEPS[stage] + 1))
    for step in (1, 2, 3):
        for k in COMPARED[stage]:
            assert math.isclose(a[step][k], b[step][k], rel_tol=REL, abs_tol=ABS), \
                f"{stage} step {step} {k}: 1 process {a[step][k]!r} vs 2 processes {b[step][k]!r}"
    if stage == "ppo":  # the metrics are those of a policy that learns: they move between steps
        assert a[3]["kl"] != 0.0
    if stage != "sft":  # (sft: 12 steps here; its final weights are compared by the resume tests)
        wa, wb = safetensors_weights(one / "final"), safetensors_weights(two / "final")
        assert wa.keys() == wb.keys()
        for k in wa:
            diff = float((wa[k] - wb[k]).abs().max())
            assert diff <= WEIGHT_ATOL, f"{stage} final weight {k}: max |1 process - 2 processes| = {diff:.3g}"


# ----------------------------------------------------------------------------------------------------------
# 3. kill and resume, one process: exact reproduction on CPU


def assert_same_sft_run(out: Path, ref: Path):
    """Every one of the 12 SFT steps' losses and the final weights are exactly (==) those of the reference run."""
    got, want = by_step(metrics(out)), by_step(metrics(ref))
    assert sorted(want) == list(range(1, 13))
    assert sorted(got) == sorted(want), f"steps after resume: {sorted(got)}"
    for s in want:
        assert got[s]["loss"] == want[s]["loss"], f"step {s}: {got[s]['loss']!r} != {want[s]['loss']!r}"
    wa, wb = safetensors_weights(out / "final"), safetensors_weights(ref / "final")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sft_kill_and_resume_is_exact(inputs, stage_runs, tmp_path):
    ref = stage_runs("sft")[0]  # the uninterrupted 1-process run of the same command
    out = tmp_path / "killed"
    cmd = command(1, "sft", *stage_args("sft", inputs, out))
    ckpts = run_until_checkpoint_then_kill(cmd, out, tmp_path / "killed.log")
    assert ckpts and max(ckpts) < 12
    assert len(metrics(out)) < 12  # the kill cut the run short
    log = run(cmd + ["--resume"], tmp_path / "resumed.log")
    assert f"at step {max(ckpts)}" in log  # resumed from the newest complete checkpoint
    # Exact (==), every step: same batches (derived from (seed, step)), same optimizer/scheduler state.
    assert_same_sft_run(out, ref)


def test_ppo_kill_and_resume_is_exact(inputs, tmp_path):
    # Sampling is stochastic here (no --top_k): the resumed run must re-derive each step's generator.
    # Two minibatches per rollout (32 / 16), so the schedulers step twice per PPO step.
    def args(out):
        return ["--algo", "rto", "--prompts", inputs / "data" / "prompts.jsonl", "--policy", inputs / "sft" / "final",
                "--dpo", inputs / "dpo" / "final", "--rm", inputs / "rm" / "final", "--out", out,
                "--max_steps", 5, "--save_every", 2, "--rollout_batch_size", 32, "--batch_size", 16,
                "--micro_batch_size", 8, "--lr", 3e-4, "--critic_lr", 1e-3, *SHAPE]

    ref, out = tmp_path / "ref", tmp_path / "killed"
    p_ref = start(command(1, "ppo", *args(ref)), tmp_path / "ref.log")  # the uninterrupted run, alongside
    try:
        ckpts = run_until_checkpoint_then_kill(command(1, "ppo", *args(out)), out, tmp_path / "killed.log")
    finally:
        finish(p_ref)
    assert ckpts and max(ckpts) < 5
    log = run(command(1, "ppo", *args(out), "--resume"), tmp_path / "resumed.log")
    assert f"at step {max(ckpts)}" in log
    got, want = by_step(metrics(out)), by_step(metrics(ref))
    assert sorted(want) == [1, 2, 3, 4, 5]
    assert sorted(got) == sorted(want), f"steps after resume: {sorted(got)}"
    for s in want:
        for k in ("policy_loss", "value_loss", "score", "kl", "resp_len"):
            assert got[s][k] == want[s][k], f"step {s} {k}: {got[s][k]!r} != {want[s][k]!r}"
    wa, wb = safetensors_weights(out / "final"), safetensors_weights(ref / "final")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ----------------------------------------------------------------------------------------------------------
# 4. an interrupted save leaves the previous checkpoint loadable


class Boom(RuntimeError):
    pass


def tiny_state(run_dir: Path):
    import train
    from model import Llama, ModelArgs

    torch.manual_seed(0)
    model = Llama(ModelArgs.preset("tiny"))
    cfg = train.SFTConfig(out=str(run_dir))
    opt, sched = train.make_optimizer(model, 1e-3, cfg, total_steps=10)
    return model, opt, sched, cfg


def train_step(model, opt, sched, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.args.vocab_size, (2, 6), generator=g)
    model(ids).float().pow(2).mean().backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("where", ["dcp.save", "save_rng"])
def test_interrupted_save_keeps_previous_checkpoint(where, tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    import train

    assert train.D.world == 1 and not torch.distributed.is_initialized()
    model, opt, sched, cfg = tiny_state(tmp_path)
    for s in range(2):
        train_step(model, opt, sched, s)
    state = {"model": model}, {"model": opt}, {"model": sched}
    train.save_checkpoint(tmp_path, 2, *state, cfg)
    want_w = {k: v.clone() for k, v in model.state_dict().items()}
    want_opt = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
                for i, st in enumerate(opt.state.values())}
    want_sched = sched.state_dict()
    for s in range(2, 4):
        train_step(model, opt, sched, s)
    assert not torch.equal(model.tok_embeddings.weight, want_w["tok_embeddings.weight"])

    real_save = dcp.save
    if where == "dcp.save":  # the shards are written, then the process dies before the RNG file and meta.json
        def boom(*a, **kw):
            real_save(*a, **kw)
            raise Boom("killed after the shards")
        monkeypatch.setattr(dcp, "save", boom)
    else:
        import checkpoint

        def boom(path):
            raise Boom("killed while writing the RNG state")

        monkeypatch.setattr(checkpoint, "save_rng", boom)
    with pytest.raises(Boom):
        train.save_checkpoint(tmp_path, 4, *state, cfg)
    monkeypatch.undo()

    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "step_000004.tmp").is_dir()  # the partial save is left behind ...
    assert any((ckpt / "step_000004.tmp").iterdir()) or where == "save_rng"
    assert not (ckpt / "step_000004").exists()
    assert train.latest_checkpoint(tmp_path) == ckpt / "step_000002"  # ... and not picked
    model2, opt2, sched2, _ = tiny_state(tmp_path)
    assert train.load_checkpoint(train.latest_checkpoint(tmp_path), {"model": model2}, {"model": opt2},
                                 {"model": sched2}) == 2
    for k, v in model2.state_dict().items():
        assert torch.equal(v, want_w[k]), k
    got_opt = list(opt2.state.values())
    assert len(got_opt) == len(want_opt)
    for i, st in enumerate(got_opt):
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(want_opt[i][k])), (i, k)
    assert sched2.state_dict()["last_epoch"] == want_sched["last_epoch"] == 2
    assert sched2.get_last_lr() == want_sched["_last_lr"]
    assert opt2.param_groups[0]["lr"] == want_sched["_last_lr"][0]


def test_latest_checkpoint_ignores_tmp_and_incomplete(tmp_path):
    import train

    ckpt = tmp_path / "checkpoints"
    assert train.latest_checkpoint(tmp_path) is None
    for name, meta in (("step_000002", True), ("step_000004", False), ("step_000006.tmp", True)):
        (ckpt / name).mkdir(parents=True)
        if meta:
            (ckpt / name / "meta.json").write_text(json.dumps({"step": int(name[5:11])}))
    # step_4 has no meta.json (not written by save_checkpoint: never complete); step_6.tmp was never renamed
    assert train.latest_checkpoint(tmp_path) == ckpt / "step_000002"
    (ckpt / "step_000010").mkdir()
    (ckpt / "step_000010" / "meta.json").write_text("{}")
    assert train.latest_checkpoint(tmp_path) == ckpt / "step_000010"  # numeric order (zero-padded names)


def test_resume_skips_leftover_tmp(inputs, stage_runs, tmp_path):
    """A run killed mid-save leaves step_N.tmp (with every file, meta.json included, since meta.json is written
    before the rename) next to the previous complete checkpoint: --resume must use the complete one."""
    ref = stage_runs("sft")[0]  # 12 steps, checkpoints every 3: step_000009 is left
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "step_000009", out / "checkpoints" / "step_000009")
    leftover = out / "checkpoints" / "step_000010.tmp"  # as if killed while saving a (newer) step 10
    shutil.copytree(ref / "checkpoints" / "step_000009", leftover)
    meta = json.loads((leftover / "meta.json").read_text())
    (leftover / "meta.json").write_text(json.dumps({**meta, "step": 10}))
    shards = list(leftover.glob("*.distcp"))
    assert shards
    for f in shards:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # half-written: unloadable
    log = run(command(1, "sft", *stage_args("sft", inputs, out), "--resume"), tmp_path / "resumed.log")
    assert "step_000009 at step 9" in log, log[-3000:]
    got, want = by_step(metrics(out)), by_step(metrics(ref))
    assert sorted(got) == [10, 11, 12]  # a fresh directory: only the resumed steps were logged here
    for s in (10, 11, 12):
        assert got[s]["loss"] == want[s]["loss"], s
    wa, wb = safetensors_weights(out / "final"), safetensors_weights(ref / "final")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wb)


def test_fresh_run_refuses_a_directory_with_a_checkpoint(inputs, stage_runs, tmp_path):
    """The same command without --resume in a directory that an earlier (killed) run left a checkpoint in: it
    must refuse with an error naming the checkpoint, and leave that checkpoint and the old metrics untouched."""
    ref = stage_runs("sft")[0]
    out = tmp_path / "run"
    stale = out / "checkpoints" / "step_000003"  # e.g. from an earlier run killed after its first checkpoint
    shutil.copytree(ref / "checkpoints" / "step_000009", stale)
    (stale / "meta.json").write_text(json.dumps({**json.loads((stale / "meta.json").read_text()), "step": 3}))
    import checkpoint

    checkpoint.write_manifest(stale)  # planted as this project would have written it (resume checks the manifest)
    before = {p.name: p.read_bytes() for p in stale.iterdir()}
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": -1.0}) + "\n")
    p = subprocess.run(command(1, "sft", *stage_args("sft", inputs, out)), cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert p.returncode != 0
    assert "step_000003 holds a resumable checkpoint: pass --resume" in p.stderr
    assert {p.name: p.read_bytes() for p in stale.iterdir()} == before
    assert metrics(out) == [{"step": 1, "loss": -1.0}] and not (out / "final").exists()
    # and --resume continues it: steps 4..12 from the planted step-3 state (really step 9's weights)
    run(command(1, "sft", *stage_args("sft", inputs, out), "--resume"), tmp_path / "resumed.log")
    assert sorted(by_step(metrics(out))) == [1, *range(4, 13)]  # the old row 1 (<= step 3) kept, then 4..12


# ----------------------------------------------------------------------------------------------------------
# 5. kill and resume under torchrun


def test_torchrun_kill_and_resume(inputs, stage_runs, tmp_path):
    ref = stage_runs("sft")[1]  # the uninterrupted 2-process run of the same command
    out = tmp_path / "killed"
    cmd = command(2, "sft", *stage_args("sft", inputs, out))
    ckpts = run_until_checkpoint_then_kill(cmd, out, tmp_path / "killed.log")
    assert ckpts and max(ckpts) < 12
    # both ranks' RNG files: the checkpoint was written by 2 processes
    assert sorted(p.name for p in (out / "checkpoints" / f"step_{max(ckpts):06d}").glob("rng_rank*")) == \
        ["rng_rank0.safetensors", "rng_rank1.safetensors"]
    cmd = command(2, "sft", *stage_args("sft", inputs, out), "--resume")  # (a fresh port)
    log = run(cmd, tmp_path / "resumed.log")
    assert f"at step {max(ckpts)}" in log
    # Tolerance 0: the resumed run does the same arithmetic in the same order as the uninterrupted one (same
    # world size, same shards, same reduction order), so it reproduces it bit for bit.
    assert_same_sft_run(out, ref)


FAILING_RANK = '''
import sys
sys.path.insert(0, {root!r})
import train

real_reduce = train.reduce_metrics


def reduce_metrics(*args, **kwargs):  # rank 1 dies at its first metrics reduction; rank 0 waits in the all-reduce
    if train.D.rank == 1:
        raise RuntimeError("injected failure on rank 1")
    return real_reduce(*args, **kwargs)


train.reduce_metrics = reduce_metrics
from torch.distributed.elastic.multiprocessing.errors import record
record(train.main)()
'''


def test_exception_on_one_rank_ends_the_job(inputs, tmp_path):
    """A rank that raises while the other waits in a collective: the job must end (not hang) with a failure
    exit code, and that rank's error must be in the output."""
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK.format(root=str(ROOT)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(script), "sft", *map(str, stage_args("sft", inputs, tmp_path / "out"))]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "injected failure on rank 1" in out and "[rank 1] failed" in out
    assert time.time() - t0 < 90  # ended by torchrun, not by our timeout
    assert not (tmp_path / "out" / "final").exists()


def test_torchrun_pipeline_with_fewer_eval_prompts_than_ranks(tmp_path):
    """`all` under torchrun (the micro-batches split over ranks), with one held-out prompt for two ranks: the
    rank without a prompt of its own still does the same forward passes (FSDP), and the prompt counts once."""
    out = tmp_path / "all2"
    run(command(2, "all", "--out", out, "--n_sft", 128, "--n_pref", 128, "--n_prompts", 128, "--n_eval", 1,
                "--set", "sft.epochs=1", "--set", "dpo.epochs=1", "--set", "rm.epochs=1", "--set", "ppo.max_steps=1", "--algos", "rto", "--no-progress"),
        tmp_path / "all2.log", timeout=TIMEOUT)
    res = json.loads((out / "results.json").read_text())
    assert set(res["policies"]) == {"sft", "dpo", "rto"}
    for r in res["policies"].values():
        # one response of at most max_len (16) tokens: a prompt counted on both ranks would sum to 2 responses
        assert 1 <= r["len"] <= 16 and r["len"] == int(r["len"])
    assert res["policies"]["sft"]["kl"] == 0.0 and res["policies"]["sft"]["win_vs_sft"] == 0.5


def test_torchrun_critic_free_estimator(inputs, tmp_path):
    """--estimator rloo under 2 processes: each rank samples whole groups (4 responses to each of its prompts), so
    the baseline needs no communication; no critic is loaded or checkpointed, and the first minibatch is on-policy."""
    out = tmp_path / "rloo2"
    args = stage_args("ppo", inputs, out)
    del args[args.index("--top_k"):args.index("--top_k") + 2]  # sampled, so the 4 responses to a prompt differ
    run(command(2, "ppo", *args, "--estimator", "rloo", "--samples_per_prompt", 4, "--save_every", 2),
        tmp_path / "rloo2.log", timeout=TIMEOUT)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["first_logp_dev"] == 0.0 and "value_loss" not in r and math.isfinite(r["policy_loss"]) for r in rows)
    assert list(json.loads((out / "checkpoints" / "step_000002" / "meta.json").read_text())["schedulers"]) == ["actor"]


def test_own_model_and_data_in_one_command_under_torchrun(tmp_path):
    """`train.py all --model DIR --sft_data --prefs --prompts --algos ppo,rto` on a tiny checkpoint with a real chat
    layout (SmolLM2's tokenizer files, tests/fixtures/chat) and chat-shaped JSONL, under 2-process torchrun: SFT ->
    DPO -> RM -> PPO and RTO from the user's model, the held-out prompts split off --prompts, and every policy
    judged by the reward model (no gold reward exists)."""
    from test_checkpoints import chat_data, make_checkpoint

    ckpt = make_checkpoint("smollm2", tmp_path / "ckpt")
    data = chat_data(tmp_path, "smollm2")
    out = tmp_path / "own"
    sets = [f"{s}.{k}" for s in ("sft", "dpo", "rm") for k in ("batch_size=4", "micro_batch_size=2", "max_steps=2",
                                                              "max_prompt_len=96", "max_response_len=16")]
    sets += ["ppo.rollout_batch_size=4", "ppo.batch_size=4", "ppo.micro_batch_size=2", "ppo.max_steps=2",
             "ppo.max_prompt_len=96", "ppo.max_response_len=8", "ppo.lr=1e-3"]
    run(command(2, "all", "--model", ckpt, "--sft_data", data["sft"], "--prefs", data["prefs"], "--prompts",
                data["prompts"], "--n_eval", 2, "--algos", "ppo,rto", "--out", out, "--no-progress",
                *[a for s in sets for a in ("--set", s)]), tmp_path / "own.log", timeout=TIMEOUT)
    for stage in ("sft", "dpo", "rm", "ppo", "rto"):
        assert (out / stage / "final" / "model.safetensors").is_file(), stage
    sft_cfg = json.loads((out / "sft" / "final" / "train_config.json").read_text())
    assert sft_cfg["model"] == str(ckpt) and sft_cfg["data"] == str(data["sft"])
    ppo_cfg = json.loads((out / "rto" / "final" / "train_config.json").read_text())
    assert ppo_cfg["policy"] == str(out / "sft" / "final") and ppo_cfg["prompts"] == str(out / "data" / "prompts.jsonl")
    held, trained = ((out / "data" / n).read_text().splitlines() for n in ("eval_prompts.jsonl", "prompts.jsonl"))
    assert held + trained == data["prompts"].read_text().splitlines() and len(held) == 2
    res = json.loads((out / "results.json").read_text())
    assert res["judge"] == "reward model" and set(res["policies"]) == {"sft", "dpo", "ppo", "rto"}
    assert res["policies"]["sft"]["win_vs_sft"] == 0.5 and res["policies"]["sft"]["kl"] == 0.0
    assert "| policy | RM score | win rate vs SFT (RM) |" in (out / "results.md").read_text()
    assert [r["step"] for r in metrics(out / "rto")] == [1, 2]


DECODE_VIEW = '''
import json, sys
from contextlib import contextmanager
sys.path.insert(0, {root!r})
import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
import checkpoint, model, parallel, train

parallel.init_dist("cpu")
calls = [0]
real_unshard = FSDPParamGroup.unshard


def counting_unshard(self, *args, **kwargs):  # every FSDP unshard, whether it gathers or finds the weights there
    calls[0] += 1
    return real_unshard(self, *args, **kwargs)


FSDPParamGroup.unshard = counting_unshard


@contextmanager
def gathered(m):  # the path decode_view replaced: generate on the FSDP model, every unit unsharded for the loop
    mods = [x for x in m.modules() if isinstance(x, FSDPModule)]
    for x in mods:
        x.set_reshard_after_forward(False, recurse=False)
        x.unshard()
    yield
    for x in mods:
        x.reshard()
        x.set_reshard_after_forward(True, recurse=False)


out = {{}}
for fixture in ("llama_gqa", "llama_tied"):
    for bf16 in (False, True):
        m = checkpoint.open_model({fixtures!r} + "/" + fixture, "lm", train.PPOConfig(bf16=bf16), frozen=True)
        ids = torch.randint(3, m.args.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[1, :2] = 0
        kw = dict(stop_ids=[1, 2], pad_id=0, temperature=1.0)
        for round in (0, 1):  # the second after the shards changed in place, as after an optimizer step
            if round:
                with torch.no_grad():
                    for p in m.parameters():
                        p.to_local().mul_(1.5)
            with gathered(m):
                before = calls[0]
                old = model.generate(m, ids, mask, 12, generator=torch.Generator().manual_seed(5), **kw)
                old_calls = calls[0] - before
            copy = parallel.decode_view(m)
            before = calls[0]
            new = model.generate(copy, ids, mask, 12, generator=torch.Generator().manual_seed(5), **kw)
            out[f"{{fixture}} bf16={{bf16}} round {{round}}"] = {{
                "same": bool(torch.equal(old[0], new[0]) and torch.equal(old[1], new[1])),
                "tokens": int(new[1].sum()), "old_unshards": old_calls, "new_unshards": calls[0] - before,
                "steps": int(new[0].shape[1]), "dtype": str(next(copy.parameters()).dtype), "bf16": bf16,
                "tied": copy.output.weight is copy.tok_embeddings.weight}}
json.dump(out, open({out!r} + f".{{parallel.D.rank}}.json", "w"))
parallel.close_dist(True)
'''


def test_decode_view_same_tokens_no_fsdp_hooks_per_token(tmp_path):
    """Under 2-process gloo, fp32 and bf16 (FSDP's mixed precision), untied and tied embeddings, before and after the
    shards change in place: sampling on parallel.decode_view's plain copy gives the tokens of the path it replaced
    (generate on the FSDP model, every unit unsharded for the loop), and runs no FSDP unshard at all while decoding,
    where the old path ran one per unit per token."""
    script = tmp_path / "decode_view.py"
    script.write_text(DECODE_VIEW.format(root=str(ROOT), fixtures=str(ROOT / "tests" / "fixtures"),
                                         out=str(tmp_path / "res")))
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         str(script)], tmp_path / "decode_view.log")
    for rank in (0, 1):
        res = json.loads((tmp_path / f"res.{rank}.json").read_text())
        assert len(res) == 8
        for case, r in res.items():
            assert r["same"] and r["tokens"] > 3, (rank, case, r)
            assert r["new_unshards"] == 0 and r["old_unshards"] >= r["steps"], (rank, case, r)
            assert r["dtype"] == ("torch.bfloat16" if r["bf16"] else "torch.float32")
            assert r["tied"] == case.startswith("llama_tied")
        # the refreshed copy follows the changed shards: round 1 samples other tokens than round 0
        assert res["llama_gqa bf16=False round 0"]["tokens"] != res["llama_gqa bf16=False round 1"]["tokens"] or \
            res["llama_tied bf16=False round 0"]["tokens"] != res["llama_tied bf16=False round 1"]["tokens"]
