"""ppo.py against independent computations: naive loops, numpy, hand-computed numbers."""

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ppo import (entropy_from_logits, explained_variance, gae, grpo, kl_penalty, logprobs_from_logits,
                 masked_mean, masked_sum, masked_whiten, policy_loss, reward_to_go, rloo, rloo_token, value_loss)


def naive_logprob(row, label, temperature):
    """log softmax(row / temperature)[label] with math only, row a list of floats."""
    z = [v / temperature for v in row]
    m = max(z)
    return z[label] - (m + math.log(sum(math.exp(v - m) for v in z)))


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_logprobs_vs_naive_loop(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 5, (2, 3), generator=g)
    out = logprobs_from_logits(logits.float(), labels, temperature)
    assert out.dtype == torch.float32 and out.shape == (2, 3)
    for b in range(2):
        for t in range(3):
            want = naive_logprob(logits[b, t].tolist(), labels[b, t].item(), temperature)
            assert out[b, t].item() == pytest.approx(want, abs=1e-5)


def test_logprobs_bf16_input_gives_fp32_of_same_values():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 4, 11, generator=g) * 4).bfloat16()
    labels = torch.randint(0, 11, (2, 4), generator=g)
    out = logprobs_from_logits(logits, labels, 0.8)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, logprobs_from_logits(logits.float(), labels, 0.8), rtol=0, atol=0)
    # and it is the true log-prob of those bf16 values, not a bf16-rounded one
    want = naive_logprob(logits[1, 2].double().tolist(), labels[1, 2].item(), 0.8)
    assert out[1, 2].item() == pytest.approx(want, abs=1e-5)


def test_logprobs_gradient_flows():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    logprobs_from_logits(logits, torch.zeros(2, 3, dtype=torch.long)).sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_entropy_vs_naive():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 6, generator=g) * 2
    for temperature in (1.0, 0.5):
        out = entropy_from_logits(logits, temperature)
        for b in range(2):
            for t in range(3):
                p = [math.exp(naive_logprob(logits[b, t].tolist(), i, temperature)) for i in range(6)]
                assert out[b, t].item() == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-5)
    # uniform logits: entropy log V
    assert entropy_from_logits(torch.zeros(1, 1, 8))[0, 0].item() == pytest.approx(math.log(8), abs=1e-6)


