"""A deterministic objective, for comparing training runs number for number
(the data-parallel test): ``-sum_b log p(x_b | z = E_q[z | x_b])``, no
sampling.  With ``nan_on_rank`` it returns NaN on that torchrun rank's
``nan_at_step``-th step.  Registered as ``_reconstruction_at_the_mean`` by
importing this module (``imports = ["deterministic"]``)."""
import os

import pyro.poutine as poutine

from pyro_vae.aggregate import factorised
from pyro_vae.objectives import Objective
from pyro_vae.registry import OBJECTIVES
from pyro_vae.traces import OBSERVED_SITE, latent_sites


@OBJECTIVES.register("_reconstruction_at_the_mean")
class ReconstructionAtTheMean(Objective):
    """-sum_b log p(x_b | z = E_q[z | x_b]): deterministic, for exact comparisons of runs."""

    def __init__(self, model, guide, nan_on_rank: int = -1, nan_at_step: int = -1):
        super().__init__(model, guide)
        self.nan_on_rank, self.nan_at_step = nan_on_rank, nan_at_step

    def forward(self, x):
        guide_trace = poutine.trace(self.guide).get_trace(x)
        (name, site), = latent_sites(guide_trace)
        model_trace = poutine.trace(poutine.condition(self.model, data={name: factorised(site).mean})).get_trace(x)
        observed = model_trace.nodes[OBSERVED_SITE]
        log_likelihood = observed["fn"].log_prob(observed["value"])
        loss = -log_likelihood.sum()
        if int(os.environ.get("RANK", "0")) == self.nan_on_rank and self.context.step == self.nan_at_step:
            loss = loss * float("nan")
        return self.report(loss, x.shape[0], elbo=log_likelihood)
