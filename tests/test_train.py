"""train.py, single process: every stage runs, the on-policy check holds, the RM reads the EOS, runs are seeded,
bad configurations are refused, and on the built-in task the pipeline learns."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import hf
import train
from model import Llama, ModelArgs
from pipeline import length_controlled_win_rate
from reward import sequence_scores

TINY = ["--n_sft", "256", "--n_pref", "256", "--n_prompts", "128", "--n_eval", "32", "--set", "sft.epochs=1",
        "--set", "dpo.epochs=1", "--set", "rm.epochs=1", "--set", "ppo.max_steps=2", "--no-progress"]


def metrics(run_dir) -> list[dict]:
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """The whole pipeline with a tiny budget and every PPO variant: data, tokenizer and all checkpoints."""
    out = tmp_path_factory.mktemp("pipeline")
    summary = train.main(["all", "--out", str(out), "--algos", "ppo,rto,semi-rto,dpo-only", *TINY])
    return out, summary


def without(args: list, flag: str) -> list:
    """args without --flag and its value."""
    i = args.index(flag)
    return args[:i] + args[i + 2:]


def ppo_args(out, run, *extra):
    return ["ppo", "--out", str(run), "--prompts", str(out / "data" / "prompts.jsonl"),
            "--policy", str(out / "sft" / "final"), "--dpo", str(out / "dpo" / "final"), "--rm", str(out / "rm" / "final"),
            "--max_prompt_len", "16", "--max_response_len", "16", "--lr", "1e-3", "--no-progress", *extra]


def test_all_stages_write_hf_checkpoints_and_a_table(pipeline):
    out, summary = pipeline
    assert set(summary) == {"sft", "dpo", "ppo", "rto", "semi-rto", "dpo-only"}
    for stage in ("sft", "dpo", "rm", "ppo", "rto", "semi-rto", "dpo-only"):
        final = out / stage / "final"
        for f in ("config.json", "model.safetensors", "tokenizer.json", "train_config.json"):
            assert (final / f).is_file(), final / f
        assert json.loads((final / "train_config.json").read_text())["out"] == str(out / stage)
        hf.load(final)  # strict load of what we wrote
    assert len(metrics(out / "sft")) == 256 // 64 and len(metrics(out / "rto")) == 2
    assert "| rto |" in (out / "results.md").read_text()
    # the RM checkpoint carries the score statistics PPO normalises with
    rm_cfg = json.loads((out / "rm" / "final" / "config.json").read_text())
    assert rm_cfg["architectures"] == ["LlamaForSequenceClassification"] and rm_cfg["rto_score_std"] > 0
    # the first PPO step starts from the SFT policy: KL to the reference is exactly 0 on that rollout
    assert metrics(out / "ppo")[0]["kl"] == 0.0


def test_first_minibatch_is_exactly_on_policy(pipeline, tmp_path):
    """ratio == 1 (log-prob difference exactly 0) on the first minibatch of every rollout, while later
    minibatches of the same rollout have moved (so the check can fail)."""
    out, _ = pipeline
    train.main(ppo_args(out, tmp_path / "r", "--max_steps", "3", "--rollout_batch_size", "64", "--batch_size", "16",
                        "--micro_batch_size", "8", "--ppo_epochs", "2"))
    rows = metrics(tmp_path / "r")
    assert [r["first_logp_dev"] for r in rows] == [0.0, 0.0, 0.0]
    assert all(r["approx_kl"] > 0 and r["ratio_max"] != 1.0 for r in rows)


def test_ppo_is_seeded(pipeline, tmp_path):
    out, _ = pipeline
    for run in ("a", "b"):
        train.main(ppo_args(out, tmp_path / run, "--max_steps", "2", "--rollout_batch_size", "32", "--batch_size", "32",
                            "--micro_batch_size", "16"))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s" and not k.startswith("time_")}
                          for r in rows]
    assert strip(metrics(tmp_path / "a")) == strip(metrics(tmp_path / "b"))
    train.main(ppo_args(out, tmp_path / "c", "--max_steps", "2", "--rollout_batch_size", "32", "--batch_size", "32",
                        "--micro_batch_size", "16", "--seed", "1"))
    assert strip(metrics(tmp_path / "c")) != strip(metrics(tmp_path / "a"))


def test_reward_model_reads_the_eos_for_left_and_right_padding():
    """Score at the EOS: the same pair scored in our [left-padded prompt | right-padded response] layout and fully
    right-padded must both equal the score of the unpadded row at its last token."""
    torch.manual_seed(0)
    rm = Llama(ModelArgs.preset("tiny", head="score")).eval()
    eos, pad = 1, 2
    rows = [[5, 6, 7, 8, eos], [9, 10, eos], [11, 12, 13, 14, 15, 16, eos]]
    with torch.no_grad():
        expected = torch.stack([rm(torch.tensor([r]))[0, -1] for r in rows])
        prompts, responses = [r[:2] for r in rows], [r[2:] for r in rows]
        from data import collate
        b = collate(prompts, responses, pad)
        ours = sequence_scores(rm, b)
        T = max(map(len, rows))
        ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
        right = sequence_scores(rm, {"input_ids": ids, "attention_mask": mask})
    assert b["attention_mask"][:, 0].tolist() == [1, 1, 1]  # same-length prompts: padding only on the right here
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(right, expected, atol=1e-5, rtol=0)
    # and a left-padded prompt of a different length
    b2 = collate([[5, 6], [9]], [[7, 8, eos], [10, eos]], pad)
    with torch.no_grad():
        got = sequence_scores(rm, b2)
        exp2 = torch.stack([rm(torch.tensor([[5, 6, 7, 8, eos]]))[0, -1], rm(torch.tensor([[9, 10, eos]]))[0, -1]])
    assert b2["attention_mask"][1, 0] == 0
    torch.testing.assert_close(got, exp2, atol=1e-5, rtol=0)


def test_sample_command(pipeline, capsys):
    out, _ = pipeline
    train.main(["sample", "--model", str(out / "sft" / "final"), "--prompt", "topic " + "x", "--max_new_tokens", "5"])
    printed = capsys.readouterr().out
    assert "plain format" in printed and printed.count("---") == 1


def test_config_errors_are_clear(pipeline, tmp_path):
    out, _ = pipeline
    bad = ppo_args(out, tmp_path / "x")
    bad[bad.index("--dpo") + 1] = ""
    with pytest.raises(ValueError, match="--algo rto needs --dpo"):
        train.main(bad)
    with pytest.raises(ValueError, match="not divisible by micro_batch_size"):
        train.main(ppo_args(out, tmp_path / "y", "--batch_size", "32", "--micro_batch_size", "12"))
    with pytest.raises(ValueError, match="unknown 'nope'"):
        train.main(["all", "--out", str(tmp_path / "z"), "--algos", "ppo,nope"])
    with pytest.raises(ValueError, match="--algo 'bogus'"):
        train.main(ppo_args(out, tmp_path / "w", "--algo", "bogus"))


def test_pipeline_learns_the_built_in_task(tmp_path):
    """The real thing at its default sizes, with fewer PPO steps: the reward model ranks held-out pairs above
    chance, and PPO and RTO both raise the gold reward (the task's true reward, which no model sees) of their
    samples over SFT's."""
    summary = train.main(["all", "--out", str(tmp_path), "--algos", "ppo,rto", "--set", "ppo.max_steps=30", "--no-progress"])
    rm_eval = json.loads((tmp_path / "rm" / "eval.json").read_text())
    assert rm_eval["on"] == "eval" and rm_eval["eval_accuracy"] > 0.6  # chance is 0.5
    for algo in ("ppo", "rto"):
        assert summary[algo]["gold"] > summary["sft"]["gold"] + 0.5, summary
        assert summary[algo]["win_vs_sft"] > 0.55, summary


def test_bf16_checkpoint_trains_in_fp32(tmp_path):
    """HF Llama-3 checkpoints ship bf16: a stage must load them as fp32 master weights (in bf16, an AdamW step of
    5e-7 on a weight of 0.02 rounds to no change at all)."""
    torch.manual_seed(0)
    model = Llama(ModelArgs.preset("tiny")).to(torch.bfloat16)
    hf.save(model, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = train.open_model(str(tmp_path / "bf16"), "lm", train.SFTConfig())
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a.float(), b), name
    w = torch.tensor(0.02, dtype=torch.bfloat16)
    assert w - 5e-7 == w  # why it matters


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "rloo-token"])
def test_critic_free_estimators_load_and_save_no_critic(pipeline, tmp_path, monkeypatch, estimator):
    """A group estimator: the k responses of each prompt side by side in one rank's rollout, no critic model, no
    critic optimizer, no critic in the checkpoint, and still exactly on-policy on the first minibatch."""
    out, _ = pipeline
    seen, opened = [], []
    real_rollout, real_open = train.rollout, train.open_model
    monkeypatch.setattr(train, "rollout", lambda actor, models, critic, tok, prompts, cfg, gen: (
        seen.append((critic, prompts)), real_rollout(actor, models, critic, tok, prompts, cfg, gen))[1])
    monkeypatch.setattr(train, "open_model", lambda path, head, *a, **kw: (
        opened.append((path, head, kw.get("frozen", False))), real_open(path, head, *a, **kw))[1])
    run = tmp_path / estimator
    train.main(ppo_args(out, run, "--estimator", estimator, "--samples_per_prompt", "4", "--max_steps", "3",
                        "--rollout_batch_size", "32", "--batch_size", "16", "--micro_batch_size", "8",
                        "--save_every", "2"))
    for critic, prompts in seen:
        assert critic is None and len(prompts) == 32
        groups = [prompts[i:i + 4] for i in range(0, 32, 4)]
        assert all(g.count(g[0]) == 4 for g in groups)  # each prompt 4 times in a row
    # trained models: the actor only (no score head is opened to be trained)
    assert [(p, h) for p, h, frozen in opened if not frozen] == [(str(out / "sft" / "final"), "lm")]
    ckpt = next((run / "checkpoints").glob("step_*"))
    assert list(json.loads((ckpt / "meta.json").read_text())["schedulers"]) == ["actor"]
    rows = metrics(run)
    assert all("value_loss" not in r and "explained_var" not in r for r in rows)
    assert [r["first_logp_dev"] for r in rows] == [0.0, 0.0, 0.0]
    assert all(math.isfinite(r["policy_loss"]) and r["approx_kl"] > 0 for r in rows)