def _data():
    x = torch.tensor([[1.0, 2.0, 3.0, 50.0], [4.0, -1.0, 99.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    valid = np.array([1.0, 2.0, 3.0, 4.0, -1.0])
    return x, mask, valid


def test_masked_sum_mean_vs_numpy():
    x, mask, valid = _data()
    assert masked_sum(x, mask).item() == pytest.approx(valid.sum())
    assert masked_mean(x, mask).item() == pytest.approx(valid.mean())
    assert masked_mean(x, mask.bool()).item() == pytest.approx(valid.mean())   # bool mask too
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([2.0, 1.5]))


def test_masked_whiten_vs_numpy():
    x, mask, valid = _data()
    out = masked_whiten(x, mask)
    want = (valid - valid.mean()) / np.sqrt(valid.var() + 1e-8)        # biased variance
    torch.testing.assert_close(out[mask.bool()], torch.tensor(want, dtype=torch.float32))
    assert (out[~mask.bool()] == 0).all()                              # padding (even NaN) -> 0
    out = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(out[mask.bool()], torch.tensor(want + valid.mean(), dtype=torch.float32))
    assert (out[~mask.bool()] == 0).all()


def test_kl_closed_forms():
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    logp_ref = torch.tensor([-1.5, -1.0, -0.5, -0.1])
    k1 = kl_penalty(logp, logp_ref, "k1")
    k3 = kl_penalty(logp, logp_ref, "k3")
    for i in range(4):
        d = logp_ref[i].item() - logp[i].item()
        assert k1[i].item() == pytest.approx(logp[i].item() - logp_ref[i].item())
        assert k3[i].item() == pytest.approx(math.exp(d) - d - 1, rel=1e-6, abs=1e-6)
    assert (k3 >= 0).all() and k3[2] == 0
    with pytest.raises(ValueError):
        kl_penalty(logp, logp_ref, "k2")


def test_gae_vs_naive_double_loop():
    g = torch.Generator().manual_seed(3)
    B, T, gamma, lam = 4, 7, 0.9, 0.8
    lengths = [7, 3, 1, 5]
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.tensor([[t < L for t in range(T)] for L in lengths])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b, L in enumerate(lengths):
        r, v = rewards[b].tolist(), values[b].tolist()
        delta = [r[t] + gamma * (v[t + 1] if t + 1 < L else 0.0) - v[t] for t in range(L)]
        for t in range(T):
            if t < L:
                a = sum((gamma * lam) ** l * delta[t + l] for l in range(L - t))
                assert adv[b, t].item() == pytest.approx(a, abs=1e-10)
                assert ret[b, t].item() == pytest.approx(a + v[t], abs=1e-10)
            else:
                assert adv[b, t].item() == 0 and ret[b, t].item() == 0


def test_policy_loss_hand_computed():
    # row 0: ratios 1.5 (A=+1, clipped to 1.2), 0.5 (A=-1, clipped to 0.8), 1.1 (A=+2, inside)
    # row 1: ratios 0.7 (A=+1: unclipped term is the max), 1.3 (A=+1, clipped to 1.2); 1 pad token
    logp_old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1], [0.7, 1.3, 40.0]]))
    adv = torch.tensor([[1.0, -1.0, 2.0], [1.0, 1.0, 1e6]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    loss, stats = policy_loss(logp, logp_old, adv, mask, clip_eps=0.2)
    row0 = (-1.2 + 0.8 - 2.2) / 3
    row1 = (-0.7 - 1.2) / 2
    assert loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-6)    # not the token mean -0.9
    assert stats["clipfrac"].item() == pytest.approx(3 / 5)
    lr = [math.log(r) for r in (1.5, 0.5, 1.1, 0.7, 1.3)]
    assert stats["approx_kl"].item() == pytest.approx(sum(0.5 * v * v for v in lr) / 5, abs=1e-6)
    assert stats["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 1.1 + 0.7 + 1.3) / 5, abs=1e-6)
    assert stats["ratio_max"].item() == pytest.approx(1.5, abs=1e-6)

    loss1, _ = policy_loss(logp[:1], logp_old[:1], adv[:1], mask[:1], clip_eps=0.2)
    assert loss1.item() == pytest.approx(-2.6 / 3, abs=1e-6)


def test_policy_loss_ratio_one():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.1, 0.0]])
    adv = torch.tensor([[1.0, -2.0, 4.0], [3.0, 5.0, -7.0]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    logp_new = logp.clone().requires_grad_(True)
    loss, stats = policy_loss(logp_new, logp, adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-(1 + 1 / 3) / 2, abs=1e-6)    # -mean advantage: row means 1 and 1/3
    assert stats["clipfrac"].item() == 0 and stats["approx_kl"].item() == 0
    assert stats["ratio_mean"].item() == 1 and stats["ratio_max"].item() == 1
    loss.backward()
    # d loss / d logp_t = -A_t / (n_rows * len_row) at ratio 1
    torch.testing.assert_close(logp_new.grad, -adv / 6)


def test_value_loss_hand_computed():
    values_old = torch.zeros(2, 3)
    values = torch.tensor([[0.5, -0.1, 0.3], [0.5, 9.0, 9.0]])
    returns = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, stats = value_loss(values, values_old, returns, mask, clip=0.2)
    # row 0: max(0.25, 0.64)=0.64 (clipped larger), max(0.01, 0.01)=0.01, max(1.69, 1.44)=1.69
    # row 1: max(0.25, 0.04)=0.25
    row0, row1 = (0.64 + 0.01 + 1.69) / 3, 0.25
    assert loss.item() == pytest.approx(0.5 * (row0 + row1) / 2, abs=1e-6)
    assert stats["vf_clipfrac"].item() == pytest.approx(1 / 4)
    loss1, _ = value_loss(values[:1], values_old[:1], returns[:1], mask[:1], clip=0.2)
    assert loss1.item() == pytest.approx(0.39, abs=1e-6)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    values = torch.tensor([[1.5, 2.0, 2.5], [4.0, -50.0, 0.0]])
    r, v = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.5, 2.0, 2.5, 4.0])
    assert explained_variance(values, returns, mask) == pytest.approx(1 - np.var(r - v) / np.var(r), abs=1e-6)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- distributed whiten

