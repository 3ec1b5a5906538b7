import pytest
import torch

from pyro_vae import registry

registry.load_catalogue()


@pytest.fixture(autouse=True)
def _seed():
    import pyro

    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield


TINY = {
    "data": {"name": "mnist", "binarization": "dynamic"},
    "model": {"name": "mlp", "latent_dim": 8, "hidden": [64], "activation": "relu"},
    "prior": {"name": "standard_normal"},
    "guide": {"name": "normal", "hidden": [64], "activation": "relu"},
    "objective": {"name": "meanfield_elbo"},
    "train": {"epochs": 1, "batch_size": 100, "lr": 3e-3, "device": "cpu", "limit": 1000},
    "eval": {"iw_samples": 20, "chunk_size": 10, "batch_size": 50, "limit": 100},
}


@pytest.fixture
def tiny_raw():
    """A raw config (TOML-shaped dict) of a small VAE on a 1000-image MNIST subset."""
    import copy

    return copy.deepcopy(TINY)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
