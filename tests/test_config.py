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
    assert config.objective.options == {"num_particles": 1}
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
        ("train", "epoch", 3, r"train.epoch: unknown key"),
        ("model", "hiden", [10], r"hiden: unknown option.*Options of 'mlp': latent_dim, hidden, activation"),
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
    tiny_raw["optimiser"] = {}
    with pytest.raises(ConfigError, match="unknown section"):
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


def test_same_experiment_ignores_epochs_and_eval(tiny_raw):
    a = config_from_dict(tiny_raw)
    tiny_raw["train"]["epochs"] = 9
    tiny_raw["eval"]["iw_samples"] = 7
    assert a.same_experiment(config_from_dict(tiny_raw))
    tiny_raw["train"]["lr"] = 0.1
    assert not a.same_experiment(config_from_dict(tiny_raw))
