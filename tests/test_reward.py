"""reward.py against naive loops and closed forms."""

import math

import pytest
import torch

from reward import bt_loss, gather_last, last_token_index, normalize_score


def naive_last(row):
    last = None
    for t, v in enumerate(row):
        if v:
            last = t
    return last


MASKS = {
    "left": [[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]],
    "right": [[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]],
    "both": [[0, 0, 1, 1, 0], [0, 1, 1, 1, 0]],           # [left-padded prompt | right-padded response]
    "full": [[1, 1, 1, 1, 1], [0, 0, 0, 0, 1]],
}


@pytest.mark.parametrize("layout", list(MASKS))
def test_last_token_index_vs_naive(layout):
    rows = MASKS[layout]
    for mask in (torch.tensor(rows), torch.tensor(rows).bool()):
        idx = last_token_index(mask)
        assert idx.dtype == torch.long
        assert idx.tolist() == [naive_last(r) for r in rows]


def test_gather_last():
    x = torch.arange(10.0).reshape(2, 5) * 10
    mask = torch.tensor(MASKS["both"][0:1] + MASKS["left"][0:1])   # rows end at 3 and 4
    torch.testing.assert_close(gather_last(x, mask), torch.tensor([30.0, 90.0]))


def test_all_zero_row_raises():
    with pytest.raises(ValueError, match="1"):
        last_token_index(torch.tensor([[1, 1, 0], [0, 0, 0]]))


def test_bt_loss_closed_form():
    rc = torch.tensor([1.0, 0.0, -2.0])
    rr = torch.tensor([0.0, 0.5, -4.0])
    loss, m = bt_loss(rc, rr)
    diffs = [1.0, -0.5, 2.0]
    want = sum(math.log(1 + math.exp(-d)) for d in diffs) / 3      # -log sigmoid(d)
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert m["accuracy"].item() == pytest.approx(2 / 3)
    assert m["margin"].item() == pytest.approx(2.5 / 3, abs=1e-6)
    loss0, m0 = bt_loss(rc, rc)
    assert loss0.item() == pytest.approx(math.log(2)) and m0["accuracy"].item() == 0


def test_normalize_score():
    score = torch.tensor([0.0, 3.0, 100.0, -100.0, 2.0])
    out = normalize_score(score, mean=1.0, std=2.0, clip=10.0)
    torch.testing.assert_close(out, torch.tensor([-0.5, 1.0, 10.0, -10.0, 0.5]))
    torch.testing.assert_close(normalize_score(score, 0.0, 1.0, 2.5), torch.tensor([0.0, 2.5, 2.5, -2.5, 2.0]))
    for clip in (0.0, -1.0):
        with pytest.raises(ValueError):
            normalize_score(score, 0.0, 1.0, clip)
    with pytest.raises(ValueError):
        normalize_score(score, 0.0, 0.0, 10.0)
