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
