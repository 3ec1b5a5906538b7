"""The point-estimate guide and the prior fitted after training: the
autoencoder made generative (delta guide + gmm_ex_post)."""
import math

import numpy as np
import pyro
import pytest
import torch
from scipy.stats import multivariate_normal

from pyro_vae import registry
from pyro_vae.config import config_from_dict
from pyro_vae.errors import CheckpointError, ConfigError
from pyro_vae.ex_post import EX_POST_FILE
from pyro_vae.experiment import Experiment
from pyro_vae.rundir import RunDir
from pyro_vae.train import evaluate_run, train_and_evaluate


def test_gmm_ex_post_is_standard_normal_until_fitted_then_the_fitted_mixture():
    """Before the fit p(z) = N(0, I); after fitting two well-separated
    clusters, the weights and means are recovered and log p(z) equals
    log sum_c pi_c N(z; m_c, S_c) computed with scipy from the fitted
    parameters; its samples come from the mixture."""
    prior = registry.PRIORS.build("gmm_ex_post", {"components": 2}, latent_dim=2)
    z = torch.randn(6, 2)
    assert torch.allclose(prior(6).log_prob(z), torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1))
    generator = torch.Generator().manual_seed(0)
    truth = torch.tensor([[-4.0, 0.0], [3.0, 2.0]])
    labels = (torch.rand(3000, generator=generator) < 0.3).long()
    codes = truth[labels] + 0.5 * torch.randn(3000, 2, generator=generator)
    summary = prior.fit_codes(codes)
    assert prior.fitted and summary["converged"]
    order = prior.mixture_means[:, 0].argsort()
    assert torch.allclose(prior.mixture_weights[order], torch.tensor([0.7, 0.3]), atol=0.03)
    assert torch.allclose(prior.mixture_means[order], truth, atol=0.1)
    state = {k: v.double().numpy() for k, v in prior.mixture_state().items()}
    expected = np.log(sum(w * multivariate_normal(m, l @ l.T).pdf(z.numpy())
                          for w, m, l in zip(state["weights"], state["means"], state["scale_tril"])))
    assert np.allclose(prior(6).log_prob(z).numpy(), expected, atol=1e-4)
    samples = prior(4000).sample()
    assert abs(float((samples[:, 0] > 0).float().mean()) - float(prior.mixture_weights[prior.mixture_means[:, 0] > 0])) < 0.03
    assert "mixture_weights" not in prior.state_dict()  # the checkpoint holds the trained weights only


def test_gmm_ex_post_with_diagonal_covariances_is_the_fitted_mixture():
    """``covariance = "diag"``: scikit-learn keeps the variances (not a
    matrix), which the prior makes the diagonal covariance: the fitted
    variances are the clusters' 0.25 (sd 0.5), and log p(z) is the mixture's
    own ``score_samples``."""
    from sklearn.mixture import GaussianMixture

    prior = registry.PRIORS.build("gmm_ex_post", {"components": 2, "covariance": "diag"}, latent_dim=2)
    generator = torch.Generator().manual_seed(0)
    truth = torch.tensor([[-4.0, 0.0], [3.0, 2.0]])
    codes = truth[(torch.rand(3000, generator=generator) < 0.3).long()] + 0.5 * torch.randn(3000, 2, generator=generator)
    prior.fit_codes(codes, seed=0)
    tril = prior.mixture_state()["scale_tril"].double()
    covariance = tril @ tril.transpose(-1, -2)
    assert torch.allclose(covariance, torch.diag_embed(covariance.diagonal(dim1=-2, dim2=-1)))
    assert torch.allclose(covariance.diagonal(dim1=-2, dim2=-1), torch.full((2, 2), 0.25, dtype=torch.float64), atol=0.03)
    mixture = GaussianMixture(2, covariance_type="diag", random_state=0, max_iter=500).fit(codes.double().numpy())
    z = torch.randn(7, 2) * 3
    assert np.allclose(prior(7).log_prob(z).numpy(), mixture.score_samples(z.double().numpy()), atol=1e-3)


