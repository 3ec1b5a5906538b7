"""A linear-Gaussian VAE whose every quantity is known in closed form.

    z ~ N(0, I_d),   x | z ~ N(W z + b, s^2 I_D)
    p(x)     = N(x | b, W W^T + s^2 I)
    p(z | x) = N(z | S W^T (x - b) / s^2, S),  S = (I + W^T W / s^2)^-1

Guides: the exact posterior, and a mean-field Gaussian whose mean is shifted
and whose scales are multiplied, for which ELBO = log p(x) - KL(q || p(z|x))
exactly.  Both keep the site contract, so the engine's evaluator must handle
them like any catalogue model.  Importing this module also registers the
model as "linear_gaussian" (used by the `imports` test).
"""
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch.distributions import kl_divergence

from pyro_vae.distributions import WithoutRsample
from pyro_vae.registry import MODELS


class LinearGaussianModel(PyroModule):
    def __init__(self, latent_dim=3, data_dim=5, noise=0.7, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("W", torch.randn(data_dim, latent_dim, generator=g, dtype=torch.float64))
        self.register_buffer("b", torch.randn(data_dim, generator=g, dtype=torch.float64))
        self.noise = noise
        self.latent_dim = latent_dim

    def forward(self, x=None, batch_size=None):
        batch_size = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", batch_size):
            zeros = self.b.new_zeros(self.latent_dim)
            z = pyro.sample("z", dist.Normal(zeros, 1.0).expand([batch_size, self.latent_dim]).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.noise).to_event(1), obs=x)

    def marginal(self):
        cov = self.W @ self.W.T + self.noise**2 * torch.eye(self.W.shape[0], dtype=self.W.dtype)
        return dist.MultivariateNormal(self.b, cov)

    def posterior(self, x):
        d = self.latent_dim
        cov = torch.linalg.inv(torch.eye(d, dtype=self.W.dtype) + self.W.T @ self.W / self.noise**2)
        mean = (x - self.b) @ self.W @ cov / self.noise**2  # cov is symmetric
        return dist.MultivariateNormal(mean, cov.expand(x.shape[0], d, d))

    def sample_data(self, n, seed=1):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.latent_dim, generator=g, dtype=self.W.dtype)
        return z @ self.W.T + self.b + self.noise * torch.randn(n, self.W.shape[0], generator=g, dtype=self.W.dtype)


class PosteriorGuide(PyroModule):
    """q(z | x) = p(z | x) exactly."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, batch_size=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.model.posterior(x))


class MeanFieldGuide(PyroModule):
    """q(z | x) = N(mu(x) + shift, diag(scale_factor * sd(x))^2), mu and sd of the posterior."""

    def __init__(self, model, shift=0.3, scale_factor=1.4):
        super().__init__()
        self.model, self.shift, self.scale_factor = model, shift, scale_factor

    def distribution(self, x):
        post = self.model.posterior(x)
        sd = post.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt()
        return dist.Normal(post.mean + self.shift, self.scale_factor * sd).to_event(1)

    def forward(self, x, batch_size=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.distribution(x))

    def exact_elbo(self, x):
        """log p(x) - KL(q(z|x) || p(z|x)), the KL between Gaussians in closed form."""
        q = self.distribution(x).base_dist
        q_mvn = dist.MultivariateNormal(q.loc, torch.diag_embed(q.scale**2))
        return self.model.marginal().log_prob(x) - kl_divergence(q_mvn, self.model.posterior(x))


class LearnableMeanFieldGuide(MeanFieldGuide):
    """:class:`MeanFieldGuide` whose shift and log scale factor (one per latent
    dimension) are parameters, so the closed-form ELBO has an exact gradient
    with respect to them.  With ``reparameterized = False`` its samples are
    drawn without ``rsample``, so objectives must use the score function."""

    def __init__(self, model, shift=0.3, scale_factor=1.4):
        super().__init__(model)
        d, dtype = model.latent_dim, model.W.dtype
        self.shift = torch.nn.Parameter(torch.full((d,), shift, dtype=dtype))
        self.log_scale_factor = torch.nn.Parameter(torch.full((d,), float(torch.tensor(scale_factor).log()), dtype=dtype))
        self.reparameterized = True

    def distribution(self, x):
        post = self.model.posterior(x)
        sd = post.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt()
        q = dist.Normal(post.mean + self.shift, self.log_scale_factor.exp() * sd).to_event(1)
        return q if self.reparameterized else WithoutRsample(q, 0)


@MODELS.register("linear_gaussian")
def linear_gaussian(prior, event_shape, latent_dim: int = 3, noise: float = 0.7):
    """Linear-Gaussian model for tests (its prior is built in)."""
    return LinearGaussianModel(latent_dim=latent_dim, data_dim=event_shape[-1], noise=noise)
