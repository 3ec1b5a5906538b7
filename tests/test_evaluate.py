"""The evaluator against exact answers on a linear-Gaussian VAE."""
import math

import pyro
import pyro.distributions as dist
import pytest
import numpy as np
import torch
from pyro.poutine.messenger import Messenger

from conftest import requires_cuda
from linear_gaussian import LinearGaussianModel, MeanFieldGuide, PosteriorGuide
from pyro_vae import evaluate as evaluate_module
from pyro_vae.config import config_from_dict
from pyro_vae.errors import ConfigError
from pyro_vae.evaluate import (
    chunk_sizes,
    chunked_log_weights,
    cpu_chunk_size,
    evaluate,
    float32_matmul_precision,
    importance_log_likelihood,
    kl_per_dimension,
    mean_elbo,
    onednn_bf16,
)
from pyro_vae.experiment import Experiment
from pyro_vae.train import train_and_evaluate


@pytest.fixture
def lg():
    model = LinearGaussianModel(latent_dim=3, data_dim=5, noise=0.7)
    return model, model.sample_data(40)


def test_exact_posterior_guide_gives_exact_log_likelihood(lg):
    """With q = p(z|x) every weight equals p(x): L_K = ELBO = log p(x) for any K."""
    model, x = lg
    result = evaluate(model, PosteriorGuide(model), x.split(16), num_samples=7, chunk_size=3, progress=False)
    exact = model.marginal().log_prob(x).numpy()
    assert result.log_likelihood.shape == (40,)
    assert result.log_likelihood == pytest.approx(exact, abs=1e-8)
    assert result.elbo == pytest.approx(exact, abs=1e-8)


def test_elbo_matches_closed_form(lg):
    """Mean of log w over K samples -> log p(x) - KL(q || p(z|x)), per datapoint."""
    model, x = lg
    guide = MeanFieldGuide(model)
    result = evaluate(model, guide, [x], num_samples=20000, chunk_size=5000, progress=False)
    exact = guide.exact_elbo(x).numpy()
    assert result.elbo.shape == (40,)
    with torch.no_grad():
        log_w = chunked_log_weights(model, guide, x, 20000, chunk_size=5000, nesting=1)
    standard_error = (log_w.std(0) / math.sqrt(20000)).numpy()
    assert (abs(result.elbo - exact) < 5 * standard_error).all()
    assert abs(result.elbo.mean() - exact.mean()) < 5 * standard_error.mean() / math.sqrt(40) * 2


def test_importance_sampling_bound_tightens_towards_log_px(lg):
    """E[L_1] = ELBO <= E[L_10] <= E[L_100] <= E[L_1000] <= log p(x), gaps shrinking."""
    model, x = lg
    guide = MeanFieldGuide(model, shift=0.3, scale_factor=1.3)
    log_px = model.marginal().log_prob(x).mean().item()
    elbo = guide.exact_elbo(x).mean().item()
    gaps = []
    with torch.no_grad():
        for k in (1, 10, 100, 1000):
            # average L_k over 50 independent repeats to make the comparison sharp
            log_w = chunked_log_weights(model, guide, x.repeat(50, 1), k, chunk_size=250, nesting=1)
            gaps.append(log_px - importance_log_likelihood(log_w).mean().item())
    assert gaps[0] == pytest.approx(log_px - elbo, rel=0.05)  # L_1 is the ELBO in expectation
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] > 0  # still a lower bound
    assert gaps[-1] < 0.05 * gaps[0]


def test_chunked_and_unchunked_estimates_agree_with_log_px(lg):
    model, x = lg
    guide = MeanFieldGuide(model, shift=0.05, scale_factor=1.1)  # sd(log w) ~ 1.8: IS error ~ 0.03
    exact = model.marginal().log_prob(x).numpy()
    for chunk in (4000, 333):
        result = evaluate(model, guide, [x], num_samples=4000, chunk_size=chunk, progress=False)
        assert abs(result.log_likelihood - exact).max() < 0.15
        assert abs(result.log_likelihood.mean() - exact.mean()) < 0.02


