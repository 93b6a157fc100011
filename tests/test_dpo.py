"""dpo.py against closed forms computed with math.log / math.exp."""

import math

import pytest
import torch

from dpo import dpo_loss, sequence_logps


def neg_logsigmoid(x):
    return -math.log(1.0 / (1.0 + math.exp(-x)))


# Hand-made summed log-probs for 3 pairs.
POL_C = torch.tensor([-10.0, -20.0, -5.0])
POL_R = torch.tensor([-12.0, -18.0, -5.0])
REF_C = torch.tensor([-11.0, -19.0, -6.0])
REF_R = torch.tensor([-11.0, -19.0, -4.0])
# h = (pc - rc) - (pr - rr):  (1 - (-1)) = 2,  (-1 - 1) = -2,  (1 - (-1)) = 2
H = [2.0, -2.0, 2.0]


def test_sigmoid_closed_form():
    beta = 0.1
    loss, m = dpo_loss(POL_C, POL_R, REF_C, REF_R, beta)
    assert loss.item() == pytest.approx(sum(neg_logsigmoid(beta * h) for h in H) / 3, abs=1e-6)
    # implicit rewards: chosen beta*(1, -1, 1), rejected beta*(-1, 1, -1)
    assert m["chosen_reward"].item() == pytest.approx(0.1 / 3, abs=1e-6)
    assert m["rejected_reward"].item() == pytest.approx(-0.1 / 3, abs=1e-6)
    assert m["accuracy"].item() == pytest.approx(2 / 3)
    assert m["margin"].item() == pytest.approx(0.1 * 2 / 3, abs=1e-6)
    assert all(not v.requires_grad for v in m.values())


def test_policy_equals_reference_gives_log2():
    x = torch.tensor([-3.0, -7.5])
    y = torch.tensor([-4.0, -1.0])
    loss, m = dpo_loss(x, y, x.clone(), y.clone(), beta=0.5)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert m["chosen_reward"].item() == 0 and m["rejected_reward"].item() == 0
    assert m["accuracy"].item() == 0                       # strict >: a tie is not a win
    assert m["margin"].item() == 0


def test_cdpo_label_smoothing():
    beta, ls = 0.2, 0.1
    loss, _ = dpo_loss(POL_C, POL_R, REF_C, REF_R, beta, label_smoothing=ls)
    want = sum((1 - ls) * neg_logsigmoid(beta * h) + ls * neg_logsigmoid(-beta * h) for h in H) / 3
    assert loss.item() == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError):
        dpo_loss(POL_C, POL_R, REF_C, REF_R, beta, label_smoothing=0.5)


def test_ipo():
    beta = 0.25                                            # target 1/(2 beta) = 2
    loss, _ = dpo_loss(POL_C, POL_R, REF_C, REF_R, beta, loss_type="ipo")
    assert loss.item() == pytest.approx(((2 - 2) ** 2 + (-2 - 2) ** 2 + (2 - 2) ** 2) / 3, abs=1e-6)
    with pytest.raises(ValueError):
        dpo_loss(POL_C, POL_R, REF_C, REF_R, beta, label_smoothing=0.1, loss_type="ipo")


def test_bad_arguments():
    with pytest.raises(ValueError):
        dpo_loss(POL_C, POL_R, REF_C, REF_R, 0.1, loss_type="hinge")
    with pytest.raises(ValueError):
        dpo_loss(POL_C, POL_R, REF_C, REF_R, 0.0)


def test_gradient_direction():
    pol_c = torch.tensor([-5.0], requires_grad=True)
    pol_r = torch.tensor([-5.0], requires_grad=True)
    loss, _ = dpo_loss(pol_c, pol_r, torch.tensor([-5.0]), torch.tensor([-5.0]), beta=0.1)
    loss.backward()
    # at h = 0: d/dh -logsigmoid(beta h) = -beta/2: raise chosen, lower rejected
    assert pol_c.grad.item() == pytest.approx(-0.05) and pol_r.grad.item() == pytest.approx(0.05)


