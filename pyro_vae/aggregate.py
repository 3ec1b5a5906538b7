"""The aggregate posterior and the decomposition of the ELBO's KL term.

With ``q(z) = (1/N) sum_n q(z | x_n)`` the aggregate posterior over N
datapoints, the KL term of the ELBO averaged over the data splits into three
(Hoffman & Johnson 2016; Chen et al. 2018)::

    E_x KL(q(z|x) || p(z)) = E_q(z,x)[log q(z|x) - log q(z)]                (index-code MI, I_q(x; z))
                           + E_q(z)[log q(z) - log prod_d q(z_d)]            (total correlation, TC)
                           + E_q(z)[log prod_d q(z_d) - log prod_d p(z_d)]   (dimension-wise KL)

For a sample ``z_i ~ q(z | x_i)`` every term is a difference of log-densities
at ``z_i``; the three telescope to ``log q(z_i|x_i) - log p(z_i)``, the
one-sample KL estimate, whatever estimate of ``log q(z_i)`` is used.
``log q(z_i)`` and ``log q(z_id)`` are mixtures over datapoints::

    log q(z_i)    ~= logsumexp_j [log r_ij + log q(z_i | x_j)]
    log q(z_id)   ~= logsumexp_j [log r_ij + log q(z_id | x_j)]

with mixture weights ``r_ij`` (each row summing to one):

- over a whole split, ``r_ij = 1/N`` (:func:`uniform_log_weights`);
- over a minibatch of M out of N training points, *minibatch weighted
  sampling* (MWS), ``r_ij = 1/M`` (:func:`mws_log_weights`), and *minibatch
  stratified sampling* (MSS), ``r_ii = 1/N`` for ``z_i``'s own datapoint,
  one stratum weight ``(N - M') / (N M')`` and ``1/M'`` elsewhere,
  ``M' = M - 1`` (:func:`mss_log_weights`; Chen et al. 2018, appendix C).
  Their code sets these weights through flat-index strides that put ``1/N``
  in column 0 rather than on the diagonal, and leave one row summing to
  more than one; here every row is a mixture (tested).

Chen et al. print MWS with ``1/(NM)``: that shifts ``log q(z)`` by ``-log N``
and ``sum_d log q(z_d)`` by ``-D log N``, constants that leave the gradients
alone but put every reported term off by multiples of ``log N``; ``1/M`` is
the weighting that converges to the aggregate as the batch grows (tested on
a Gaussian aggregate whose TC is known in closed form).
"""
from __future__ import annotations

import math

import torch
from torch.distributions import Distribution, Independent

from pyro_vae.errors import ConfigError


def factorised(site: dict) -> Distribution:
    """The per-dimension distribution of a latent site whose density factorises
    over its last dimension: ``Independent(base, 1)`` -> ``base`` (batch
    ``[..., B, D]``)."""
    fn = site["fn"]
    if isinstance(fn, Independent) and fn.reinterpreted_batch_ndims == 1:
        return fn.base_dist
    raise ConfigError(f"the decomposition of the KL needs a guide that factorises over the dimensions of its "
                      f"latent site {site['name']!r} (an Independent(..., 1) such as the `normal` guide's); it has "
                      f"{type(fn).__name__}")


def single_factorised_latent(guide_trace, user: str) -> tuple[dict, Distribution]:
    """The guide trace's one continuous (reparameterized) latent site and its
    per-dimension distribution (:func:`factorised`); ``user`` names who needs
    it in the error otherwise."""
    from pyro_vae.traces import is_reparameterized, latent_sites

    sites = list(latent_sites(guide_trace))
    if len(sites) != 1 or not is_reparameterized(sites[0][1]):
        raise ConfigError(f"{user} needs a guide with one continuous latent site; this guide has "
                          f"{[name for name, _ in sites]}")
    return sites[0][1], factorised(sites[0][1])


def pairwise_log_density(base: Distribution, z: torch.Tensor) -> torch.Tensor:
    """``log q(z_id | x_j)`` for every pair: ``base`` of batch ``[..., Bj, D]``
    (broadcastable), ``z`` of shape ``[Bi, D]`` -> ``[Bi, Bj, D]``."""
    return base.log_prob(z.unsqueeze(-2))


def uniform_log_weights(rows: int, columns: int, total: int, device=None) -> torch.Tensor:
    """``log r_ij = -log N``: the aggregate over ``total`` datapoints, ``columns`` of them in this block."""
    return torch.full((rows, columns), -math.log(total), device=device)


def mws_log_weights(batch_size: int, device=None) -> torch.Tensor:
    """Minibatch weighted sampling: ``log r_ij = -log M``."""
    return torch.full((batch_size, batch_size), -math.log(batch_size), device=device)


def mss_log_weights(batch_size: int, dataset_size: int, device=None) -> torch.Tensor:
    """Minibatch stratified sampling (Chen et al. 2018): ``1/N`` on the
    diagonal (``z_i``'s own datapoint), the stratum weight ``(N - M')/(N M')``
    once a row, ``1/M'`` elsewhere, ``M' = M - 1``; rows sum to one."""
    n, m = dataset_size, batch_size - 1
    if m < 1:
        raise ValueError("minibatch stratified sampling needs batches of at least 2")
    weights = torch.full((batch_size, batch_size), 1.0 / m, dtype=torch.float64)
    rows = torch.arange(batch_size)
    weights[rows, rows] = 1.0 / n
    weights[rows, (rows + 1) % batch_size] = (n - m) / (n * m)
    return weights.log().to(device=device, dtype=torch.get_default_dtype())


def aggregate_log_densities(log_pairs: torch.Tensor, log_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log q(z_i), sum_d log q(z_id))`` from ``log_pairs[i, j, d] = log q(z_id | x_j)``
    and mixture weights ``log_weights[i, j]``: two tensors of shape ``[Bi]``."""
    log_qz = torch.logsumexp(log_weights + log_pairs.sum(-1), dim=1)
    log_qz_dims = torch.logsumexp(log_weights.unsqueeze(-1) + log_pairs, dim=1).sum(-1)
    return log_qz, log_qz_dims


def kl_terms(log_q_given_x: torch.Tensor, log_qz: torch.Tensor, log_qz_dims: torch.Tensor,
             log_pz: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample index-code MI, total correlation and dimension-wise KL
    (their sum is ``log q(z|x) - log p(z)``)."""
    return {"mutual_information": log_q_given_x - log_qz,
            "total_correlation": log_qz - log_qz_dims,
            "dimensionwise_kl": log_qz_dims - log_pz}