class _LargestLikelihood(Messenger):
    """Records the largest batch the likelihood at site "x" is evaluated on."""

    largest = 0

    def _postprocess_message(self, msg):
        if msg["name"] == "x":
            self.largest = max(self.largest, msg["fn"].batch_shape.numel())


def test_memory_is_bounded_by_chunk_not_by_k(lg):
    model, x = lg
    recorder = _LargestLikelihood()
    result = evaluate(recorder(model), PosteriorGuide(model), x.split(10), num_samples=5000, chunk_size=100,
                      progress=False)
    assert result.log_likelihood.shape == (40,)
    assert recorder.largest == 100 * 10  # chunk x batch, never K x N


def test_auto_chunks_on_the_cpu_hold_about_4m_data_elements(lg, monkeypatch):
    """chunk x B x dim(x) ~ CPU_CHUNK_ELEMENTS, at least one sample, at most K;
    the largest divisor of K down to half that, so that every chunk has one shape."""
    import pyro_vae.evaluate as evaluation

    model, x = lg  # 40 datapoints of dimension 5
    images = torch.zeros(100, 1, 28, 28)
    assert 4_000_000 // 78_400 == 51
    assert cpu_chunk_size(images, 5000) == 50  # 100 chunks of 50, not 98 of 51 and one of 2
    assert cpu_chunk_size(images, 5001) == 51  # 3 x 1667: no divisor in 26..51, so 98 of 51 and one of 3
    assert cpu_chunk_size(images, 1000) == 50
    assert cpu_chunk_size(images, 1326) == 51  # 26 x 51
    assert cpu_chunk_size(images, 52 * 26) == 26  # 1352 = 2^3 x 13^2: 26, the smallest allowed divisor
    assert cpu_chunk_size(images, 20) == 20
    assert cpu_chunk_size(torch.zeros(10**7, 1), 5000) == 1
    monkeypatch.setattr(evaluation, "CPU_CHUNK_ELEMENTS", 10 * 5 * 30)
    recorder = _LargestLikelihood()
    result = evaluate(recorder(model), PosteriorGuide(model), x.split(10), num_samples=500, progress=False)
    assert recorder.largest == 25 * 10 and result.log_likelihood.shape == (40,)  # 25: 500's divisor below 30


def test_psis_khat_separates_good_and_bad_proposals(lg):
    """A proposal wider than the posterior has light-tailed weights (k < 0.5);
    a much narrower one heavy-tailed weights (k > 0.7)."""
    model, x = lg
    wide = evaluate(model, MeanFieldGuide(model, shift=0.0, scale_factor=1.5), [x[:10]], 4000, progress=False)
    narrow = evaluate(model, MeanFieldGuide(model, shift=0.0, scale_factor=0.3), [x[:10]], 4000, progress=False)
    assert wide.khat.shape == (10,)
    assert wide.khat.mean() < 0.5
    assert narrow.khat.mean() > 0.7


def test_kl_per_dimension_is_analytic(lg):
    model, x = lg
    guide = MeanFieldGuide(model)
    kl = kl_per_dimension(model, guide, x)["z"]
    q = guide.distribution(x).base_dist
    expected = -torch.log(q.scale) + (q.scale**2 + q.loc**2 - 1) / 2  # KL(N(m, s^2) || N(0, 1))
    assert kl.shape == (40, 3)
    assert torch.allclose(kl, expected, atol=1e-10)


def test_evaluation_kl_per_dimension_is_the_mean_over_datapoints_of_unequal_batches(lg):
    """The evaluation's KL per dimension is the analytic KL averaged over
    every datapoint (batches of 16 and 24 weighted by their sizes), and its
    ``kl`` the sum over dimensions: a batch mean taken per batch, or a mean
    of the batch means, differs."""
    model, x = lg
    guide = MeanFieldGuide(model)
    result = evaluate(model, guide, [x[:16], x[16:]], num_samples=2, chunk_size=2, progress=False)
    expected = kl_per_dimension(model, guide, x)["z"].mean(0).numpy()
    assert result.kl_per_dim["z"] == pytest.approx(expected, rel=1e-9)
    assert result.summary()["kl"] == pytest.approx(expected.sum(), rel=1e-9)


