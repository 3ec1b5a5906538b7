"""Training: it learns, checkpoints every epoch, resumes, and fails clearly."""
import pytest
import torch

from pyro_vae.checkpoint import load_checkpoint
from pyro_vae.config import config_from_dict
from pyro_vae.errors import CheckpointError, ConfigError, DataError, TrainingDivergedError
from pyro_vae.evaluate import mean_elbo
from pyro_vae.experiment import Experiment
from pyro_vae.objectives import Objective
from pyro_vae.registry import OBJECTIVES
from pyro_vae.rundir import RunDir
from pyro_vae.train import fit


def test_short_training_raises_the_valid_elbo(tiny_raw, tmp_path):
    tiny_raw["train"].update(epochs=3, limit=2000)
    experiment = Experiment.build(config_from_dict(tiny_raw))
    valid = experiment.data["valid"].head(2000)
    before = mean_elbo(experiment.model, experiment.guide, valid.batches(500), num_samples=4)
    history = fit(experiment, RunDir(tmp_path), progress=False)
    after = mean_elbo(experiment.model, experiment.guide, valid.batches(500), num_samples=4)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert after > before + 100  # ~ -545 nats untrained, ~ -200 after 3 short epochs
    assert history[-1]["valid_elbo"] > history[0]["valid_elbo"]
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 4


def test_each_epoch_shuffles_with_a_generator_seeded_from_the_seed_and_the_epoch(tiny_raw, tmp_path, monkeypatch):
    """Epoch ``e`` visits the training images in the order
    ``randperm(N)`` of a generator seeded with ``epoch_seed(seed, e) = seed *
    1000003 + e``: a new order every epoch, which a resumed run redraws
    from the seed and the epoch alone."""
    from pyro_vae.data.images import ImageSplit
    from pyro_vae.train import epoch_seed

    orders = []
    permutation = ImageSplit.permutation

    def recorded(split, generator=None):
        orders.append(permutation(split, generator).clone())
        return orders[-1]

    monkeypatch.setattr(ImageSplit, "permutation", recorded)
    tiny_raw["train"].update(epochs=2, limit=300, seed=7)
    config = config_from_dict(tiny_raw)
    fit(Experiment.build(config), RunDir(tmp_path), progress=False)
    assert len(orders) == 2 and not torch.equal(orders[0], orders[1])
    for epoch, order in enumerate(orders, start=1):
        generator = torch.Generator().manual_seed(epoch_seed(config.train.seed, epoch))
        assert epoch_seed(config.train.seed, epoch) == config.train.seed * 1_000_003 + epoch
        assert torch.equal(order, torch.randperm(300, generator=generator))