def _whiten_worker(rank, world_size, init_file, xs, masks, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        out = masked_whiten(xs[rank], masks[rank])
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_masked_whiten_across_two_processes(tmp_path):
    # Different local data (and different amounts of padding) on the two ranks.
    xs = [torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]]),
          torch.tensor([[10.0, -4.0, 6.0], [7.0, 8.0, 0.0]])]
    masks = [torch.tensor([[1, 1, 0], [1, 0, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])]
    # fork, not spawn: a spawned child re-imports torch (3-6 s each on a busy 2-core CI box) while a
    # forked one starts at once. Safe here: CPU only, no CUDA initialised, tiny single-thread tensors.
    mp.start_processes(_whiten_worker, args=(2, str(tmp_path / "init"), xs, masks, str(tmp_path)),
                       nprocs=2, start_method="fork")
    everything = np.concatenate([x[m.bool()].numpy() for x, m in zip(xs, masks)])
    mean, std = everything.mean(), np.sqrt(everything.var() + 1e-8)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        want = torch.where(masks[rank].bool(), (xs[rank] - mean) / std, 0.0)
        torch.testing.assert_close(out, want.float())
        # and it is not the local whitening
        assert not torch.allclose(out, masked_whiten(xs[rank], masks[rank]))


# ----------------------------------------------------------------------------- critic-free estimators
# Rows [g*k, (g+1)*k) are the k responses to one prompt. Each estimator against a per-example Python loop.

K = 4
LENGTHS = [5, 2, 7, 1, 3, 7, 4, 6]  # two groups of 4, uneven lengths


def random_rollout(seed=0, T=7):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(len(LENGTHS), T, generator=g)
    mask = torch.tensor([[t < L for t in range(T)] for L in LENGTHS])
    rewards[~mask] = float("nan")  # padding must never leak
    return rewards, mask


def naive_rtg(row, L, gamma):
    """[sum_{t' >= t} gamma^(t'-t) r_t' for t < L] + zeros, with plain floats."""
    out = [0.0] * len(row)
    for t in range(L):
        out[t] = sum(gamma ** (u - t) * row[u] for u in range(t, L))
    return out


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reward_to_go_vs_loop(gamma):
    rewards, mask = random_rollout()
    out = reward_to_go(rewards, mask, gamma)
    for b, L in enumerate(LENGTHS):
        torch.testing.assert_close(out[b], torch.tensor(naive_rtg(rewards[b].tolist(), L, gamma)), atol=1e-5, rtol=0)


def test_rloo_vs_loop_and_by_hand():
    rewards, mask = random_rollout(1)
    out = rloo(rewards, mask, K)
    returns = [sum(rewards[b, :L].tolist()) for b, L in enumerate(LENGTHS)]
    for b, L in enumerate(LENGTHS):
        group = range(b // K * K, b // K * K + K)
        baseline = sum(returns[j] for j in group if j != b) / (K - 1)
        want = [returns[b] - baseline if t < L else 0.0 for t in range(rewards.shape[1])]
        torch.testing.assert_close(out[b], torch.tensor(want), atol=1e-5, rtol=0)
    # by hand: returns 1, 2, 3, 6 -> baselines 11/3, 10/3, 3, 2 -> advantages -8/3, -4/3, 0, 4
    r = torch.tensor([[1.0], [2.0], [3.0], [6.0]])
    m = torch.ones(4, 1, dtype=torch.bool)
    torch.testing.assert_close(rloo(r, m, 4)[:, 0], torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0]))


