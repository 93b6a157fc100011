"""Fail loudly and early, lose nothing. Each case below is a mistake or a fault a user could really meet; every one
must stop with a message that says what is wrong and where, and leave every file on disk as it was (inputs, run
directories, checkpoints), including the run directory the failed command was pointed at."""
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import train
from test_checkpoints import chat_data, make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--batch_size", "4", "--micro_batch_size", "2", "--max_prompt_len", "96", "--no-progress"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace: a base checkpoint, data, trained SFT / DPO / RM checkpoints, and an SFT run with a resumable
    checkpoint (step 2 of 3, final/ written)."""
    d = tmp_path_factory.mktemp("ws")
    base = make_checkpoint("llama3.1", d / "base")
    data = chat_data(d, "llama3.1")
    steps = ["--max_steps", "2", *SMALL]
    train.main(["sft", "--model", str(base), "--data", str(data["sft"]), "--out", str(d / "sft"), *steps])
    sft = d / "sft" / "final"
    train.main(["dpo", "--model", str(sft), "--data", str(data["prefs"]), "--out", str(d / "dpo"), *steps])
    train.main(["rm", "--model", str(sft), "--data", str(data["prefs"]), "--eval_data", str(data["prefs"]),
                "--out", str(d / "rm"), *steps])
    train.main(["sft", "--model", str(base), "--data", str(data["sft"]), "--out", str(d / "resumable"),
                "--max_steps", "3", "--save_every", "1", *SMALL])
    assert train.latest_checkpoint(d / "resumable").name == "step_000002"
    return d


def sft_args(ws, out, *extra, model=None):
    return ["sft", "--model", str(model or ws / "base"), "--data", str(ws / "sft.jsonl"), "--out", str(out),
            "--max_steps", "2", *SMALL, *extra]


def resume_args(ws, *extra):
    return ["sft", "--model", str(ws / "base"), "--data", str(ws / "sft.jsonl"), "--out", str(ws / "resumable"),
            "--max_steps", "3", "--save_every", "1", *SMALL, "--resume", *extra]


def ppo_args(ws, out, *extra, rm=None, dpo=None):
    return ["ppo", "--algo", "rto", "--policy", str(ws / "sft" / "final"), "--dpo", str(dpo or ws / "dpo" / "final"),
            "--rm", str(rm or ws / "rm" / "final"), "--prompts", str(ws / "prompts.jsonl"), "--out", str(out),
            "--rollout_batch_size", "4", "--max_response_len", "8", "--max_steps", "2", *SMALL, *extra]


def copy_ckpt(ws, src, name):
    dst = ws / "cases" / name
    shutil.copytree(src, dst)
    return dst


def with_tensor(ws, name, fn):
    """A copy of the base checkpoint with one tensor changed by fn."""
    d = copy_ckpt(ws, ws / "base", name)
    sd = load_file(d / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    sd[key] = fn(sd[key])
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


def with_config(ws, src, name, **change):
    d = copy_ckpt(ws, src, name)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **change}))
    return d


def with_file(ws, src, name, file, data: bytes):
    d = copy_ckpt(ws, src, name)
    (d / file).write_bytes(data)
    return d


def data_file(ws, name, lines):
    p = ws / "cases" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"".join((l if isinstance(l, bytes) else json.dumps(l).encode()) + b"\n" for l in lines))
    return p


class Pwn:
    """Unpickling this writes a file: if that file appears, checkpoint code ran."""
    target = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "pwned"))


def evil_metadata(ws, name, rewrite_manifest: bool):
    """A copy of the resumable run whose checkpoint's .metadata is a pickle that runs code; optionally with the
    manifest rewritten to match (an attacker who can write the directory can do that too)."""
    d = ws / "cases" / name
    shutil.copytree(ws / "resumable", d)
    ckpt = train.latest_checkpoint(d)
    Pwn.target = str(ws / "cases" / f"{name}.pwned")
    (ckpt / ".metadata").write_bytes(pickle.dumps(Pwn()))
    if rewrite_manifest:
        import runtime
        runtime.write_manifest(ckpt)
    return d


def truncated_shard(ws, name):
    d = ws / "cases" / name
    shutil.copytree(ws / "resumable", d)
    ckpt = train.latest_checkpoint(d)
    shard = next(ckpt.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    import runtime
    runtime.write_manifest(ckpt)  # a file this project wrote, then damaged by the disk, say: the manifest matches
    return d


def rm_with_zero_std(ws):
    return with_config(ws, ws / "rm" / "final", "rm_std0", rto_score_std=0.0)


def other_tokenizer_dpo(ws):
    d = copy_ckpt(ws, ws / "dpo" / "final", "dpo_other_tok")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(ROOT / "tests" / "fixtures" / "chat" / "smollm2" / f, d / f)
    return d


LIVE = {}


def live_lock(ws):
    """A lock held by another live process (a sleeping child of the test), with its pid and start time."""
    import runtime

    out = ws / "cases" / "locked"
    out.mkdir(parents=True)
    LIVE["proc"] = subprocess.Popen(["sleep", "120"])
    pid = LIVE["proc"].pid
    (out / "run.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                              "start": runtime.proc_start(pid)}))
    return out


def finished(ws):
    out = ws / "cases" / "finished"
    shutil.copytree(ws / "sft", out)
    return out


# (id, setup(ws) -> argv, message regex). Every case: the message, and nothing on disk changed.
CASES = [
    # Bad: resume never runs a checkpoint's code
    ("resume-replaced-metadata", lambda ws: resume_args(ws, "--out", str(evil_metadata(ws, "evil1", False))),
     r"differ from manifest.json .* refusing to resume"),
    ("resume-replaced-metadata-and-manifest",
     lambda ws: resume_args(ws, "--out", str(evil_metadata(ws, "evil2", True))),
     r"pathlib.Path.write_text is not part of a checkpoint's metadata|is not part of a checkpoint's metadata"),
    # Bad: non-finite values stop the run before anything is saved from them
    ("ppo-beta3-1e39", lambda ws: ppo_args(ws, ws / "cases" / "nan_ppo", "--beta3", "1e39", "--save_every", "1"),
     r"step 1: reward.* not finite"),
    ("dpo-beta-inf", lambda ws: ["dpo", "--model", str(ws / "sft" / "final"), "--data", str(ws / "prefs.jsonl"),
                                 "--out", str(ws / "cases" / "dpo_inf"), "--beta", "inf", *SMALL],
     r"--beta inf: must be in \(0, inf\)"),
    ("nan-weights", lambda ws: sft_args(ws, ws / "cases" / "o_nan", model=with_tensor(
        ws, "nan", lambda t: t.index_fill(0, torch.tensor([0]), float("nan")))),
     r"tensor 'model.layers.0.mlp.up_proj.weight' holds NaN or infinite values"),
    # Bad: --resume with a changed meaning
    ("resume-changed-batch", lambda ws: [a if a != "4" else "8" for a in resume_args(ws)],
     r"--resume: .*step_000002 was written with other settings \(batch_size: 4 -> 8"),
    ("resume-changed-lr", lambda ws: resume_args(ws, "--lr", "1e-3"), r"other settings \(lr: 1e-05 -> 0.001\)"),
    ("resume-nothing", lambda ws: sft_args(ws, ws / "cases" / "never_ran", "--resume"),
     r"--resume: no complete checkpoint in .*never_ran/checkpoints"),
    # Bad: two runs in one directory, a finished run overwritten
    ("live-lock", lambda ws: sft_args(ws, live_lock(ws)), r"is in use by pid \d+ on .*run.lock"),
    ("finished-final", lambda ws: sft_args(ws, finished(ws)), r"final holds a finished run: pass --overwrite"),
    # Bad: values that make no sense
    *[(f"range-{flag}-{value}", (lambda f, v: lambda ws: ppo_args(ws, ws / "cases" / f"r_{f}", f"--{f}", v))(flag, value),
       rf"--{flag} {re.escape(value)}(\.0)?: must be in ")
      for flag, value in [("beta2", "-1"), ("lr", "inf"), ("top_p", "0"), ("batch_size", "0"),
                          ("micro_batch_size", "0"), ("ppo_epochs", "0"), ("max_response_len", "0"),
                          ("epochs", "0"), ("max_steps", "-1"), ("save_every", "-1"), ("temperature", "0"),
                          ("beta3", "nan")]],
    ("mixed-forms", lambda ws: ["sft", "--model", str(ws / "base"), "--out", str(ws / "cases" / "o_mixed"), *SMALL,
                                "--data", str(data_file(ws, "mixed.jsonl", [
                                    {"prompt": "a", "response": "b"},
                                    {"prompt": "a", "messages": [{"role": "user", "content": "x"},
                                                                 {"role": "assistant", "content": "y"}]}]))],
     r"mixed.jsonl:2: key 'messages': the row also has \['prompt'\]"),
    # Bad: the wrong kind of checkpoint in a slot
    ("rm-slot-policy", lambda ws: ppo_args(ws, ws / "cases" / "o_rmslot", "--no-normalize_reward",
                                           rm=ws / "sft" / "final"),
     r"--rm .* is a LlamaForCausalLM, a causal LM \(a policy\); --rm takes a reward model"),
    ("sample-on-rm", lambda ws: ["sample", "--model", str(ws / "rm" / "final"), "--prompt", "hi"],
     r"--model .* is a LlamaForSequenceClassification, a reward model"),
    ("dpo-other-tokenizer", lambda ws: ppo_args(ws, ws / "cases" / "o_tok", dpo=other_tokenizer_dpo(ws)),
     r"--dpo .* has another tokenizer than --policy"),
    # Weak: say what and where
    ("config-not-json", lambda ws: sft_args(ws, ws / "cases" / "o_cfg", model=with_file(
        ws, ws / "base", "badcfg", "config.json", b'{"hidden_size": 32,')), r"config.json: not valid JSON"),
    ("config-wrong-type", lambda ws: sft_args(ws, ws / "cases" / "o_type", model=with_config(
        ws, ws / "base", "strcfg", hidden_size="32")), r"field 'hidden_size' is '32'; expected a positive integer"),
    ("tokenizer-not-json", lambda ws: sft_args(ws, ws / "cases" / "o_tk", model=with_file(
        ws, ws / "base", "badtok", "tokenizer.json", b"{oops")), r"tokenizer.json: not a tokenizers file"),
    ("tokenizer-config-bad", lambda ws: sft_args(ws, ws / "cases" / "o_tkc", model=with_file(
        ws, ws / "base", "badtkc", "tokenizer_config.json", b'{"eos_token": "<|nope|>", "added_tokens_decoder": {}}')),
     r"field 'eos_token' is '<\|nope\|>', which tokenizer.json does not hold"),
    ("safetensors-truncated", lambda ws: sft_args(ws, ws / "cases" / "o_st", model=with_file(
        ws, ws / "base", "badst", "model.safetensors", (ws / "base" / "model.safetensors").read_bytes()[:200])),
     r"model.safetensors: not a readable safetensors file"),
    ("dcp-shard-damaged", lambda ws: resume_args(ws, "--out", str(truncated_shard(ws, "badshard"))),
     r"step_000002: the checkpoint does not load"),
    ("data-not-utf8", lambda ws: sft_args(ws, ws / "cases" / "o_utf") + ["--data", str(data_file(
        ws, "latin1.jsonl", [{"prompt": "a", "response": "b"}, '{"prompt": "caf\xe9", "response": "b"}'.encode("latin-1")]))],
     r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9"),
    ("prompt-longer-than-context", lambda ws: sft_args(ws, ws / "cases" / "o_ctx", "--max_prompt_len", "200",
                                                       model=with_config(ws, ws / "base", "ctx64",
                                                                         max_position_embeddings=40)),
     r"sft.jsonl:\d+: prompt \+ response is \d+ tokens, more than the model's context of 40"),
    ("rm-std-zero", lambda ws: ppo_args(ws, ws / "cases" / "o_std", rm=rm_with_zero_std(ws)),
     r"rm_std0/config.json: field 'rto_score_std' is 0.0"),
    ("degenerate-prefs", lambda ws: ["rm", "--model", str(ws / "sft" / "final"), "--out", str(ws / "cases" / "o_deg"),
                                     *SMALL, "--data", str(data_file(ws, "same.jsonl", [
                                         {"prompt": "q", "chosen": "same", "rejected": "same"}] * 8))],
     r"same.jsonl: in every pair the chosen and rejected responses are identical"),
]


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fails_loudly_and_changes_nothing(ws, case):
    name, setup, pattern = case
    argv = setup(ws)
    before = tree(ws)
    with pytest.raises((ValueError, KeyError, OSError)) as e:
        train.main(argv)
    msg = e.value.args[0] if isinstance(e.value, KeyError) else str(e.value)
    assert re.search(pattern, msg), msg
    assert tree(ws) == before  # nothing written, nothing left behind, nothing half-changed
    assert not list((ws / "cases").glob("*.pwned"))  # and no checkpoint code ran


def test_blow_up_mid_run_stops_before_saving(ws):
    """A learning rate that blows the weights up after a few steps: the run stops at the first non-finite loss or
    gradient norm, names it, saves no checkpoint or export from that state, and its metrics file stays valid JSON."""
    out = ws / "cases" / "blowup"
    with pytest.raises(ValueError, match=r"step (\d+): (loss|grad_norm|model weights).* not finite") as e:
        train.main(sft_args(ws, out, "--lr", "1e30", "--max_steps", "6", "--save_every", "1"))
    bad_step = int(re.search(r"step (\d+)", str(e.value)).group(1))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] in (list(range(1, bad_step)), list(range(1, bad_step + 1)))  # nothing after
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert not (out / "final").exists()
    last = train.latest_checkpoint(out)
    assert last is None or int(last.name.split("_")[1]) < bad_step


def test_enough_cases():
    assert len(CASES) >= 17


def test_cli_prints_one_line_not_a_traceback(ws):
    cmd = [sys.executable, "train.py", *ppo_args(ws, ws / "cases" / "cli", "--top_p", "0")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == ["error: --top_p 0.0: must be in (0, 1]",
                                              "(run with --debug or RTO_DEBUG=1 for the traceback)"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "RTO_DEBUG": "1"})
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_stale_lock_is_reported_and_taken_over(ws, capsys):
    out = ws / "cases" / "stale"
    out.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (out / "run.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    train.main(sft_args(ws, out))
    assert f"left by pid {pid}, which is no longer running; taking it over" in capsys.readouterr().out
    assert (out / "final").is_dir() and not (out / "run.lock").exists()  # released at the end


def test_own_pid_or_a_reused_pid_is_a_stale_lock(ws, capsys):
    """In a container pids repeat from run to run: a lock naming this very process (which never took it), or a
    live pid whose start time differs from the one recorded, was left by a dead run."""
    import runtime

    for name, lock in (("ownpid", {"pid": os.getpid()}), ("reused", {"pid": os.getppid(), "start": "1"})):
        out = ws / "cases" / name
        out.mkdir(parents=True)
        (out / "run.lock").write_text(json.dumps({**lock, "host": socket.gethostname()}))
        runtime.take_lock(out)
        assert "taking it over" in capsys.readouterr().out
        assert json.loads((out / "run.lock").read_text())["start"] == runtime.proc_start(os.getpid())
        runtime.release_locks(True)
        assert not (out / "run.lock").exists()


def test_lock_is_held_during_the_run_and_released(ws, monkeypatch):
    out = ws / "cases" / "held"
    seen = {}
    real = train.fit

    def spy(cfg, run_dir, *a, **kw):
        seen["lock"] = json.loads((run_dir / "run.lock").read_text())
        return real(cfg, run_dir, *a, **kw)

    monkeypatch.setattr(train, "fit", spy)
    train.main(sft_args(ws, out))
    assert seen["lock"]["pid"] == os.getpid() and seen["lock"]["host"] == socket.gethostname()
    assert not (out / "run.lock").exists()


def test_full_disk_during_export_keeps_the_old_final(ws, monkeypatch):
    """--overwrite into a finished run, and the disk fills while the new final/ is written: the error names the path
    and the cause, and the old final/ is exactly as it was."""
    out = ws / "cases" / "fulldisk"
    shutil.copytree(ws / "sft", out)
    before = tree(out / "final")
    import safetensors.torch

    def full(*a, **kw):
        raise OSError(28, "No space left on device", str(out / "final.tmp" / "model.safetensors"))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match=r"could not write .*fulldisk/final: No space left on device"):
        train.main(sft_args(ws, out, "--overwrite"))
    assert tree(out / "final") == before and not (out / "final.tmp").exists()


def test_resume_may_change_the_safe_fields(ws):
    """max_steps, save_every and progress may change on --resume; the run continues from its checkpoint."""
    d = ws / "cases" / "safe_resume"
    shutil.copytree(ws / "resumable", d)
    args = resume_args(ws, "--out", str(d))
    args[args.index("--max_steps") + 1] = "4"
    args[args.index("--save_every") + 1] = "0"
    train.main(args)
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_metrics_stay_valid_json_with_a_non_finite_metric(tmp_path):
    import runtime

    log = runtime.Logger(tmp_path, 0, ["x"])
    log.log(1, {"x": float("nan"), "y": 1.0})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "x": None, "y": 1.0}
