"""`python bench.py gpu`: the one command that measures everything on a GPU, proven end to end on CPU with --tiny:
every section's numbers in --results after each section, and nothing else there."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["preflight", "train", "ppo", "torchrun", "decode", "transformers"]


def test_gpu_bench_command_runs_end_to_end_on_cpu(tmp_path):
    results, work = tmp_path / "results", tmp_path / "work"
    p = subprocess.run([sys.executable, "bench.py", "gpu", "--tiny", "--device", "cpu", "--results", str(results),
                        "--work", str(work)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(f.name for f in results.iterdir()) == ["results.json", "results.md"]
    res = json.loads((results / "results.json").read_text())["sections"]
    assert list(res) == SECTIONS
    assert not [k for k, v in res.items() if "error" in v], res
    pre = res["preflight"]
    assert pre["cudagraph_skip_reasons"] == [] and pre["copy_bandwidth_gb_s"] > 0 and pre["matmul_tflops"] > 0
    assert res["train"]["rows"]["ours"]["tokens_per_s"] > 0 and "ours +ckpt" in res["train"]["rows"]
    assert res["train"]["flops_per_token"] > 6 * 0.5 * res["train"]["params"]
    for row in res["decode"]["rows"].values():
        assert row["eager"]["tokens_per_s"] > 0 and row["compiled"]["tokens_per_s"] > 0
        assert 0 < row["eager"]["of_limit"] < 1
    assert res["ppo"]["steps"] == 2 and res["ppo"]["first_logp_dev_max"] == 0.0
    assert res["torchrun"]["returncode"] == 0 and res["torchrun"]["stages_finished"] == ["dpo", "rm", "rto", "sft"]
    assert "## decode" in (results / "results.md").read_text()


def test_gpu_bench_keeps_what_it_measured_when_killed(tmp_path):
    """Killed after its second section (a window that ran out): results.json holds the first two sections' numbers,
    and the results folder holds nothing else."""
    results, work = tmp_path / "results", tmp_path / "work"
    p = subprocess.Popen([sys.executable, "bench.py", "gpu", "--tiny", "--device", "cpu", "--results", str(results),
                          "--work", str(work)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while True:
            assert p.poll() is None and time.monotonic() < deadline, "no second section in time"
            try:
                done = json.loads((results / "results.json").read_text())["sections"]
            except (OSError, ValueError):
                done = {}
            if len(done) >= 2:
                break
            time.sleep(0.05)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    res = json.loads((results / "results.json").read_text())["sections"]
    assert list(res)[:2] == ["preflight", "train"] and "error" not in res["preflight"]
    assert res["train"]["rows"]["ours"]["tokens_per_s"] > 0
    assert sorted(f.name for f in results.iterdir()) == ["results.json", "results.md"]


def test_gpu_bench_checks_its_arguments_first(tmp_path):
    """Arguments are checked before any work, in one line each: no --work, a --results that is not empty, a section
    name that does not exist."""
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.txt").write_text("x")
    for args, msg in ((["--results", str(tmp_path / "r")], "give --work DIR"),
                      (["--results", str(tmp_path / "full"), "--work", str(tmp_path / "w")], "is not empty"),
                      (["--results", str(tmp_path / "r"), "--work", str(tmp_path / "w"), "--skip", "decod"],
                       "--skip decod: no such section")):
        p = subprocess.run([sys.executable, "bench.py", "gpu", "--tiny", "--device", "cpu", *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode != 0 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "r").exists() and not (tmp_path / "w").exists()


def test_data_bench_reads_encodes_and_reaches_a_dpo_step(tmp_path):
    """`bench.py data`, small: UltraFeedback-shaped rows through reading, encoding and `train.py dpo --max_steps 1`,
    with its rates printed (at 60k pairs its numbers are in docs/results.md)."""
    p = subprocess.run([sys.executable, "bench.py", "data", "--pairs", "300", "--work", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    for what in ("read", "encode"):
        rate = float(next(line for line in p.stdout.splitlines() if line.startswith(what)).split()[3])
        assert rate > 0
    assert "train.py dpo --max_steps 1, from its start to its end:" in p.stdout
    assert (tmp_path / "dpo" / "final" / "model.safetensors").is_file()
