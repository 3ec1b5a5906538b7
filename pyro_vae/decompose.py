"""The ELBO decomposed over a whole split (``pyro-vae evaluate --decompose``).

For every datapoint ``x_i`` of the split one ``z_i ~ q(z | x_i)`` is drawn and

    ELBO_i = log p(x_i | z_i) - [MI_i + TC_i + dwKL_i]

with the three KL terms of :mod:`pyro_vae.aggregate`, ``log q(z_i)`` and
``log q(z_id)`` computed against the aggregate posterior of *the whole split*
(``r_ij = 1/N`` over all N datapoints, in blocks so memory stays
``block x block x D``), not a minibatch.  Reported: each term's mean over the
split with its standard error (the spread over datapoints / sqrt N: the Monte
Carlo error of the ``z_i``; the sums over the split inside ``log q(z_i)`` are
exact for the split's own aggregate), the average KL (their sum), the number
of active units (``Cov_x E_q[z_u | x] > 0.01``, Burda et al. 2015), and the
per-dimension variance of the codes.

The index-code MI of an aggregate over N datapoints cannot exceed ``log N``
(``q(z_i) >= q(z_i | x_i) / N``): once the posteriors of different
datapoints barely overlap, MI sits at ``log N`` and the rest of the KL shows
up as total correlation.  A larger split raises the ceiling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pyro
import torch
from tqdm.auto import tqdm

from pyro_vae.aggregate import aggregate_log_densities, kl_terms, pairwise_log_density, single_factorised_latent, \
    uniform_log_weights
from pyro_vae.traces import draw_particles, max_plate_nesting

ACTIVE_UNIT_THRESHOLD = 0.01


@dataclass
class Decomposition:
    """Per-datapoint terms (``[N]`` arrays) and the guide's means ``[N, D]``."""

    terms: dict[str, np.ndarray]
    codes: np.ndarray

    def active_units(self) -> int:
        return int((self.codes.var(0) > ACTIVE_UNIT_THRESHOLD).sum())

    def summary(self) -> dict:
        n = len(self.codes)
        out = {name: {"mean": float(v.mean()), "se": float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else None}
               for name, v in self.terms.items()}
        out["active_units"] = self.active_units()
        out["code_variance"] = [round(float(v), 4) for v in self.codes.var(0)]
        return out


@torch.no_grad()
def decompose(model: Callable, guide: Callable, batches: Sequence[torch.Tensor], progress: bool = True) -> Decomposition:
    """Reconstruction, index-code MI, total correlation and dimension-wise KL
    of every datapoint of ``batches`` (one split), against the split's
    aggregate posterior (see the module docstring)."""
    nesting, stored = None, []
    for x in tqdm(batches, desc="decompose: sample", disable=not progress, leave=False):
        if nesting is None:
            nesting = max_plate_nesting(model, guide, x)
        with pyro.validation_enabled(False):
            particles = draw_particles(model, guide, x, 1, nesting)
        site, base = single_factorised_latent(particles.guide_trace, "--decompose")
        stored.append({
            "z": site["value"].reshape(x.shape[0], -1),
            "base": base,
            "code": base.mean.reshape(x.shape[0], -1),
            "log_likelihood": particles.log_likelihood()[0],
            "log_pz": particles.log_prior()[0],
            "log_q": particles.log_guide()[0],
        })
    total = sum(len(s["z"]) for s in stored)
    if total == 0:
        raise ValueError("nothing to decompose: the split is empty")
    columns: dict[str, list] = {"reconstruction": [], "mutual_information": [], "total_correlation": [],
                                "dimensionwise_kl": []}
    for rows in tqdm(stored, desc="decompose: aggregate", disable=not progress, leave=False):
        joint, dims = [], []
        for block in stored:
            log_pairs = pairwise_log_density(block["base"], rows["z"])  # [Bi, Bj, D]
            weights = uniform_log_weights(len(rows["z"]), len(block["z"]), total, rows["z"].device)
            log_qz, _ = aggregate_log_densities(log_pairs, weights)
            joint.append(log_qz)
            dims.append(torch.logsumexp(weights.unsqueeze(-1) + log_pairs, dim=1))  # [Bi, D]
        log_qz = torch.logsumexp(torch.stack(joint), dim=0)
        log_qz_dims = torch.logsumexp(torch.stack(dims), dim=0).sum(-1)
        terms = kl_terms(rows["log_q"], log_qz, log_qz_dims, rows["log_pz"])
        columns["reconstruction"].append(rows["log_likelihood"])
        for name, value in terms.items():
            columns[name].append(value)
    arrays = {name: torch.cat(values).double().cpu().numpy() for name, values in columns.items()}
    arrays["kl"] = arrays["mutual_information"] + arrays["total_correlation"] + arrays["dimensionwise_kl"]
    arrays["elbo"] = arrays["reconstruction"] - arrays["kl"]
    codes = torch.cat([s["code"] for s in stored]).double().cpu().numpy()
    return Decomposition(arrays, codes)
