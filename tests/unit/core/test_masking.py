"""Masked statistics and the response mask: values, edge cases, and that masked positions get no gradient."""
from __future__ import annotations

import math

import pytest
import torch

from rlhf.core.masking import (
    last_token_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    response_mask,
)

VALUES = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, -60.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def test_masked_sum_and_mean_by_hand():
    assert masked_sum(VALUES, MASK).item() == 15.0
    assert masked_mean(VALUES, MASK).item() == 3.0
    assert masked_mean(VALUES, MASK, dim=1).tolist() == [2.0, 4.5]


def test_masked_mean_of_an_empty_row_is_zero_not_nan():
    assert masked_mean(VALUES, torch.zeros_like(MASK), dim=1).tolist() == [0.0, 0.0]


def test_masked_var_is_bessel_corrected():
    selected = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert masked_var(VALUES, MASK).item() == pytest.approx(selected.var(unbiased=True).item())
    assert masked_var(VALUES, MASK, unbiased=False).item() == pytest.approx(selected.var(unbiased=False).item())
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(VALUES, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]))


def test_masked_whiten():
    torch.manual_seed(0)
    values = torch.randn(4, 7) * 3 + 2
    mask = torch.rand(4, 7) > 0.3
    white = masked_whiten(values, mask)
    assert masked_mean(white, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(white, mask).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.all(white[~mask] == 0)
    kept = masked_whiten(values, mask, shift_mean=False)
    assert masked_mean(kept, mask).item() == pytest.approx(masked_mean(values, mask).item(), abs=1e-5)


def test_nan_at_masked_positions_does_not_leak():
    values = VALUES.clone()
    values[0, 3] = float("nan")
    values[1, 3] = float("inf")
    assert math.isfinite(masked_mean(values, MASK).item())
    assert math.isfinite(masked_var(values, MASK).item())


def test_no_gradient_reaches_masked_positions():
    values = VALUES.clone().requires_grad_(True)
    (masked_mean(values, MASK) + masked_var(values, MASK) + masked_whiten(values, MASK).pow(2).sum()).backward()
    assert torch.all(values.grad[MASK == 0] == 0)
    assert torch.all(values.grad[MASK == 1] != 0)


EOS, PAD = 1, 0


@pytest.mark.parametrize(
    ("ids", "eos", "pad", "expected"),
    [
        # EOS in the middle: kept, everything after masked
        ([[5, 6, EOS, 7, 8]], EOS, PAD, [[1, 1, 1, 0, 0]]),
        # no EOS: padding (a distinct pad id) masked
        ([[5, 6, 7, PAD, PAD]], EOS, PAD, [[1, 1, 1, 0, 0]]),
        # pad == eos (GPT-2 style): the first one is the EOS, the rest padding
        ([[5, EOS, EOS, EOS, EOS]], EOS, EOS, [[1, 1, 0, 0, 0]]),
        # EOS as the very first token
        ([[EOS, 5, 6, 7, 8]], EOS, PAD, [[1, 0, 0, 0, 0]]),
        # several EOS ids, the first one of any counts
        ([[5, 9, 6, EOS, 7]], [EOS, 9], PAD, [[1, 1, 0, 0, 0]]),
        # no EOS id at all: only padding is masked
        ([[5, 6, PAD, PAD, PAD]], None, PAD, [[1, 1, 0, 0, 0]]),
        # a pad before the end stops the response there: the mask stays a prefix
        ([[5, PAD, 6, EOS, 7]], EOS, PAD, [[1, 0, 0, 0, 0]]),
    ],
)
def test_response_mask(ids, eos, pad, expected):
    mask = response_mask(torch.tensor(ids), eos, pad)
    assert mask.dtype == torch.bool
    assert mask.long().tolist() == expected


def test_last_token_index():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 0, 3]
