"""sweep.py --quick end to end (its files exist and hold finite numbers: not that RTO wins), and train.py explain
checked against an independent computation of the token rewards."""
import json
import math
import re

import pytest
import torch

import sweep
import train
import hf
from task import TASKS, WordTask
from hf import Tokenizer
from model import Llama


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    result = sweep.main(["--quick", "--out", str(out)])
    return out, result


def finite_numbers(obj):
    if isinstance(obj, dict):
        return all(finite_numbers(v) for v in obj.values())
    if isinstance(obj, list):
        return all(finite_numbers(v) for v in obj)
    return not isinstance(obj, float) or math.isfinite(obj)


def test_quick_sweep_writes_its_table_and_numbers(quick):
    out, result = quick
    cfg = sweep.SweepConfig(quick=True)
    per_seed = json.loads((out / "results.json").read_text())
    assert len(per_seed) == cfg.seeds == 2
    names = {v["name"] for v in sweep.variants(cfg)}
    assert names == {"ppo_b0.25", "ppo_b1", "rto_b0.25", "rto_b1", "semi-rto_b0.25", "semi-rto_b1",
                     "dpo-only_b0.25", "dpo-only_b1", "rto_beta0.5_clipinf"}
    for s in per_seed:
        assert names | {"sft", "dpo", "correlation", "rm_accuracy"} <= set(s)
        assert finite_numbers(s) and -1 <= s["correlation"] <= 1
        for n in names:  # one curve point per rollout, and where each iteration's time went
            assert len(s[n]["curve"]) == s[n]["rollouts"] // cfg.batch_size
            assert s[n]["time_gen_s"] > 0 and s[n]["time_score_s"] > 0 and s[n]["time_update_s"] > 0
    text = (out / "results.md").read_text()
    assert "| rto_b1 | 1 (512 prompts) |" in text and "Correlation of the DPO token reward" in text
    try:
        import matplotlib  # noqa: F401 (the optional extra: plots only when it is installed)
        assert (out / "curves.png").stat().st_size > 0 and (out / "gold_vs_kl.png").stat().st_size > 0
    except ImportError:
        assert result["plots"] == []  # the optional extra is missing: the table is written, the plots are not


def test_sweep_rerun_keeps_finished_runs(quick):
    out, _ = quick
    run = out / "seed_0" / "rto_b1"
    before = (run / "result.json").read_text()
    (out / "seed_1" / "ppo_b1" / "result.json").unlink()  # as if killed during this run: it is redone
    sweep.main(["--quick", "--out", str(out)])
    assert (run / "result.json").read_text() == before and (out / "seed_1" / "ppo_b1" / "result.json").exists()


def naive_log_ratios(dpo, ref, prompt_ids, response_ids):
    """log pi_dpo(y_j | x, y_<j) - log pi_ref(y_j | x, y_<j), one token at a time on the unpadded sequence."""
    ids = torch.tensor([prompt_ids + response_ids])
    out = []
    with torch.no_grad():
        ld, lr = dpo(ids)[0].log_softmax(-1), ref(ids)[0].log_softmax(-1)
    for j, t in enumerate(response_ids):
        pos = len(prompt_ids) + j - 1  # the logits that predict response token j
        out.append(float(ld[pos, t] - lr[pos, t]))
    return out


def test_explain_matches_an_independent_computation(quick, tmp_path, capsys):
    out, _ = quick
    seed_dir = out / "seed_0"
    dpo_dir, ref_dir = seed_dir / "dpo" / "final", seed_dir / "sft" / "final"
    task = WordTask(seed=0, **TASKS["credit"])
    response = " ".join(task.words[:30])
    html = tmp_path / "e.html"
    common = ["explain", "--dpo", str(dpo_dir), "--ref", str(ref_dir), "--task", "credit", "--set", "ppo.beta1=0.5",
              "--set", "ppo.dpo_clip=0.1"]
    given = train.main([*common, "--prompt", "topic cats", "--response", response, "--html", str(html)])
    printed = capsys.readouterr().out
    sampled = train.main([*common, "--prompt", "topic ships", "--html", ""])  # the DPO model's own greedy answer
    res = {k: given[k] + sampled[k] for k in given}
    tok = Tokenizer.from_dir(dpo_dir)
    dpo, ref = hf.load(dpo_dir).eval(), hf.load(ref_dir).eval()
    for k, prompt in enumerate(["topic cats", "topic ships"]):
        msgs = [{"role": "user", "content": prompt}]
        p_ids = tok.encode_prompt(msgs, 64)
        r_ids = res["responses"][k]
        want = naive_log_ratios(dpo, ref, p_ids, r_ids)
        assert res["log_ratios"][k] == pytest.approx(want, abs=1e-5)
        if k == 0:
            assert r_ids == tok.encode_response(msgs, response, 64)
    # the piped output: one line per token with the clipped reward, the raw log-ratio and the gold term
    block = printed.split("--- 'topic cats'")[1].split("---")[0]
    rows = [l.split("\t") for l in block.splitlines() if l.startswith("'")]
    want = naive_log_ratios(dpo, ref, tok.encode_prompt([{"role": "user", "content": "topic cats"}], 64),
                            res["responses"][0])
    assert len(rows) == len(want) == 31  # 30 words + EOS
    gold = task.word_rewards([{"role": "user", "content": "topic cats"}], response) + [0.0]
    for (_, reward, raw, g), w, gw in zip(rows, want, gold):
        assert float(raw) == pytest.approx(w, abs=1e-4)
        assert float(reward) == pytest.approx(max(-0.1, min(0.1, 0.5 * w)), abs=1e-4)
        assert float(g) == pytest.approx(gw, abs=1e-3)
    assert "\x1b[" not in printed  # not a terminal: no colour codes
    page = html.read_text()
    assert page.count("<span") == 31 and "topic cats" in page and len(res["responses"][1]) >= 1
    assert re.search(r"summed token reward [+-]\d", printed)
