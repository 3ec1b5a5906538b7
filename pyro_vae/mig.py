"""The mutual-information gap (MIG; Chen et al. 2018) of a model's codes
against a dataset's known generative factors.

For factor ``v_k`` and code dimension ``z_j`` (the guide's mean), with
``I(z_j; v_k)`` their mutual information and ``H(v_k)`` the factor's entropy,

    MIG = (1/K) sum_k [I(z_(1); v_k) - I(z_(2); v_k)] / H(v_k),

``z_(1)``, ``z_(2)`` the two code dimensions most informative about ``v_k``:
high when each factor is captured by one dimension alone.  As in
disentanglement_lib (Locatello et al. 2019), the codes are discretised into
``bins`` equal-width bins per dimension and the informations are discrete
(scikit-learn's ``mutual_info_score``); Chen et al. estimate ``I`` by sampling
``q(z|x)`` instead.
"""
from __future__ import annotations

import numpy as np


def discretise(codes: np.ndarray, bins: int = 20) -> np.ndarray:
    """Each column of ``codes`` ``[N, D]`` -> bin indices ``[N, D]`` (equal-width bins)."""
    out = np.zeros(codes.shape, dtype=np.int64)
    for j in range(codes.shape[1]):
        edges = np.histogram_bin_edges(codes[:, j], bins=bins)
        out[:, j] = np.digitize(codes[:, j], edges[1:-1])
    return out


def mutual_information_matrix(codes: np.ndarray, factors: np.ndarray, bins: int = 20) -> np.ndarray:
    """``I(z_j; v_k)`` in nats: ``[D, K]``."""
    from sklearn.metrics import mutual_info_score

    binned = discretise(codes, bins)
    return np.array([[mutual_info_score(factors[:, k], binned[:, j]) for k in range(factors.shape[1])]
                     for j in range(binned.shape[1])])


def mutual_information_gap(codes: np.ndarray, factors: np.ndarray, bins: int = 20) -> dict:
    """MIG over the factors that vary (a constant factor has no entropy to
    normalise by), with the per-factor gaps."""
    from sklearn.metrics import mutual_info_score

    if codes.shape[1] < 2:
        raise ValueError("MIG needs at least two code dimensions")
    informations = mutual_information_matrix(codes, factors, bins)
    gaps = []
    for k in range(factors.shape[1]):
        entropy = mutual_info_score(factors[:, k], factors[:, k])
        if entropy <= 0:
            gaps.append(None)
            continue
        top = np.sort(informations[:, k])[::-1]
        gaps.append(float((top[0] - top[1]) / entropy))
    valid = [g for g in gaps if g is not None]
    return {"mig": float(np.mean(valid)), "per_factor": gaps}