def test_mean_elbo_is_unbiased(lg):
    model, x = lg
    guide = MeanFieldGuide(model)
    estimate = mean_elbo(model, guide, [x.repeat(500, 1)], num_samples=4)
    assert estimate == pytest.approx(guide.exact_elbo(x).mean().item(), abs=0.05)


def test_site_outside_data_plate_is_refused(lg):
    model, x = lg

    def global_latent_model(x, batch_size=None):
        pyro.sample("g", dist.Normal(0.0, 1.0))
        model(x)

    def global_latent_guide(x, batch_size=None):
        pyro.sample("g", dist.Normal(0.0, 1.0))
        PosteriorGuide(model)(x)

    with pytest.raises(ValueError, match="outside pyro.plate"):
        evaluate(global_latent_model, global_latent_guide, [x], 4, progress=False)


def test_chunk_sizes():
    assert chunk_sizes(1200, 500) == [500, 500, 200]
    assert chunk_sizes(5, 10) == [5]
    assert sum(chunk_sizes(5000, 333)) == 5000


def test_nested_plates_are_summed_per_datapoint():
    """A model with a second plate inside the data plate: log w is still per datapoint."""

    def model(x, batch_size=None):
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with pyro.plate("pixels", x.shape[1], dim=-1):
                pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x, batch_size=None):
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    x = torch.randn(6, 4, dtype=torch.float64)
    # guide = prior: log w = log p(x | z); its mean over many z is E_z[log p(x|z)]
    result = evaluate(model, guide, [x], num_samples=20000, chunk_size=5000, progress=False)
    expected = (dist.Normal(0.0, 1.0).log_prob(x) - 0.5).sum(-1)  # E_z[-(x-z)^2/2] = -(x^2+1)/2 - log sqrt(2 pi)
    assert result.elbo.shape == (6,)
    assert result.elbo == pytest.approx(expected.numpy(), abs=0.1)
    # and the IS estimate matches log N(x | 0, I + 11^T) (z shared by the 4 pixels)
    exact = dist.MultivariateNormal(torch.zeros(4, dtype=torch.float64),
                                    torch.eye(4, dtype=torch.float64) + 1).log_prob(x)
    assert result.log_likelihood == pytest.approx(exact.numpy(), abs=0.05)
    assert math.isfinite(result.summary()["iw_nll"])


def test_batched_khat_is_arviz_psislw_to_float64_rounding(monkeypatch):
    """pyro_vae.psis.pareto_khat against arviz.psislw, row by row, on weights
    light- and heavy-tailed, from K=20 (a tail of 4: infinite, as arviz
    says) and K=21 (the smallest tail arviz fits) to 5000, in parts of rows;
    rows with ties at the cutoff, all weights equal, or weights under the
    smallest double (arviz's own path) included."""
    from pyro_vae import psis
    from pyro_vae.psis import _arviz_khat, pareto_khat, tail_size

    torch.manual_seed(0)
    monkeypatch.setattr(psis, "ROWS_AT_ONCE", 7)  # several parts of rows
    for num_samples in (20, 21, 26, 100, 999, 5000):
        log_w = torch.cat([torch.randn(num_samples, 8) * s for s in (0.1, 1.0, 3.0, 10.0)]
                          + [torch.distributions.StudentT(1.5).sample((num_samples, 8)),
                             torch.distributions.Gumbel(0.0, 2.0).sample((num_samples, 8))], 1)
        log_w[:, 0] = 1.0  # all equal: no tail above the cutoff
        log_w[:3, 1] = log_w[:, 1].max() + 1  # ties among the largest
        log_w[1:, 2] = -800.0  # one weight, the rest under exp's range
        largest = log_w[:, 3].argsort(descending=True)
        m_tail = tail_size(num_samples)
        log_w[largest[m_tail], 3] = log_w[largest[m_tail - 1], 3]  # the M-th and (M+1)-th largest tie: M - 1 above
        ours, reference = pareto_khat(log_w), _arviz_khat(log_w.T.double().numpy())
        assert ours.shape == (48,)
        assert np.array_equal(np.isfinite(ours), np.isfinite(reference))
        if num_samples == 20:
            assert np.isinf(ours).all() and np.isinf(reference).all()
            continue
        assert np.isfinite(reference).sum() >= 40  # the comparison below is not vacuous
        finite = np.isfinite(reference)
        assert np.abs(ours[finite] - reference[finite]).max() < 1e-12 * max(1.0, np.abs(reference[finite]).max())