def test_group_estimator_errors(pipeline, tmp_path):
    out, _ = pipeline
    with pytest.raises(ValueError, match="--samples_per_prompt 2 or more"):
        train.main(ppo_args(out, tmp_path / "a", "--estimator", "rloo"))
    with pytest.raises(ValueError, match="not a multiple of samples_per_prompt 3"):
        train.main(ppo_args(out, tmp_path / "b", "--estimator", "rloo", "--samples_per_prompt", "3"))
    with pytest.raises(ValueError, match="has no critic"):
        train.main(ppo_args(out, tmp_path / "c", "--estimator", "grpo", "--samples_per_prompt", "4", "--critic",
                            str(out / "rm" / "final")))


def test_inputs_and_fields_a_run_never_reads(pipeline, tmp_path, capsys):
    """A --dpo that --algo ppo never loads is refused by name (nothing is written); a field only other algorithms or
    losses read (--beta1 under ppo, --rdpo_alpha under the sigmoid loss) is named in a warning."""
    out, _ = pipeline
    with pytest.raises(ValueError, match=r"--dpo .*dpo/final: --algo ppo \(--kl_anchor sft\) never loads it: drop it"):
        train.main(ppo_args(out, tmp_path / "a", "--algo", "ppo"))
    assert not (tmp_path / "a").exists()
    train.main(without(ppo_args(out, tmp_path / "b", "--algo", "ppo", "--beta1", "0.2", "--max_steps", "1",
                                "--rollout_batch_size", "32", "--batch_size", "32", "--micro_batch_size", "16"), "--dpo"))
    assert "warning: --beta1 0.2: --algo ppo --estimator gae never reads it" in capsys.readouterr().out
    train.main(["dpo", "--data", str(out / "data" / "prefs.jsonl"), "--model", str(out / "sft" / "final"),
                "--out", str(tmp_path / "d"), "--rdpo_alpha", "0.3", "--max_steps", "1", "--batch_size", "16",
                "--micro_batch_size", "16", "--max_prompt_len", "16", "--max_response_len", "16", "--no-progress"])
    assert "warning: --rdpo_alpha 0.3: --loss_type sigmoid never reads it" in capsys.readouterr().out