def test_grpo_vs_numpy():
    rewards, mask = random_rollout(2)
    out = grpo(rewards, mask, K, eps=1e-4)
    returns = np.array([sum(rewards[b, :L].tolist()) for b, L in enumerate(LENGTHS)])
    for b, L in enumerate(LENGTHS):
        g = returns[b // K * K: b // K * K + K]
        want = (returns[b] - g.mean()) / (g.std(ddof=1) + 1e-4)
        assert out[b, :L].tolist() == pytest.approx([want] * L, abs=1e-5)
        assert (out[b, L:] == 0).all()
    # a group whose responses all earn the same return learns nothing from it (not 0 / 0)
    same = grpo(torch.ones(4, 3), torch.ones(4, 3, dtype=torch.bool), 4)
    assert torch.equal(same, torch.zeros(4, 3))


def test_rloo_token_vs_loop():
    rewards, mask = random_rollout(3)
    out = rloo_token(rewards, mask, K, gamma=0.95)
    rtg = [naive_rtg(rewards[b].tolist(), L, 0.95) for b, L in enumerate(LENGTHS)]
    for b, L in enumerate(LENGTHS):
        group = [j for j in range(b // K * K, b // K * K + K) if j != b]
        want = [rtg[b][t] - sum(rtg[j][t] for j in group) / (K - 1) if t < L else 0.0
                for t in range(rewards.shape[1])]
        torch.testing.assert_close(out[b], torch.tensor(want), atol=1e-5, rtol=0)
    # at the first token it is RLOO exactly (gamma 1)
    torch.testing.assert_close(rloo_token(rewards, mask, K)[:, 0], rloo(rewards, mask, K)[:, 0], atol=1e-5, rtol=0)


def test_group_estimators_refuse_bad_groups():
    rewards, mask = random_rollout()
    for fn in (rloo, grpo, rloo_token):
        with pytest.raises(ValueError, match="k >= 2"):
            fn(rewards, mask, 1)
        with pytest.raises(ValueError, match="divisible"):
            fn(rewards, mask, 3)  # 8 rows are not groups of 3


# ----------------------------------------------------------------------------- the estimator table, entry by entry
# Every row of ppo.ESTIMATORS through its table function, against a computation of its own written out here with
# plain floats, row by row. A fork that adds an estimator adds its slow version to NAIVE.


def naive_gae(r, v, L, gamma, lam, group):
    delta = [r[t] + gamma * (v[t + 1] if t + 1 < L else 0.0) - v[t] for t in range(L)]
    return [sum((gamma * lam) ** j * delta[t + j] for j in range(L - t)) for t in range(L)]


def naive_group(r, v, L, gamma, lam, group, kind):
    """group: [(rewards, length) of the other responses to the same prompt]."""
    ret = sum(gamma ** t * r[t] for t in range(L))
    others = [sum(gamma ** t * rr[t] for t in range(LL)) for rr, LL in group]
    if kind == "rloo":
        return [ret - sum(others) / len(others)] * L
    everyone = others + [ret]
    mean = sum(everyone) / len(everyone)
    std = math.sqrt(sum((x - mean) ** 2 for x in everyone) / (len(everyone) - 1))
    return [(ret - mean) / (std + 1e-4)] * L


NAIVE = {
    "gae": naive_gae,
    "rloo": lambda r, v, L, g, lam, group: naive_group(r, v, L, g, lam, group, "rloo"),
    "grpo": lambda r, v, L, g, lam, group: naive_group(r, v, L, g, lam, group, "grpo"),
    "rloo-token": lambda r, v, L, g, lam, group: [
        naive_rtg(r, L, g)[t] - sum(naive_rtg(rr, LL, g)[t] for rr, LL in group) / len(group) for t in range(L)],
    "reinforce": lambda r, v, L, g, lam, group: naive_rtg(r, L, g)[:L],  # no baseline at all
    "reinforce++": lambda r, v, L, g, lam, group: naive_rtg(r, L, g)[:L],  # its baseline is the batch whitening
}


@pytest.mark.parametrize("name", list(__import__("ppo").ESTIMATORS))
def test_every_estimator_entry_against_its_slow_version(name):
    from ppo import ESTIMATORS

    assert name in NAIVE, (f"ppo.ESTIMATORS has {name!r}, but tests/test_ppo.py has no slow version of it: add "
                           f"NAIVE[{name!r}] = a plain-float computation of its advantages, row by row")
    est = ESTIMATORS[name]
    rewards, mask = random_rollout(4)
    values = torch.randn(rewards.shape, generator=torch.Generator().manual_seed(5))
    hp = {"k": K, "gamma": 0.9, "lam": 0.8, "grpo_eps": 1e-4}
    adv, returns = est.fn(rewards, mask, values, hp)
    assert (returns is not None) == est.critic  # a critic regresses on returns; no critic, no returns
    for b, L in enumerate(LENGTHS):
        members = range(b // K * K, b // K * K + K)
        group = [(rewards[j].tolist(), LENGTHS[j]) for j in members if j != b] if est.groups else []
        want = NAIVE[name](rewards[b].tolist(), values[b].tolist(), L, hp["gamma"], hp["lam"], group)
        assert adv[b, :L].tolist() == pytest.approx(want, abs=1e-5), (name, b)
        assert (adv[b, L:] == 0).all()
