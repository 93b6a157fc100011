"""rto.py against hand-computed rewards.

One batch of 3 responses, T = 4 response slots, numbers chosen so the arithmetic is done by hand:
  row 0: 4 valid tokens, no EOS (cut by max_new_tokens): ended False, penalised on its last token
  row 1: 2 valid tokens, EOS at t = 1 (early in the buffer)
  row 2: 3 valid tokens, EOS at t = 2
Padding holds garbage (7.0, NaN) that must not leak.
Settings: beta1 0.1, dpo_clip 0.05, beta2 0.1, beta3 1, no_eos_penalty 1, k1 KL.
"""

import math

import pytest
import torch

from rto import ALGOS, dense_rewards, dpo_token_reward, pool_on_delimiters

NAN = float("nan")
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]).bool()
LOGP_REF = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, 7.0, 7.0], [-1.0, -1.0, -1.0, 7.0]])
# logp - logp_ref = KL_k1:  [0.2, -0.1, 0.0, 0.4] / [0.1, 0.3] / [-0.2, 0.0, 0.5]
LOGP = LOGP_REF + torch.tensor([[0.2, -0.1, 0.0, 0.4], [0.1, 0.3, NAN, 7.0], [-0.2, 0.0, 0.5, NAN]])
# logp_dpo - logp_ref:  [0.3, -0.2, 1.0, 0.0] / [-0.9, 0.1] / [0.2, 0.4, -0.3]
LOGP_DPO = LOGP_REF + torch.tensor([[0.3, -0.2, 1.0, 0.0], [-0.9, 0.1, 9.0, NAN], [0.2, 0.4, -0.3, 9.0]])
RM_SCORE = torch.tensor([2.0, -1.0, 0.5])
ENDED = torch.tensor([False, True, True])
# delimiters: row 0 at t=1; row 1 at t=0 and in the padding at t=3 (ignored); row 2 on its last token
DELIM = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 1], [0, 0, 1, 0]]).bool()
KW = dict(beta1=0.1, dpo_clip=0.05, beta2=0.1, beta3=1.0, no_eos_penalty=1.0)
HP = {}  # a new term's own hyper-parameters, by name (train.py passes every PPOConfig field): add yours here

# By hand:
# -beta2 * KL:       [-0.02, 0.01, 0.0, -0.04] / [-0.01, -0.03] / [0.02, 0.0, -0.05]
# beta1 * dpo ratio: [0.03, -0.02, 0.10, 0.0] / [-0.09, 0.01] / [0.02, 0.04, -0.03]
#   clamped +-0.05:  [0.03, -0.02, 0.05, 0.0] / [-0.05, 0.01] / [0.02, 0.04, -0.03]
# score: ppo/rto/semi-rto 2.0 - 1.0 (no EOS) = 1.0 / -1.0 / 0.5;  dpo-only -1.0 / 0 / 0
EXPECTED_DPO = torch.tensor([[0.03, -0.02, 0.05, 0.0], [-0.05, 0.01, 0.0, 0.0], [0.02, 0.04, -0.03, 0.0]])
# semi-rto pooling: row 0: t1 gets 0.03 - 0.02 = 0.01, the rest (0.05 + 0.0) lands on t3;
#                   row 1: t0 gets -0.05, the rest 0.01 on t1; row 2: t2 gets 0.02 + 0.04 - 0.03 = 0.03
EXPECTED_POOLED = torch.tensor([[0.0, 0.01, 0.0, 0.05], [-0.05, 0.01, 0.0, 0.0], [0.0, 0.0, 0.03, 0.0]])
EXPECTED = {
    "ppo": ([[-0.02, 0.01, 0.0, -0.04 + 1.0],
             [-0.01, -0.03 - 1.0, 0.0, 0.0],
             [0.02, 0.0, -0.05 + 0.5, 0.0]], [1.0, -1.0, 0.5]),
    "rto": ([[-0.02 + 0.03, 0.01 - 0.02, 0.0 + 0.05, -0.04 + 0.0 + 1.0],
             [-0.01 - 0.05, -0.03 + 0.01 - 1.0, 0.0, 0.0],
             [0.02 + 0.02, 0.0 + 0.04, -0.05 - 0.03 + 0.5, 0.0]], [1.0, -1.0, 0.5]),
    "semi-rto": ([[-0.02, 0.01 + 0.01, 0.0, -0.04 + 0.05 + 1.0],
                  [-0.01 - 0.05, -0.03 + 0.01 - 1.0, 0.0, 0.0],
                  [0.02, 0.0, -0.05 + 0.03 + 0.5, 0.0]], [1.0, -1.0, 0.5]),
    "dpo-only": ([[-0.02 + 0.03, 0.01 - 0.02, 0.0 + 0.05, -0.04 + 0.0 - 1.0],
                  [-0.01 - 0.05, -0.03 + 0.01, 0.0, 0.0],
                  [0.02 + 0.02, 0.0 + 0.04, -0.05 - 0.03, 0.0]], [-1.0, 0.0, 0.0]),
}


