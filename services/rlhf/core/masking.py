"""Masked statistics over (B, T) tensors and the response mask of generated ids.

Every function takes a ``mask`` broadcastable to ``values`` whose nonzero entries mark the positions that count;
masked positions contribute nothing to a sum, a mean or a variance, and receive exactly zero gradient.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "response_mask",
    "last_token_index",
]


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is set.  values, mask: (B, T) -> () or, with ``dim``, that dim reduced."""
    # torch.where, not values * mask: a NaN or inf at a masked position must not leak into the sum or its gradient.
    masked = torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Mean of ``values`` over the set positions of ``mask``.  (B, T) -> () or, with ``dim``, that dim reduced.

    A row (or batch) with no set position has mean 0, not NaN: an empty response must not poison a loss.
    """
    count = mask.to(values.dtype).sum() if dim is None else mask.to(values.dtype).sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` over the set positions of ``mask``.  (B, T) -> ().

    With ``unbiased`` the population variance is multiplied by n / (n - 1) (Bessel's correction), n the number of
    set positions; that needs n >= 2.
    """
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.to(values.dtype).sum()
        if n < 2:
            raise ValueError(
                f"masked_var(unbiased=True) needs at least 2 unmasked values, got {int(n)}; "
                "use a larger batch or unbiased=False"
            )
        variance = variance * n / (n - 1)
    return variance


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise ``values`` to unit variance (and zero mean with ``shift_mean``) over the set positions.

    values, mask: (B, T) -> (B, T), zero at masked positions.  Statistics are computed over the whole batch, not per
    row; with ``shift_mean=False`` the mean is kept (used for rewards, whose sign matters).
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask, unbiased=True)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros((), dtype=values.dtype, device=values.device))


def response_mask(
    response_ids: torch.Tensor, eos_token_id: int | Iterable[int] | None, pad_token_id: int | None
) -> torch.Tensor:
    """The mask of the tokens that belong to each generated response.

    response_ids: (B, T) generated ids (no prompt).  Returns (B, T) bool, always a prefix mask: True up to and including
    the first EOS of a row and False after it.  A pad token (one that is not also an EOS id) ends the response too and
    is itself masked, so padding never counts.
    """
    if eos_token_id is None:
        is_eos = torch.zeros_like(response_ids, dtype=torch.bool)
    else:
        eos_ids = torch.as_tensor(
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=response_ids.device
        )
        is_eos = torch.isin(response_ids, eos_ids)
    # (B, T) number of EOS strictly before each position; > 0 means the response already ended.
    eos_before = is_eos.long().cumsum(dim=1) - is_eos.long()
    mask = eos_before == 0
    if pad_token_id is not None:
        is_pad = (response_ids == pad_token_id) & ~is_eos
        mask = mask & (is_pad.long().cumsum(dim=1) == 0)
    return mask


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) prefix mask -> (B,) index of its last set position (0 for an empty row)."""
    return (mask.long().sum(dim=1) - 1).clamp(min=0)
