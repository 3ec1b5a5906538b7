"""The ELBO family, by name.

Each objective is a Pyro :class:`~pyro.infer.ELBO`; ``elbo(model, guide)``
gives an :class:`~pyro.infer.elbo.ELBOModule` whose forward is the loss
``-ELBO`` summed over the batch, differentiable and trained with
:mod:`torch.optim`.
"""
from __future__ import annotations

from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO

from pyro_vae.registry import OBJECTIVES


@OBJECTIVES.register("trace_elbo")
def trace_elbo(num_particles: int = 1) -> ELBO:
    """Pyro Trace_ELBO: reparameterized Monte-Carlo E_q[log p(x,z) - log q(z|x)]."""
    return Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1)


@OBJECTIVES.register("meanfield_elbo")
def meanfield_elbo(num_particles: int = 1) -> ELBO:
    """Pyro TraceMeanField_ELBO: E_q[log p(x|z)] - KL(q(z|x) || p(z)), KL analytic where registered."""
    return TraceMeanField_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1)