def run(algo, **overrides):
    kw = dict(logp=LOGP, logp_anchor=LOGP_REF, logp_ref=LOGP_REF, mask=MASK, rm_score=RM_SCORE, logp_dpo=LOGP_DPO,
              delimiter_mask=DELIM, ended=ENDED, hp=HP, **KW)
    kw.update(overrides)
    return dense_rewards(algo, **kw)


@pytest.mark.parametrize("algo", ALGOS)
def test_dense_rewards_hand_computed(algo):
    assert algo in EXPECTED, (f"rto.ALGOS has {algo!r}, but tests/test_rto.py has no hand-computed reward for it: add "
                              f"EXPECTED[{algo!r}] = (its (3, 4) rewards, its (3,) score) for the batch at the top")
    rewards, comp = run(algo)
    want, want_score = EXPECTED[algo]
    assert rewards.dtype == torch.float32
    torch.testing.assert_close(rewards, torch.tensor(want), atol=1e-6, rtol=0)
    torch.testing.assert_close(comp["score"], torch.tensor(want_score), atol=1e-6, rtol=0)
    want_kl = torch.tensor([[0.2, -0.1, 0.0, 0.4], [0.1, 0.3, 0.0, 0.0], [-0.2, 0.0, 0.5, 0.0]])
    torch.testing.assert_close(comp["kl"], want_kl, atol=1e-6, rtol=0)
    want_dpo = {"ppo": torch.zeros(3, 4), "semi-rto": EXPECTED_POOLED}.get(algo, EXPECTED_DPO)
    if "dpo" in ALGOS[algo].terms or algo == "ppo":
        torch.testing.assert_close(comp["dpo"], want_dpo, atol=1e-6, rtol=0)
    assert (rewards[~MASK] == 0).all()


def test_semi_rto_preserves_row_totals():
    r_rto, _ = run("rto")
    r_semi, _ = run("semi-rto")
    torch.testing.assert_close(r_semi.sum(-1), r_rto.sum(-1), atol=1e-6, rtol=0)
    assert not torch.allclose(r_semi, r_rto)


def test_pool_on_delimiters_random_rows_vs_loop():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(5, 9, generator=g)
    lengths = [9, 1, 4, 6, 2]
    mask = torch.tensor([[t < L for t in range(9)] for L in lengths])
    delim = torch.rand(5, 9, generator=g) < 0.3
    out = pool_on_delimiters(r, mask, delim)
    for b, L in enumerate(lengths):
        acc, want = 0.0, [0.0] * 9
        for t in range(L):
            acc += r[b, t].item()
            if delim[b, t] or t == L - 1:
                want[t], acc = acc, 0.0
        torch.testing.assert_close(out[b], torch.tensor(want), atol=1e-5, rtol=0)


