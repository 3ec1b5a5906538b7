"""Training: it learns, checkpoints every epoch, resumes, and fails clearly."""
import pytest
import torch

from pyro_vae.checkpoint import load_checkpoint
from pyro_vae.config import config_from_dict
from pyro_vae.errors import CheckpointError, ConfigError, DataError, TrainingDivergedError
from pyro_vae.evaluate import mean_elbo
from pyro_vae.experiment import Experiment
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
    history = fit(resumed, RunDir(tmp_path / "b"), progress=False)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5)


def test_corrupt_checkpoint_is_reported(tiny_raw, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt or not a pyro-vae checkpoint"):
        fit(Experiment.build(config_from_dict(tiny_raw)), RunDir(tmp_path), progress=False)


def test_checkpoint_cannot_run_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this would run",))

    torch.save({"model": Payload(), "guide": {}, "optimizer": {}, "epoch": 1}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="corrupt or not a pyro-vae checkpoint"):
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
    with pytest.raises(TrainingDivergedError, match=r"NaN or infinite at epoch 2.*epoch 1 .* is intact.*train.lr"):
        fit(experiment, RunDir(tmp_path), progress=False)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


def test_gray_data_with_a_bernoulli_likelihood_is_refused(tiny_raw):
    tiny_raw["data"]["binarization"] = "none"
    with pytest.raises(DataError, match=r"outside the support.*Set data.binarization to 'dynamic'"):
        Experiment.build(config_from_dict(tiny_raw))


def test_run_dir_of_another_experiment_is_not_overwritten(tiny_raw, tmp_path):
    RunDir(tmp_path).prepare(config_from_dict(tiny_raw))
    tiny_raw["model"]["latent_dim"] = 3
    with pytest.raises(ConfigError, match="holds a different experiment.*--overwrite"):
        RunDir(tmp_path).prepare(config_from_dict(tiny_raw))
    RunDir(tmp_path).prepare(config_from_dict(tiny_raw), overwrite=True)


def test_cuda_device_is_refused_without_cuda(tiny_raw):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    tiny_raw["train"]["device"] = "cuda"
    with pytest.raises(ConfigError, match="no CUDA device"):
        Experiment.build(config_from_dict(tiny_raw))