def test_a_run_fits_the_prior_after_training_and_restores_it_with_the_weights(tiny_raw, tmp_path):
    """``train`` fits the mixture to the codes of the images it trained on and
    saves it beside the checkpoint; ``load_trained`` restores it, and the
    evaluator scores with it (not with N(0, I)); a resumed run trains against
    N(0, I) again; a corrupt file is refused by name."""
    tiny_raw["prior"] = {"name": "gmm_ex_post", "components": 3}
    config = config_from_dict(tiny_raw)
    report = train_and_evaluate(config, tmp_path / "run", progress=False)
    assert report["ex_post_prior"]["codes"] == 1000 and (tmp_path / "run" / EX_POST_FILE).is_file()
    experiment, _ = RunDir(tmp_path / "run").load_trained()
    prior = experiment.model.prior
    assert prior.fitted
    # fitted to draws z ~ q(z|x) by default: the aggregate posterior's spread, E Var(z|x) + Var E(z|x), above the means'
    from pyro_vae.plots import latent_codes

    train = experiment.data["train"].head(1000)
    spread = {kind: latent_codes(experiment.guide, train.batches(500), sample=kind == "sample").var(0).sum()
              for kind in ("sample", "mean")}
    fitted_spread = (prior.mixture_scale_tril @ prior.mixture_scale_tril.mT).diagonal(dim1=-2, dim2=-1)
    assert spread["sample"] > 2 * spread["mean"] and prior.codes == "sample"
    assert float((prior.mixture_weights[:, None] * fitted_spread).sum()) > float(spread["mean"])
    pyro.set_rng_seed(1)
    fitted_nll = evaluate_run(experiment, "test", 20, 10, 50, 100, progress=False).log_likelihood
    prior.mixture_weights = None  # the same weights against N(0, I): a different model of the same data
    pyro.set_rng_seed(1)
    standard_nll = evaluate_run(experiment, "test", 20, 10, 50, 100, progress=False).log_likelihood
    assert np.isfinite(fitted_nll).all() and not np.allclose(fitted_nll, standard_nll)
    assert not Experiment.build(config).model.prior.fitted  # what a resumed `train` trains against

    (tmp_path / "run" / EX_POST_FILE).write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=EX_POST_FILE + r".*delete it and run `pyro-vae train"):
        RunDir(tmp_path / "run").load_trained()


def test_the_delta_guide_trains_the_map_objective_and_is_refused_by_the_is_evaluator(tiny_raw, tmp_path):
    """With q(z|x) = delta(z - f(x)) the ELBO objectives' loss is
    -log p(x | f(x)) - log N(f(x); 0, I) exactly (log q = 0 at the guide's own
    value); an IS evaluation is refused naming the guide and the setting, at
    build time and when asked for later; training with iw_samples = 0 draws
    the latent scatter."""
    tiny_raw["guide"] = {"name": "delta", "hidden": [64], "activation": "relu"}
    with pytest.raises(ConfigError, match=r"guide 'delta' is a point estimate at latent 'z'.*eval.iw_samples = 20"):
        Experiment.build(config_from_dict(tiny_raw))
    tiny_raw["eval"] = {"iw_samples": 0}
    experiment = Experiment.build(config_from_dict(tiny_raw))
    x = experiment.data["train"].batch(slice(0, 10))
    codes = experiment.guide.encoder(x.reshape(10, -1))
    logits = experiment.model.decoder(codes)
    expected = -(torch.distributions.Bernoulli(logits=logits).log_prob(x.reshape(10, -1)).sum()
                 + torch.distributions.Normal(0.0, 1.0).log_prob(codes).sum())
    assert torch.allclose(experiment.objective(x), expected, rtol=1e-5)
    with pytest.raises(ConfigError, match=r"guide 'delta' is a point estimate.*eval.iw_samples = 5"):
        evaluate_run(experiment, "test", 5, 5, 10, 10, progress=False)
    report = train_and_evaluate(config_from_dict(tiny_raw), tmp_path / "ae", progress=False)
    assert "eval" not in report and math.isfinite(report["final_valid_elbo"])
    assert (tmp_path / "ae" / "latent_scatter.png").is_file()
