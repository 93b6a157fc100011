"""`python bench.py gpu --tiny`: the one command that measures everything on a GPU, proven end to end on CPU."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_command_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "bench"
    p = subprocess.run([sys.executable, "bench.py", "gpu", "--tiny", "--device", "cpu", "--no_reference",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert not [k for k in ("train", "decode", "ppo", "torchrun") if "error" in res[k]], res
    assert res["train"]["rows"]["ours"]["tokens_per_s"] > 0 and "ours +ckpt" in res["train"]["rows"]
    for row in res["decode"]["rows"].values():
        assert row["ours_eager"]["tokens_per_s"] > 0 and row["ours_compiled"]["tokens_per_s"] > 0
        assert 0 < row["ours_eager"]["of_limit"] < 1
    assert res["ppo"]["steps"] == 2 and res["ppo"]["first_logp_dev_max"] == 0.0
    assert res["torchrun"]["returncode"] == 0 and res["torchrun"]["stages_finished"] == ["dpo", "rm", "rto", "sft"]
    assert "## decode" in (out / "results.md").read_text()