def test_kl_anchor_dpo_needs_the_dpo_model(pipeline, tmp_path):
    """--algo ppo --kl_anchor dpo: the DPO model is loaded for the KL term alone; without --dpo it is an error."""
    out, _ = pipeline
    bad = ppo_args(out, tmp_path / "a", "--algo", "ppo", "--kl_anchor", "dpo")
    bad[bad.index("--dpo") + 1] = ""
    with pytest.raises(ValueError, match="--algo ppo --kl_anchor dpo needs --dpo"):
        train.main(bad)
    train.main(ppo_args(out, tmp_path / "b", "--algo", "ppo", "--kl_anchor", "dpo", "--max_steps", "1",
                        "--rollout_batch_size", "32", "--batch_size", "32", "--micro_batch_size", "16"))
    # on the first rollout pi is the SFT model, so the KL to the DPO model is log(pi_sft / pi_dpo), not 0
    assert metrics(tmp_path / "b")[0]["kl"] != 0.0


def test_ppo_alone_logs_the_gold_reward(pipeline, tmp_path):
    """`train.py ppo --task`: the gold reward is logged as in `all`; the task by name + seed and the task.json the
    pipeline wrote are the same task."""
    out, _ = pipeline
    common = ("--max_steps", "1", "--rollout_batch_size", "32", "--batch_size", "32", "--micro_batch_size", "16")
    train.main(ppo_args(out, tmp_path / "json", "--task", str(out / "data" / "task.json"), *common))
    train.main(ppo_args(out, tmp_path / "name", "--task", "words", "--task_seed", "0", *common))
    train.main(ppo_args(out, tmp_path / "none", *common))
    gold = metrics(tmp_path / "json")[0]["gold"]
    assert math.isfinite(gold) and metrics(tmp_path / "name")[0]["gold"] == gold
    assert "gold" not in metrics(tmp_path / "none")[0]