def test_sequence_logps_with_padding():
    logp = torch.tensor([[-1.0, -2.0, -3.0, 99.0], [-0.5, 42.0, float("nan"), 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    torch.testing.assert_close(sequence_logps(logp, mask), torch.tensor([-6.0, -0.5]))
    torch.testing.assert_close(sequence_logps(logp, mask.bool()), torch.tensor([-6.0, -0.5]))


# ----------------------------------------------------------------------------------------------------------
# R-DPO, SimPO, TDPO: each against a per-example computation with math.*, a hand-computed value, and (SimPO) TRL.

import json  # noqa: E402
from pathlib import Path  # noqa: E402

from dpo import LOSSES, preference_loss, rdpo_loss, sequential_kl, simpo_loss, tdpo_loss  # noqa: E402
from ppo import logprobs_from_logits  # noqa: E402

LEN_C = torch.tensor([4, 10, 2])
LEN_R = torch.tensor([6, 3, 2])


def test_rdpo_per_example_and_by_hand():
    beta, alpha = 0.1, 0.05
    loss, m = rdpo_loss(POL_C, POL_R, REF_C, REF_R, LEN_C, LEN_R, beta, alpha)
    want = [neg_logsigmoid(beta * h + alpha * (lc - lr)) for h, lc, lr in zip(H, LEN_C.tolist(), LEN_R.tolist())]
    assert loss.item() == pytest.approx(sum(want) / 3, abs=1e-6)
    # by hand, pair 1: h = -2, |y_w| - |y_l| = 7: -log sigmoid(-0.2 + 0.35) = -log sigmoid(0.15)
    assert want[1] == pytest.approx(math.log(1 + math.exp(-0.15)), abs=1e-12)
    # alpha 0 is DPO exactly
    assert rdpo_loss(POL_C, POL_R, REF_C, REF_R, LEN_C, LEN_R, beta, 0.0)[0].item() == pytest.approx(
        dpo_loss(POL_C, POL_R, REF_C, REF_R, beta)[0].item(), abs=1e-7)
    assert m["accuracy"].item() == pytest.approx(2 / 3)  # its reward is DPO's: the length term is not the policy's


def test_simpo_per_example_and_by_hand():
    beta, gamma = 2.0, 1.0
    loss, m = simpo_loss(POL_C, POL_R, LEN_C, LEN_R, beta, gamma)
    want = [neg_logsigmoid(beta * pc / lc - beta * pr / lr - gamma)
            for pc, pr, lc, lr in zip(POL_C.tolist(), POL_R.tolist(), LEN_C.tolist(), LEN_R.tolist())]
    assert loss.item() == pytest.approx(sum(want) / 3, abs=1e-6)
    # by hand, pair 0: 2 * -10/4 - 2 * -12/6 - 1 = -5 + 4 - 1 = -2
    assert want[0] == pytest.approx(math.log(1 + math.exp(2.0)), abs=1e-12)
    assert m["chosen_reward"].item() == pytest.approx((2 * -10 / 4 + 2 * -20 / 10 + 2 * -5 / 2) / 3, abs=1e-6)


def test_simpo_equals_trl():
    """TRL's CPOTrainer (loss_type "simpo") on the same logits: tests/fixtures/make_trl_fixture.py."""
    fx = json.loads((Path(__file__).parent / "fixtures" / "trl_simpo.json").read_text())
    logits, labels = torch.tensor(fx["logits"]), torch.tensor(fx["labels"])
    shifted, mask = labels[:, 1:], labels[:, 1:] != -100  # the token at column t is predicted at column t - 1
    logp = logprobs_from_logits(logits[:, :-1], shifted.clamp(min=0))
    summed, lengths = sequence_logps(logp, mask), mask.sum(-1)
    B = len(fx["losses"])
    loss, _ = simpo_loss(summed[:B], summed[B:], lengths[:B], lengths[B:], fx["beta"], fx["gamma"])
    torch.testing.assert_close(summed / lengths, torch.tensor(fx["avg_logps"]), atol=1e-6, rtol=0)
    assert loss.item() == pytest.approx(sum(fx["losses"]) / B, abs=1e-6)
    per = [simpo_loss(summed[i:i + 1], summed[B + i:B + i + 1], lengths[i:i + 1], lengths[B + i:B + i + 1],
                      fx["beta"], fx["gamma"])[0].item() for i in range(B)]
    assert per == pytest.approx(fx["losses"], abs=1e-6)


def naive_kl(logits_ref, logits_pol, mask):
    """sum over valid positions t and every vocabulary entry v of p_ref(v) * (log p_ref(v) - log p(v)), with math."""
    out = []
    for b in range(logits_ref.shape[0]):
        total = 0.0
        for t in range(logits_ref.shape[1]):
            if not mask[b, t]:
                continue
            lr, lp = logits_ref[b, t].tolist(), logits_pol[b, t].tolist()
            zr, zp = math.log(sum(math.exp(v) for v in lr)), math.log(sum(math.exp(v) for v in lp))
            total += sum(math.exp(a - zr) * ((a - zr) - (c - zp)) for a, c in zip(lr, lp))
        out.append(total)
    return out


def test_sequential_kl_vs_vocabulary_loop():
    g = torch.Generator().manual_seed(3)
    ref, pol = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).bool()
    ref[~mask] = float("nan")  # padding never leaks
    out = sequential_kl(ref, pol, mask)
    assert out.tolist() == pytest.approx(naive_kl(torch.nan_to_num(ref), pol, mask), abs=1e-5)
    assert (sequential_kl(pol, pol, mask) == 0).all()  # KL of a distribution with itself


def test_tdpo_per_example_and_stop_gradient():
    beta, alpha = 0.1, 0.5
    kl_c, kl_r = torch.tensor([0.5, 1.0, 0.0]), torch.tensor([2.0, 0.25, 0.5])
    l1, _ = tdpo_loss(POL_C, POL_R, REF_C, REF_R, kl_c, kl_r, beta, alpha, variant=1)
    l2, m2 = tdpo_loss(POL_C, POL_R, REF_C, REF_R, kl_c, kl_r, beta, alpha, variant=2)
    kc, kr = kl_c.tolist(), kl_r.tolist()
    assert l1.item() == pytest.approx(sum(neg_logsigmoid(beta * (h - (r - c))) for h, c, r in zip(H, kc, kr)) / 3,
                                      abs=1e-6)
    assert l2.item() == pytest.approx(
        sum(neg_logsigmoid(beta * (h - alpha * (r - c))) for h, c, r in zip(H, kc, kr)) / 3, abs=1e-6)
    # by hand, pair 0 of TDPO1: h - (2.0 - 0.5) = 0.5 -> -log sigmoid(0.05)
    assert neg_logsigmoid(beta * (H[0] - 1.5)) == pytest.approx(math.log(1 + math.exp(-0.05)), abs=1e-12)
    # TDPO2's stop-gradient: no gradient reaches the chosen response's KL, TDPO1 sends one
    for variant, grads in ((1, True), (2, False)):
        c, pol = kl_c.clone().requires_grad_(True), POL_C.clone().requires_grad_(True)
        tdpo_loss(pol, POL_R, REF_C, REF_R, c, kl_r, beta, alpha, variant)[0].backward()
        assert (c.grad is not None and bool((c.grad != 0).any())) == grads
    assert m2["chosen_reward"].item() == pytest.approx(beta * ((1 + 0.5) + (-1 + 1.0) + (1 + 0.0)) / 3, abs=1e-6)


# Every row of dpo.LOSSES through preference_loss, against its formula written out per pair with math.*, at
# hyper-parameters where each term matters (lengths and KLs that differ between the two responses of a pair). A fork
# that adds a loss adds its per-pair formula here.
KL_C, KL_R = [0.5, 1.0, 0.0], [2.0, 0.25, 0.5]
HP = {"beta": 0.1, "label_smoothing": 0.0, "rdpo_alpha": 0.05, "simpo_gamma": 1.0, "tdpo_alpha": 0.5}
PER_PAIR = {
    "sigmoid": lambda i, hp: neg_logsigmoid(hp["beta"] * H[i]),
    "ipo": lambda i, hp: (H[i] - 1 / (2 * hp["beta"])) ** 2,
    "rdpo": lambda i, hp: neg_logsigmoid(hp["beta"] * H[i] + hp["rdpo_alpha"] * (LEN_C[i] - LEN_R[i]).item()),
    "simpo": lambda i, hp: neg_logsigmoid(hp["beta"] * POL_C[i].item() / LEN_C[i].item()
                                          - hp["beta"] * POL_R[i].item() / LEN_R[i].item() - hp["simpo_gamma"]),
    "tdpo1": lambda i, hp: neg_logsigmoid(hp["beta"] * (H[i] - (KL_R[i] - KL_C[i]))),
    "tdpo2": lambda i, hp: neg_logsigmoid(hp["beta"] * (H[i] - hp["tdpo_alpha"] * (KL_R[i] - KL_C[i]))),
}


@pytest.mark.parametrize("loss_type", list(LOSSES))
def test_every_loss_entry_against_its_formula(loss_type):
    assert loss_type in PER_PAIR, (f"dpo.LOSSES has {loss_type!r}, but tests/test_dpo.py has no formula for it: add "
                                   f"PER_PAIR[{loss_type!r}] = its loss for pair i written with math.*")
    x = {"pol_chosen": POL_C, "pol_rejected": POL_R, "ref_chosen": REF_C, "ref_rejected": REF_R,
         "len_chosen": LEN_C, "len_rejected": LEN_R, "kl_chosen": torch.tensor(KL_C), "kl_rejected": torch.tensor(KL_R)}
    need = LOSSES[loss_type]
    x = {k: v for k, v in x.items() if not ((k.startswith("ref") and not need.ref) or (k.startswith("kl") and not need.kl))}
    loss, m = preference_loss(loss_type, x, HP)  # only the inputs its entry says it needs
    assert loss.item() == pytest.approx(sum(PER_PAIR[loss_type](i, HP) for i in range(3)) / 3, abs=1e-6)
    assert set(m) == {"chosen_reward", "rejected_reward", "accuracy", "margin"}


def test_preference_loss_refuses_what_it_does_not_read():
    x = {"pol_chosen": POL_C, "pol_rejected": POL_R, "len_chosen": LEN_C, "len_rejected": LEN_R}
    with pytest.raises(ValueError, match="label_smoothing applies to loss_type='sigmoid' only"):
        preference_loss("simpo", x, {**HP, "label_smoothing": 0.1})
    with pytest.raises(ValueError, match="unknown loss_type 'hinge'"):
        preference_loss("hinge", x, HP)
