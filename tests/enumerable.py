"""A binary-latent VAE small enough to enumerate every z, built from the
catalogue's own parts (prior ``bernoulli``, decoder ``linear``, guide
``bernoulli``), so that its exact answers test the engine:

    log p(x)       = logsumexp_z [log p(z) + log p(x | z)]
    ELBO(x)        = sum_z q(z | x) [log p(x, z) - log q(z | x)]
    E[L_K(x)]      = sum_{z_1..z_K} prod_k q(z_k | x) log (1/K) sum_k w(z_k),   w = p(x, z) / q(z | x)

each differentiable, so autograd gives the exact gradient of each with
respect to every parameter (decoder, prior logits, encoder).
"""
import itertools

import torch

from pyro_vae import registry
from pyro_vae.distributions import BernoulliVector
from pyro_vae.traces import log_mean_exp

LATENTS, PIXELS = 3, 4


def build(seed: int = 0, weight_scale: float = 1.5, guide_scale: float = 1.5):
    """The model and guide in float64 with random, non-trivial parameters
    (standard normal times ``weight_scale`` for the model's, ``guide_scale``
    for the guide's: a small one gives a broad guide)."""
    registry.load_catalogue()
    torch.manual_seed(seed)
    prior = registry.PRIORS.build("bernoulli", {"learned": True}, latent_dim=LATENTS)
    model = registry.MODELS.build("linear", {"latent_dim": LATENTS}, prior=prior, event_shape=(PIXELS,))
    guide = registry.GUIDES.build("bernoulli", {"hidden": []}, event_shape=(PIXELS,), latent_dim=LATENTS)
    model, guide = model.double(), guide.double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(weight_scale * torch.randn_like(p))
        for p in guide.parameters():
            p.copy_(guide_scale * torch.randn_like(p))
    return model, guide


def data() -> torch.Tensor:
    """Three distinct binary datapoints."""
    return torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 1, 0]], dtype=torch.float64)


def all_latents() -> torch.Tensor:
    """Every z in {0, 1}^LATENTS: ``[2^LATENTS, LATENTS]``."""
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=LATENTS)), dtype=torch.float64)


def joint_terms(model, guide, x):
    """``log p(x_b, z)`` and ``log q(z | x_b)`` for every z: ``[2^L, B]`` each."""
    z = all_latents()
    log_prior = model.prior(1).log_prob(z.unsqueeze(1))  # [Z, 1]
    log_lik = BernoulliVector(logits=model.decoder(z).unsqueeze(1)).log_prob(x)  # [Z, B]
    logits = guide.encoder(x)  # [B, L]
    log_q = torch.distributions.Bernoulli(logits=logits).log_prob(z.unsqueeze(1)).sum(-1)  # [Z, B]
    return log_prior + log_lik, log_q


def log_marginal(model, guide, x) -> torch.Tensor:
    """Exact ``log p(x_b)``: ``[B]``."""
    log_joint, _ = joint_terms(model, guide, x)
    return torch.logsumexp(log_joint, 0)


def elbo(model, guide, x) -> torch.Tensor:
    """Exact ``ELBO(x_b)``: ``[B]``."""
    log_joint, log_q = joint_terms(model, guide, x)
    return (log_q.exp() * (log_joint - log_q)).sum(0)


def expected_bound(model, guide, x, num_samples: int) -> torch.Tensor:
    """Exact ``E[L_K(x_b)]`` over every K-tuple of latents: ``[B]``."""
    log_joint, log_q = joint_terms(model, guide, x)
    log_w = log_joint - log_q  # [Z, B]
    tuples = torch.tensor(list(itertools.product(range(log_w.shape[0]), repeat=num_samples)))  # [Z^K, K]
    bound = log_mean_exp(log_w[tuples], dim=1)  # [Z^K, B]
    prob = log_q[tuples].sum(1).exp()  # prod_k q(z_k | x)
    return (prob * bound).sum(0)


def exact_gradient(model, guide, target) -> torch.Tensor:
    """The gradient of ``target().sum()`` with respect to every parameter
    (model's, then guide's), flattened."""
    params = [*model.parameters(), *guide.parameters()]
    grads = torch.autograd.grad(target().sum(), params)
    return torch.cat([g.reshape(-1) for g in grads])