def test_reuse_keeps_the_shared_stages(tmp_path):
    """--reuse: a second `all` keeps sft/dpo/rm (same config, same data), reruns the PPO stages; a changed DPO
    field reruns DPO alone (RM and SFT kept); a changed data size reruns everything."""
    base = ["all", "--out", str(tmp_path), "--algos", "ppo", "--reuse", *TINY]

    def stamps():
        return {s: (tmp_path / s / "final" / "model.safetensors").stat().st_mtime_ns for s in ("sft", "dpo", "rm", "ppo")}

    train.main(base)
    first = stamps()
    train.main(base)
    second = stamps()
    assert {s: second[s] == first[s] for s in second} == {"sft": True, "dpo": True, "rm": True, "ppo": False}
    # a fork's new field, at its default, is the same setting: a DPO run made before the field existed is kept
    saved = tmp_path / "dpo" / "final" / "train_config.json"
    saved.write_text(json.dumps({k: v for k, v in json.loads(saved.read_text()).items() if k != "tdpo_alpha"}))
    train.main(base)
    assert stamps()["dpo"] == second["dpo"]
    train.main(base + ["--set", "dpo.beta=0.2"])
    third = stamps()
    assert {s: third[s] == second[s] for s in third} == {"sft": True, "dpo": False, "rm": True, "ppo": False}
    train.main(base + ["--set", "dpo.beta=0.2", "--n_sft", "128"])
    fourth = stamps()
    assert not any(fourth[s] == third[s] for s in fourth)
    # without --reuse a finished pipeline is refused, as before
    with pytest.raises(ValueError, match="holds a finished run"):
        train.main(base[:base.index("--reuse")] + base[base.index("--reuse") + 1:])


