"""The PSIS shape estimate k-hat of many datapoints at once.

For one datapoint's ``K`` log importance weights ``x`` (shifted so their
maximum is 0), Pareto-smoothed importance sampling (Vehtari et al., 2024)
fits a generalised Pareto distribution to the ``M = ceil(min(K/5, 3 sqrt K))``
largest weights above the next one, ``u = exp(x_(M+1))``: the excesses
``y_1 <= .. <= y_M``, ``y = exp(x) - u``.  Zhang and Stephens' (2009)
empirical-Bayes fit, as arviz's ``_gpdfit`` computes it:

    b_j = (1 - sqrt(m / (j - 1/2))) / (3 y_(round(M/4))) + 1 / y_M,   j = 1..m,  m = 30 + floor(sqrt M)
    k(b) = mean_i log(1 - b y_i)
    l_j = M (log(-b_j / k(b_j)) - k(b_j) - 1)                         (profile log-likelihood)
    w_j = 1 / sum_j' exp(l_j' - l_j),  dropped below 10 eps, normalised
    k-hat = (M k(sum_j w_j b_j) + 10 / 2) / (M + 10)                  (a weak prior on k)

arviz's :func:`~arviz.psislw` loops over datapoints in Python (0.65 ms a
datapoint at K=5000 on this project's CPU, also smoothing the weights,
which the evaluator does not use): about 5 s of the 11 s K=5000 evaluation
of the 10k MNIST test images on an H100 (5.7-6.0 s with this function).
:func:`pareto_khat` computes the same k-hat for a whole batch in a few
tensor operations on the weights' device, in float64, and hands the rows
this form does not cover (ties at the cutoff, weights below the smallest
double, a fit with no weight left) to arviz itself.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

LOG_TINY = math.log(np.finfo(float).tiny)  # arviz's floor for the tail's cutoff
PRIOR_K, PRIOR_B = 10, 3  # Zhang and Stephens' prior weights, as arviz sets them
ROWS_AT_ONCE = 1000  # datapoints fitted together: ~75 MB of float64 at K=5000 (m = 44 candidates x M = 213)


def tail_size(num_samples: int) -> int:
    """``M``, the number of largest weights the Pareto tail is fitted to (``reff = 1``)."""
    return int(math.ceil(min(num_samples / 5.0, 3 * math.sqrt(num_samples))))


def pareto_khat(log_w: torch.Tensor) -> np.ndarray:
    """k-hat per datapoint of ``log_w`` ``[K, B]`` -> ``[B]``, equal to
    arviz's ``psislw(log_w.T)[1]`` to float64 rounding (tested): ``inf``
    where the tail has 4 weights or fewer (``K <= 20``), as arviz gives."""
    rows = log_w.detach().T.double()
    num_samples = rows.shape[1]
    m_tail = tail_size(num_samples)
    if m_tail <= 4:
        return np.full(rows.shape[0], np.inf)
    top = rows.topk(m_tail + 1, dim=1).values  # descending
    top = top - top[:, :1]
    cutoff = top[:, m_tail].clamp(min=LOG_TINY)
    tail = top[:, :m_tail].flip(1)  # the M largest, ascending
    regular = (tail > cutoff[:, None]).all(1)  # exactly M weights above the cutoff: no ties, no underflow
    excess = torch.exp(tail) - torch.exp(cutoff)[:, None]
    fits = [_gpd_shape(part) for part in excess.split(ROWS_AT_ONCE)]  # [rows, m, M] float64 a part
    khat, kept_any = torch.cat([k for k, _ in fits]), torch.cat([kept for _, kept in fits])
    redo = ~(regular & kept_any & torch.isfinite(khat))
    khat, redo_rows = khat.cpu().numpy(), redo.cpu().numpy()
    if redo_rows.any():
        khat[redo_rows] = _arviz_khat(rows[redo].cpu().numpy())
    return khat


def _gpd_shape(excess: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zhang and Stephens' k-hat of each row of ``excess`` ``[B, M]``
    (ascending, positive), and whether any of the ``m`` candidate ``b``
    kept a weight (else the estimate is undefined here)."""
    n = excess.shape[1]
    m = 30 + int(n**0.5)
    j = torch.arange(1, m + 1, dtype=excess.dtype, device=excess.device)
    b = (1 - torch.sqrt(m / (j - 0.5)))[None, :] / (PRIOR_B * excess[:, int(n / 4 + 0.5) - 1, None]) \
        + 1 / excess[:, -1:]
    k = torch.log1p(-b[:, :, None] * excess[:, None, :]).mean(-1)
    profile = n * (torch.log(-(b / k)) - k - 1)
    weights = 1 / torch.exp(profile[:, None, :] - profile[:, :, None]).sum(-1)
    weights = torch.where(weights >= 10 * torch.finfo(excess.dtype).eps, weights, 0.0)
    total = weights.sum(-1, keepdim=True)
    b_post = (b * (weights / total)).sum(-1)
    k_post = torch.log1p(-b_post[:, None] * excess).mean(-1)
    return (n * k_post + PRIOR_K * 0.5) / (n + PRIOR_K), total[:, 0] > 0


def _arviz_khat(rows: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        # arviz warns on import (its refactor notice) and on large k; we report k itself
        warnings.simplefilter("ignore")
        import arviz

        return np.asarray(arviz.psislw(rows)[1], dtype=np.float64)