def test_the_matmul_precision_applies_within_the_block_and_is_restored_after():
    backend = torch.backends.mkldnn.matmul
    original = backend.fp32_precision
    try:
        backend.fp32_precision = "none"  # (torch's default: whatever was set before is what comes back)
        with float32_matmul_precision("ieee", torch.device("cpu")):
            assert backend.fp32_precision == "ieee"
        assert backend.fp32_precision == "none"
        with pytest.raises(RuntimeError, match="inside"), float32_matmul_precision("ieee", torch.device("cpu")):
            raise RuntimeError("inside")
        assert backend.fp32_precision == "none"
    finally:
        backend.fp32_precision = original


@pytest.mark.parametrize("precision, device, fix", [("bf16", "cuda", 'use "tf32"'), ("tf32", "cpu", 'on the CPU use'),
                                                    ("bf16", "cpu without avx-512", 'no AVX-512.*use "ieee"')])
def test_a_precision_the_device_cannot_take_is_refused_with_the_fix(monkeypatch, precision, device, fix):
    if device == "cpu without avx-512":
        monkeypatch.setattr(evaluate_module, "onednn_bf16", lambda: False)
        device = "cpu"
    with pytest.raises(ConfigError, match=fix), float32_matmul_precision(precision, torch.device(device)):
        pass


def test_a_precision_the_device_cannot_take_is_refused_before_training(tiny_raw, tmp_path):
    tiny_raw["eval"]["matmul_precision"] = "tf32"
    with pytest.raises(ConfigError, match="tf32"):
        train_and_evaluate(config_from_dict(tiny_raw), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("device, precision", [
    pytest.param("cpu", "bf16", marks=pytest.mark.skipif(
        not onednn_bf16(), reason="needs a CPU whose float32 products oneDNN takes (AVX-512)")),
    pytest.param("cuda", "tf32", marks=requires_cuda),
])
def test_reduced_precision_products_move_the_log_likelihood_of_a_float32_vae_by_a_small_fraction_of_a_nat(
        tiny_raw, device, precision):
    """The same draws (one seed) with float32 and reduced-precision products:
    the estimates differ by rounding-sized amounts (bf16: they do differ, the
    setting took effect; TF32 changes nothing on a GPU without it), and the
    backend's setting is restored after."""
    backend = torch.backends.mkldnn.matmul if device == "cpu" else torch.backends.cuda.matmul
    experiment = Experiment.build(config_from_dict(tiny_raw), torch.device(device))
    x = experiment.data["test"].batch(slice(0, 50))
    before = backend.fp32_precision
    results = {}
    for each in ("ieee", precision):
        pyro.set_rng_seed(1)
        results[each] = evaluate(experiment.model, experiment.guide, [x], num_samples=200, chunk_size=100,
                                 progress=False, matmul_precision=each)
        assert results[each].summary()["matmul_precision"] == each
    difference = results[precision].log_likelihood - results["ieee"].log_likelihood
    assert precision != "bf16" or np.abs(difference).max() > 1e-4
    assert np.abs(difference).max() < 0.1 and abs(difference.mean()) < 0.02
    assert backend.fp32_precision == before