def test_length_controlled_win_rate():
    """Against closed forms and a brute-force fit: no length difference -> the raw win rate; a judge that prefers
    longer answers -> about 0.5 at equal length while the raw win rate is high; the fit equals a grid search."""
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.7
    lc = length_controlled_win_rate(np.where(y, 1.0, -1.0), np.zeros(200))
    assert lc == pytest.approx(y.mean(), abs=1e-4)
    # the policy writes longer answers on most prompts, and the judge likes length alone
    len_diff = rng.normal(3.0, 4.0, 2000)
    feature = np.tanh(len_diff / len_diff.std())
    wins = rng.random(2000) < 1 / (1 + np.exp(-3.0 * feature))
    judge = np.where(wins, 1.0, -1.0)
    lc = length_controlled_win_rate(judge, len_diff)
    assert wins.mean() > 0.65 and abs(lc - 0.5) < 0.06, (wins.mean(), lc)
    # the same penalised cross-entropy minimised by brute force over a grid: the same intercept
    grid = np.linspace(-1, 1, 201)
    w1s = np.linspace(2, 4, 201)
    y01 = wins.astype(float)
    best = min(((np.mean(np.logaddexp(0, -(2 * y01 - 1) * (w0 + w1 * feature))), w0) for w0 in grid for w1 in w1s))
    assert 1 / (1 + np.exp(-best[1])) == pytest.approx(lc, abs=0.005)
    # ties count half
    assert length_controlled_win_rate(np.zeros(10), np.zeros(10)) == pytest.approx(0.5, abs=1e-6)


def test_offline_methods_in_the_pipeline(tmp_path):
    """`all --algos ppo,r-dpo,simpo,tdpo`: each offline method is a DPO run with its own loss, judged beside the
    others with the LC win rate; RTO refuses a SimPO run as its DPO model (no reference, no implicit reward)."""
    out = tmp_path / "p"
    summary = train.main(["all", "--out", str(out), "--algos", "ppo,r-dpo,simpo,tdpo", *TINY])
    assert set(summary) == {"sft", "dpo", "r-dpo", "simpo", "tdpo", "ppo"}
    for name, loss in (("r-dpo", "rdpo"), ("simpo", "simpo"), ("tdpo", "tdpo2")):
        saved = json.loads((out / name / "final" / "train_config.json").read_text())
        assert saved["loss_type"] == loss and (out / name / "eval.json").is_file()
        assert math.isfinite(metrics(out / name)[-1]["loss"])
    assert json.loads((out / "simpo" / "final" / "train_config.json").read_text())["beta"] == 2.0
    assert "LC win rate vs SFT (gold, minimal GLM)" in (out / "results.md").read_text()
    assert all(0 <= s["lc_win_vs_sft"] <= 1 for s in summary.values())
    bad = ppo_args(out, tmp_path / "x")
    bad[bad.index("--dpo") + 1] = str(out / "simpo" / "final")
    with pytest.raises(ValueError, match="was trained with loss_type 'simpo', which has no reference model"):
        train.main(bad)
    # at step 0 (policy == reference) every loss starts where its formula says: DPO-like ones at log 2
    assert metrics(out / "tdpo")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


# ----------------------------------------------------------------------------------------------------------
# The hack points a fork reaches for first: each does what it says, and a wrong combination is an error


def test_entropy_bonus_trains_the_entropy(pipeline, tmp_path):
    """--entropy_coef: the bonus is in the loss (the entropy is differentiable), so a large one raises the policy's
    entropy where none leaves it to the reward; the first rollout, before any update, is the same for both."""
    out, _ = pipeline
    common = ("--max_steps", "4", "--rollout_batch_size", "32", "--batch_size", "16", "--micro_batch_size", "8",
              "--algo", "ppo")
    train.main(without(ppo_args(out, tmp_path / "none", *common), "--dpo"))
    train.main(without(ppo_args(out, tmp_path / "bonus", *common, "--entropy_coef", "5"), "--dpo"))
    none, bonus = metrics(tmp_path / "none"), metrics(tmp_path / "bonus")
    assert none[0]["kl"] == bonus[0]["kl"] == 0.0 and none[0]["score"] == bonus[0]["score"]
    assert bonus[-1]["entropy"] > none[-1]["entropy"] + 0.01, (bonus[-1]["entropy"], none[-1]["entropy"])
    assert all(r["first_logp_dev"] == 0.0 for r in bonus)


