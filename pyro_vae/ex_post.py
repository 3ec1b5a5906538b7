"""The post-training stage of a prior fitted to the codes (``gmm_ex_post``).

A prior with a ``fit_codes(codes, seed)`` method is fitted, once training
ends, to the guide's codes of the training set (:func:`pyro_vae.plots.latent_codes`:
a draw from ``q(z | x)`` or its mean, as the prior's ``codes`` says; a
``delta`` guide's point estimate either way); the
fitted state is saved beside the checkpoint as ``ex_post_prior.pt`` and
restored with the weights, so sampling and evaluation use it.  Training never
does: each ``train`` call trains against the prior's unfitted form and fits
again at its end.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from pyro_vae.errors import CheckpointError
from pyro_vae.plots import latent_codes

EX_POST_FILE = "ex_post_prior.pt"


def ex_post_prior(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The model's prior if it is fitted after training, else ``None``."""
    prior = getattr(model, "prior", None)
    return prior if hasattr(prior, "fit_codes") else None


def fit_ex_post_prior(run: "RunDir", experiment, batch_size: int = 1000) -> Optional[dict[str, Any]]:
    """Fit the experiment's ex-post prior to the codes of the training images
    (the first ``train.limit`` where it is set) and save it
    in ``run``; returns the fit's summary (``None`` for other priors)."""
    prior = ex_post_prior(experiment.model)
    if prior is None:
        return None
    limit = experiment.config.train.limit  # the images it was trained on
    train = experiment.data["train"].head(limit) if limit else experiment.data["train"]
    codes = latent_codes(experiment.guide, train.batches(batch_size), sample=prior.codes == "sample")
    summary = prior.fit_codes(codes, seed=experiment.config.train.seed)
    with run.atomic(EX_POST_FILE) as path:
        torch.save(prior.mixture_state(), path)
    return {"codes": int(codes.shape[0]), **summary}


def load_ex_post_prior(run: "RunDir", model: torch.nn.Module) -> None:
    """Restore the run's fitted ex-post prior into ``model`` (nothing to do for other priors or before a fit)."""
    prior, path = ex_post_prior(model), run / EX_POST_FILE
    if prior is None or not path.is_file():
        return
    try:
        prior.load_mixture(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:  # a truncated or foreign file: any unpickling or shape error
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} does not hold the fitted prior this run's config builds ({reason}); delete it and "
                              f"run `pyro-vae train {run.config_file} --run-dir {run.path}` again: a finished run "
                              f"only refits it") from None