def test_no_penalty_without_flag_and_k3_passthrough():
    # no_eos_penalty 0: ended is not needed and row 0 keeps its full score
    rewards, comp = run("ppo", no_eos_penalty=0.0, ended=None, kl_estimator="k3")
    torch.testing.assert_close(comp["score"], RM_SCORE)
    d = -0.4                                              # row 0, t3: logp_ref - logp
    k3 = math.exp(d) - d - 1
    assert rewards[0, 3].item() == pytest.approx(-0.1 * k3 + 2.0, abs=1e-6)


def test_dpo_token_reward_rejects_nonpositive():
    for beta1, clip in ((0.0, 0.05), (-0.1, 0.05), (0.05, 0.0)):
        with pytest.raises(ValueError):
            dpo_token_reward(LOGP_DPO, LOGP_REF, MASK, beta1, clip)


def test_bad_algo_and_missing_inputs():
    with pytest.raises(ValueError, match="dpo-only"):      # the message lists ALGOS
        run("rs-ppo")
    with pytest.raises(ValueError, match="logp_dpo"):
        run("rto", logp_dpo=None)
    with pytest.raises(ValueError, match="logp_dpo"):
        run("dpo-only", logp_dpo=None)
    with pytest.raises(ValueError, match="rm_score"):
        run("ppo", rm_score=None)
    with pytest.raises(ValueError, match="rm_score"):
        run("semi-rto", rm_score=None)
    with pytest.raises(ValueError, match="delimiter_mask"):
        run("semi-rto", delimiter_mask=None)
    with pytest.raises(ValueError, match="ended"):
        run("rto", ended=None)
    # inputs an algorithm does not use may be absent
    run("ppo", logp_dpo=None, delimiter_mask=None)
    run("dpo-only", rm_score=None, delimiter_mask=None)


def test_kl_anchor_is_its_own_input():
    """--kl_anchor dpo: the KL term is log(pi / pi_dpo) while the DPO term still reads log(pi_dpo / pi_ref)."""
    rewards, comp = run("rto", logp_anchor=LOGP_DPO)
    # logp - logp_dpo = (logp - ref) - (dpo - ref), by hand from the tables above (valid tokens only)
    want_kl = torch.tensor([[0.2 - 0.3, -0.1 + 0.2, 0.0 - 1.0, 0.4 - 0.0], [0.1 + 0.9, 0.3 - 0.1, 0.0, 0.0],
                            [-0.2 - 0.2, 0.0 - 0.4, 0.5 + 0.3, 0.0]])
    torch.testing.assert_close(comp["kl"], want_kl, atol=1e-6, rtol=0)
    torch.testing.assert_close(comp["dpo"], EXPECTED_DPO, atol=1e-6, rtol=0)
    torch.testing.assert_close(rewards, -0.1 * want_kl + EXPECTED_DPO + torch.tensor(
        [[0, 0, 0, 1.0], [0, -1.0, 0, 0], [0, 0, 0.5, 0]]), atol=1e-6, rtol=0)


def test_a_new_algorithm_is_one_table_entry(monkeypatch):
    """What a fork adds: one term and one entry. Here "rto-shaped": the DPO term on every token plus r_MLE, with the
    DPO term counted twice by a second dense term; dense_rewards needs nothing else."""
    import rto

    def twice_dpo(x, hp):
        return 2 * rto.dpo_dense(x, hp)

    monkeypatch.setitem(rto.ALGOS, "rto-x2", rto.Algo(needs=("logp_dpo", "rm_score"),
                                                      terms={"extra": twice_dpo, "rm": rto.rm_last}))
    rewards, comp = run("rto-x2")
    base, _ = run("ppo")
    torch.testing.assert_close(rewards, base + 2 * EXPECTED_DPO, atol=1e-6, rtol=0)
    torch.testing.assert_close(comp["extra"], 2 * EXPECTED_DPO, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="logp_dpo"):
        run("rto-x2", logp_dpo=None)