@pytest.mark.parametrize("estimator", ["reinforce", "reinforce++"])
def test_reinforce_needs_no_critic_and_no_group(pipeline, tmp_path, estimator):
    """REINFORCE and REINFORCE++: one sample per prompt, no critic opened or saved, exactly on-policy on the first
    minibatch."""
    out, _ = pipeline
    train.main(ppo_args(out, tmp_path / "r", "--estimator", estimator, "--max_steps", "2",
                        "--rollout_batch_size", "32", "--batch_size", "16", "--micro_batch_size", "8"))
    rows = metrics(tmp_path / "r")
    assert [r["first_logp_dev"] for r in rows] == [0.0, 0.0]
    assert all("value_loss" not in r for r in rows) and all(math.isfinite(r["policy_loss"]) for r in rows)


def test_ppo_from_the_dpo_model(pipeline, tmp_path):
    """--init starts the actor from the DPO model while pi_ref stays SFT: the first rollout's KL to SFT and its DPO
    reward are not 0. --policy set to the DPO model (pi_ref = pi_dpo: a DPO reward of 0 on every token) is an error
    that names the fix; --allow_ref_mismatch insists."""
    out, _ = pipeline
    common = ("--max_steps", "1", "--rollout_batch_size", "32", "--batch_size", "32", "--micro_batch_size", "16")
    train.main(ppo_args(out, tmp_path / "init", "--init", str(out / "dpo" / "final"), *common))
    first = metrics(tmp_path / "init")[0]
    assert first["kl"] > 0 and first["dpo_reward"] != 0.0 and first["first_logp_dev"] == 0.0
    bad = ppo_args(out, tmp_path / "bad", *common)
    bad[bad.index("--policy") + 1] = str(out / "dpo" / "final")
    with pytest.raises(ValueError, match=r"--policy .* is a DPO model.*--init .*dpo/final.*--allow_ref_mismatch"):
        train.main(bad)
    ppo_bad = without(bad, "--dpo") + ["--algo", "ppo"]  # no DPO term: still pi_ref = pi_dpo
    with pytest.raises(ValueError, match=r"is a DPO model \(its train_config.json\): pi_ref, the model the KL term keeps "
                                         r"pi near, would be the DPO model"):
        train.main(ppo_bad)
    train.main(bad + ["--allow_ref_mismatch"])
    assert metrics(tmp_path / "bad")[0]["dpo_reward"] == 0.0  # what the error was about


def test_advantage_whitening_follows_each_estimators_source():
    """Whitened over the rollout by default where the estimator's source whitens (the reference code's GAE,
    REINFORCE++), not re-whitened where it does not (RLOO and GRPO as TRL and DeepSeekMath compute them, rloo-token,
    plain REINFORCE); --whiten_advantages forces either way. Checked against the estimator's own output and a
    whitening written out here."""
    import ppo

    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    mask = torch.tensor([[t < n for t in range(5)] for n in (5, 2, 4, 1, 3, 5, 4, 2)])

    def whitened(x):
        v = x[mask].double()
        return ((x.double() - v.mean()) / (v.var(unbiased=False) + 1e-8).sqrt()).float() * mask

    expected = {"gae": True, "reinforce++": True, "rloo": False, "grpo": False, "rloo-token": False, "reinforce": False}
    assert {k: e.whiten for k, e in ppo.ESTIMATORS.items()} == expected
    for name, whiten in expected.items():
        for force in (None, not whiten):
            cfg = train.PPOConfig(estimator=name, samples_per_prompt=4, whiten_advantages=force)
            raw, _ = ppo.ESTIMATORS[name].fn(rewards, mask, values, {"k": 4, "gamma": 1.0, "lam": 0.95,
                                                                     "grpo_eps": 1e-4})
            adv, _ = train.advantages(cfg, rewards, mask, values)
            want = whitened(raw) if (whiten if force is None else force) else raw
            torch.testing.assert_close(adv, want, atol=1e-5, rtol=0, msg=f"{name} whiten_advantages={force}")
