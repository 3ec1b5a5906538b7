import pathlib

import pytest

from pyro_vae.config import config_from_dict, load_config, parse_override, save_config
from pyro_vae.errors import ConfigError

CONFIGS = sorted(pathlib.Path(__file__).parent.parent.glob("configs/*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    config = load_config(path)
    assert config.model.options["latent_dim"] > 0


def test_defaults_are_filled_in(tiny_raw):
    config = config_from_dict(tiny_raw)
    assert config.objective.options == {"num_particles": 1, "kl_weight": 1.0, "kl_annealing": "none",
                                        "anneal_steps": 10_000, "cycles": 4, "cycle_ratio": 0.5, "free_bits": 0.0,
                                        "free_bits_per": "dimension", "aggressive": False, "inner_steps": 100,
                                        "mi_datapoints": 2000, "mi_every": 0}
    assert config.data.options["binarization_seed"] == 0


def test_save_and_load_round_trip(tiny_raw, tmp_path):
    config = config_from_dict(tiny_raw)
    save_config(config, tmp_path / "c.toml")
    assert load_config(tmp_path / "c.toml") == config


@pytest.mark.parametrize(
    "text,path,value",
    [
        ("train.epochs=3", ["train", "epochs"], 3),
        ("train.lr=3e-4", ["train", "lr"], 3e-4),
        ("model.hidden=[10, 20]", ["model", "hidden"], [10, 20]),
        ("train.device=cpu", ["train", "device"], "cpu"),
        ('data.path="/x y"', ["data", "path"], "/x y"),
    ],
)
def test_parse_override(text, path, value):
    assert parse_override(text) == (path, value)


def test_overrides_apply(tmp_path):
    config = load_config(CONFIGS[0], ["train.epochs=3", "model.hidden=[10]"])
    assert config.train.epochs == 3 and config.model.options["hidden"] == [10]


@pytest.mark.parametrize(
    "section,key,value,message",
    [
        ("train", "epoch", 3, r"train.epoch: unknown key. Did you mean 'epochs'\? Keys of \[train\]: epochs, "
                              r"batch_size, lr, device, seed, limit, checkpoint_minutes"),
        ("eval", "samples", 3, r"eval.samples: unknown key. Did you mean 'iw_samples'\? Keys of \[eval\]: iw_samples"),
        ("train", "batch_size", 0, r"train.batch_size: Input should be greater than or equal to 1"),
        ("eval", "chunk_size", 0, r'eval.chunk_size: should be "auto" or an integer >= 1, not 0'),
        ("eval", "chunk_size", "big", r'eval.chunk_size: should be "auto" or an integer >= 1'),
        ("model", "hiden", [10], r"hiden: unknown option. Did you mean 'hidden'\?.*Options of 'mlp': latent_dim, "
                                 r"hidden, activation"),
        ("model", "activation", "sigmoid", r"activation: Input should be 'tanh'"),
        ("train", "lr", "fast", r"train.lr: Input should be a valid number"),
        ("train", "lr", -1.0, r"train.lr: Input should be greater than 0"),
        ("model", "name", "mlpp", r"unknown model 'mlpp'. Did you mean 'mlp'\?"),
        ("model", "name", "gaussian", r"model 'gaussian' is now called 'mlp'"),
        ("objective", "name", "elbo", r"unknown objective .elbo.*meanfield_elbo, nvil"),
        ("data", "binarization", "soft", r"binarization: Input should be 'dynamic'"),
    ],
)
def test_bad_config_names_the_problem(tiny_raw, section, key, value, message):
    tiny_raw[section][key] = value
    with pytest.raises(ConfigError, match=message):
        config_from_dict(tiny_raw)


def test_missing_and_unknown_sections(tiny_raw):
    del tiny_raw["guide"]
    with pytest.raises(ConfigError, match=r"missing section \[guide\]"):
        config_from_dict(tiny_raw)
    tiny_raw["guide"] = {"name": "normal"}
    tiny_raw["objectives"] = {}
    with pytest.raises(ConfigError, match=r"unknown section \[objectives\]. Did you mean 'objective'\?"):
        config_from_dict(tiny_raw)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[model\nname=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(CONFIGS[0], ["epochs"])


def test_user_parts_registered_through_imports(tiny_raw):
    tiny_raw["imports"] = ["linear_gaussian"]
    tiny_raw["model"] = {"name": "linear_gaussian", "latent_dim": 2}
    assert config_from_dict(tiny_raw).model.name == "linear_gaussian"
    tiny_raw["imports"] = ["no_such_module_xyz"]
    with pytest.raises(ConfigError, match="cannot import 'no_such_module_xyz'"):
        config_from_dict(tiny_raw)
    for path in ("lab/priors.py", "lab.priors-v2", "my parts"):  # the whole name must be a dotted module name
        tiny_raw["imports"] = [path]
        with pytest.raises(ConfigError, match="not file paths"):
            config_from_dict(tiny_raw)


def test_the_experiment_is_the_parts_and_the_data_path_not_the_settings(tiny_raw):
    """lr, epochs, device, checkpoint/divergence settings and evaluation may
    change on resume; the parts, seed, batch size and limit may not."""
    a = config_from_dict(tiny_raw)
    tiny_raw["train"].update(epochs=9, lr=0.1, device="auto", checkpoint_minutes=1, max_bad_steps=3)
    tiny_raw["eval"]["iw_samples"] = 7
    b = config_from_dict(tiny_raw)
    assert a.experiment_differences(b) == []
    assert a.setting_changes(b) == [
        "eval.iw_samples: 20 -> 7", "train.checkpoint_minutes: 10.0 -> 1.0", "train.device: 'cpu' -> 'auto'",
        "train.epochs: 1 -> 9", "train.lr: 0.003 -> 0.1", "train.max_bad_steps: 0 -> 3"]
    for key, value in (("seed", 1), ("batch_size", 50), ("limit", 10)):
        changed = config_from_dict({**tiny_raw, "train": {**tiny_raw["train"], key: value}})
        assert a.experiment_differences(changed) == [f"train.{key}: {getattr(a.train, key)!r} -> {value!r}"]
    tiny_raw["guide"]["hidden"] = [32]
    assert a.experiment_differences(config_from_dict(tiny_raw)) == ["guide.hidden: [64] -> [32]"]