def test_resume_follows_the_same_path(tiny_raw, tmp_path):
    """2 epochs, then resumed to 3 == 3 epochs straight."""
    tiny_raw["train"].update(limit=500, epochs=3)
    straight = Experiment.build(config_from_dict(tiny_raw))
    fit(straight, RunDir(tmp_path / "a"), progress=False)

    tiny_raw["train"]["epochs"] = 2
    first = Experiment.build(config_from_dict(tiny_raw))
    fit(first, RunDir(tmp_path / "b"), progress=False)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == 2
    tiny_raw["train"]["epochs"] = 3
    resumed = Experiment.build(config_from_dict(tiny_raw))
    history = fit(resumed, RunDir(tmp_path / "b"), load_checkpoint(tmp_path / "b" / "checkpoint.pt"), progress=False)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_corrupt_checkpoint_is_reported(tiny_raw, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt or not a pyro-vae checkpoint.*no previous checkpoint"):
        RunDir(tmp_path).resume_state(config_from_dict(tiny_raw))


def test_checkpoint_cannot_run_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this would run",))

    torch.save({"model": Payload(), "guide": {}, "optimizer": {}, "epoch": 1}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="refused because loading it could run code"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="lacks"):
        load_checkpoint(tmp_path / "other.pt")


def test_nan_loss_stops_with_a_clear_error_and_keeps_finished_epochs(tiny_raw, tmp_path):
    tiny_raw["train"].update(limit=200, epochs=1)
    experiment = Experiment.build(config_from_dict(tiny_raw))
    fit(experiment, RunDir(tmp_path), progress=False)
    tiny_raw["train"]["epochs"] = 2
    experiment = Experiment.build(config_from_dict(tiny_raw))
    with torch.no_grad():
        experiment.guide.encoder[0].weight.fill_(float("nan"))
    experiment.guide.load_state_dict = lambda state: None  # keep the NaN weights over the checkpoint's
    with pytest.raises(TrainingDivergedError,
                       match=r"parameter guide.encoder.0.weight.*at epoch 2, step 1; the checkpoint of the end of "
                             r"epoch 1 .* is intact. Lower train.lr"):
        fit(experiment, RunDir(tmp_path), load_checkpoint(tmp_path / "checkpoint.pt"), progress=False)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


def test_gray_data_with_a_bernoulli_likelihood_is_refused(tiny_raw):
    tiny_raw["data"]["binarization"] = "none"
    with pytest.raises(DataError, match=r"outside the support.*Set data.binarization to 'dynamic'"):
        Experiment.build(config_from_dict(tiny_raw))


def test_run_dir_of_another_experiment_is_not_overwritten(tiny_raw, tmp_path):
    RunDir(tmp_path).start_session(config_from_dict(tiny_raw), None)
    tiny_raw["model"]["latent_dim"] = 3
    with pytest.raises(ConfigError, match=r"holds a different experiment \(model.latent_dim: 8 -> 3\).*--overwrite"):
        RunDir(tmp_path).resume_state(config_from_dict(tiny_raw))
    assert RunDir(tmp_path).resume_state(config_from_dict(tiny_raw), overwrite=True) is None
    assert not tmp_path.exists()


def test_cuda_device_is_refused_without_cuda(tiny_raw):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    tiny_raw["train"]["device"] = "cuda"
    with pytest.raises(ConfigError, match="no CUDA device"):
        Experiment.build(config_from_dict(tiny_raw))


def test_every_batch_takes_one_optimizer_step(tiny_raw, tmp_path):
    tiny_raw["train"].update(limit=450, epochs=2, batch_size=100)
    experiment = Experiment.build(config_from_dict(tiny_raw))
    fit(experiment, RunDir(tmp_path), progress=False)
    state = load_checkpoint(tmp_path / "checkpoint.pt")["optimizer"]["state"]
    assert state and all(int(s["step"]) == 2 * 5 for s in state.values())  # 5 batches (the last of 50) x 2 epochs
    assert experiment.objective.context.step == 10


def test_a_training_step_is_one_adam_update():
    """train_step == the Adam update written out: m, v moments, bias correction."""
    import pyro

    from pyro_vae import registry
    from pyro_vae.train import make_optimizer, train_step

    prior = registry.PRIORS.build("standard_normal", {}, latent_dim=2)
    model = registry.MODELS.build("mlp", {"latent_dim": 2, "hidden": [5]}, prior=prior, event_shape=(4,))
    guide = registry.GUIDES.build("normal", {"hidden": [5]}, event_shape=(4,), latent_dim=2)
    objective = registry.OBJECTIVES.build("meanfield_elbo", {})(model, guide)
    x = torch.bernoulli(torch.full((6, 4), 0.5))
    objective.prepare(x)
    lr, beta1, beta2, eps = 0.01, 0.9, 0.999, 1e-8
    optimizer = make_optimizer(objective.param_groups(), lr)
    params = list(objective.parameters())
    before = [p.detach().clone() for p in params]
    pyro.set_rng_seed(3)
    grads = torch.autograd.grad(objective(x), params)
    expected = []
    for p0, g in zip(before, grads):  # step 1: m = (1-b1) g, v = (1-b2) g^2, bias-corrected
        m_hat, v_hat = (1 - beta1) * g / (1 - beta1), (1 - beta2) * g**2 / (1 - beta2)
        expected.append(p0 - lr * m_hat / (v_hat.sqrt() + eps))
    pyro.set_rng_seed(3)
    train_step(objective, optimizer, x)
    assert all(torch.allclose(p, e, atol=1e-6) for p, e in zip(params, expected))
    assert any(not torch.allclose(p, p0) for p, p0 in zip(params, before))


def test_metrics_log_the_elbo_apart_from_the_loss(tiny_raw, tmp_path):
    """With VIMCO the loss is -L_K, not -ELBO: metrics.csv keeps both, and
    the objective's own terms."""
    import csv

    tiny_raw["objective"] = {"name": "vimco", "num_particles": 4}
    tiny_raw["train"].update(limit=300, epochs=1)
    fit(Experiment.build(config_from_dict(tiny_raw)), RunDir(tmp_path), progress=False)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert {"epoch", "train_loss", "train_elbo", "train_iw_bound", "valid_elbo", "seconds"} <= set(rows[0])
    loss, elbo = float(rows[0]["train_loss"]), float(rows[0]["train_elbo"])
    assert -loss > elbo  # L_4 above the ELBO
    assert float(rows[0]["train_iw_bound"]) == pytest.approx(-loss, rel=1e-5)


def test_objective_state_is_checkpointed_and_restored(tiny_raw, tmp_path):
    """NVIL's baseline network and running moments survive a resume."""
    tiny_raw["data"]["binarization"] = "static"
    tiny_raw["prior"] = {"name": "bernoulli"}
    tiny_raw["guide"] = {"name": "bernoulli", "hidden": [32]}
    tiny_raw["objective"] = {"name": "nvil", "baseline_lr": 0.01}
    tiny_raw["train"].update(limit=300, epochs=1)
    experiment = Experiment.build(config_from_dict(tiny_raw))
    fit(experiment, RunDir(tmp_path), progress=False)
    saved = load_checkpoint(tmp_path / "checkpoint.pt")["objective"]
    assert int(saved["moments.count"]) == 3 and "baseline.net.0.weight" in saved
    tiny_raw["train"]["epochs"] = 2
    restored = Experiment.build(config_from_dict(tiny_raw))
    restored.objective.prepare(restored.data["train"].batch(slice(0, 2)))
    from pyro_vae.train import Trainer

    Trainer(restored, RunDir(tmp_path), load_checkpoint(tmp_path / "checkpoint.pt"))
    assert torch.equal(restored.objective.baseline.net[0].weight, saved["baseline.net.0.weight"])
    resumed = Experiment.build(config_from_dict(tiny_raw))
    resumed.objective.prepare(resumed.data["train"].batch(slice(0, 2)))
    before = resumed.objective.baseline.net[0].weight.detach().clone()
    fit(resumed, RunDir(tmp_path), load_checkpoint(tmp_path / "checkpoint.pt"), progress=False)
    assert int(resumed.objective.moments.count) == 6
    assert resumed.objective.context.step == 6  # 3 steps an epoch, counted across the resume
    assert not torch.allclose(before, saved["baseline.net.0.weight"])  # a fresh net differs from the saved one
    assert load_checkpoint(tmp_path / "checkpoint.pt")["optimizer"]["param_groups"][1]["lr"] == 0.01


class _PixelCount(Objective):
    """A test objective whose `elbo` metric is a known function of the data:
    the number of ones in each image, so the epoch mean is exact."""

    def __init__(self, model, guide):
        super().__init__(model, guide)
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        ones = x.reshape(x.shape[0], -1).sum(-1)
        return self.report((self.weight * ones).sum(), x.shape[0], elbo=ones)


OBJECTIVES.register("_pixel_count")(_PixelCount)


def test_epoch_metrics_are_means_over_datapoints_with_a_ragged_last_batch(tiny_raw, tmp_path):
    tiny_raw["data"]["binarization"] = "threshold"
    tiny_raw["objective"] = {"name": "_pixel_count"}
    tiny_raw["train"].update(limit=250, batch_size=100, epochs=1)  # batches of 100, 100, 50
    experiment = Experiment.build(config_from_dict(tiny_raw))
    history = fit(experiment, RunDir(tmp_path), progress=False)
    ones = experiment.data["train"].head(250).batch(slice(0, 250)).reshape(250, -1).sum(-1)
    assert history[0]["train_elbo"] == pytest.approx(ones.mean().item(), rel=1e-6)
