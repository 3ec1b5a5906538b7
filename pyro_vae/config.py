"""Experiment configs: a TOML file, validated, with dotted command-line overrides.

A config has five *component* sections, each naming a registered part and
setting its options, and two fixed sections::

    imports = []                 # optional: modules that register your own parts

    [data]       name = "mnist"           binarization = "dynamic"
    [model]      name = "mlp"             latent_dim = 50   hidden = [200, 200]
    [prior]      name = "standard_normal"
    [guide]      name = "normal"          hidden = [200, 200]
    [objective]  name = "meanfield_elbo"  num_particles = 1
    [train]      epochs = 10  batch_size = 100  lr = 1e-3  device = "auto"  seed = 0
    [eval]       iw_samples = 1000  chunk_size = "auto"  batch_size = 100  split = "test"

A component's options are checked against its factory's signature (see
:mod:`pyro_vae.registry`); ``train`` and ``eval`` are checked here.  Every
problem is reported as a :class:`~pyro_vae.errors.ConfigError` naming the key,
with the valid keys and the closest one to a misspelt key.

The *experiment* is what a run directory holds: the data, model, prior, guide
and objective, the imports, and the training seed, batch size and limit (they
fix the path through the data).  Everything else -- the learning rate, epochs,
device, checkpoint and divergence settings, the evaluation -- may change when a
run is resumed (:data:`RESUMABLE_TRAIN_KEYS`).
"""
from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Union

import pydantic
import tomli_w
from pydantic import BaseModel, ConfigDict, Field

from pyro_vae import registry
from pyro_vae.errors import ConfigError, did_you_mean

COMPONENTS = ("data", "model", "prior", "guide", "objective")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Component(_Strict):
    """A registered part chosen by ``name`` with its validated ``options``."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=0, description="passes over the training split")
    batch_size: int = Field(100, ge=1)
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    limit: Optional[int] = Field(None, ge=1, description="train on the first N training images")
    checkpoint_minutes: float = Field(10.0, ge=0, description="minutes between checkpoints inside an epoch (0: every step)")
    max_bad_steps: int = Field(0, ge=0, description="batches with a non-finite loss or gradient skipped before stopping")
    divergence_factor: float = Field(
        100.0, gt=0, description="stop when the loss exceeds its running mean by this many times its size (inf: never)")
    tensorboard: Optional[bool] = Field(None, description="write TensorBoard event files (default: when installed)")
    lr_schedule: Literal["constant", "burda", "cosine"] = Field(
        "constant", description="constant | burda (10^(-i/7) for 3^i epochs) | cosine (to 0 over train.epochs)")
    warmup_steps: int = Field(0, ge=0, description="steps of linear learning-rate warm-up")
    compile: bool = Field(False, description="run the training step through torch.compile, whole: the loss, its "
                                             "gradient, the NaN check and the Adam update in one graph "
                                             "(pyro_vae.compiled_step; the loss alone where that cannot be had)")
    direct_traces: bool = Field(True, description="build the traces of a one-latent model and a distribution guide "
                                                  "from their distributions, without Pyro's handlers (the same "
                                                  "traces and draws; false: always Pyro's)")
    latent_diagnostics: int = Field(0, ge=0, description="after each epoch, I(x; z), active units and KL over the "
                                                         "first N valid datapoints (0: none)")


RESUMABLE_TRAIN_KEYS = frozenset(
    {"epochs", "lr", "device", "checkpoint_minutes", "max_bad_steps", "divergence_factor", "tensorboard",
     "lr_schedule", "warmup_steps", "compile", "direct_traces", "latent_diagnostics"})


MatmulPrecision = Literal["ieee", "tf32", "bf16"]  # eval.matmul_precision (pyro_vae.evaluate.float32_matmul_precision)


class EvalConfig(_Strict):
    iw_samples: int = Field(1000, ge=0, description="K in the importance-sampled log-likelihood (0: no IS "
                                                    "evaluation after training, as a point-estimate guide needs)")
    chunk_size: Union[int, str] = Field(
        "auto", description='samples drawn at once (bounds memory); "auto": sized for the device')
    batch_size: int = Field(100, ge=1, description="datapoints evaluated at once")
    split: Literal["train", "valid", "test"] = "test"
    limit: Optional[int] = Field(None, ge=1, description="evaluate the first N datapoints")
    decompose: bool = Field(False, description="also split the KL into index-code MI, total correlation, "
                                               "dimension-wise KL (and MIG where the data have factors)")
    compile: bool = Field(False, description="run each chunk's log weights through torch.compile, whole "
                                             "(7-20 s for the first chunk shape, one dynamic-shape recompile "
                                             "for any other; pyro_vae.evaluate)")
    matmul_precision: MatmulPrecision = Field(
        "ieee", description='the float32 matrix products\' operands: "ieee" float32; "bf16" (CPUs) rounded to '
                            'bfloat16, about twice the throughput with AMX, the IS NLL within ~0.01 nats; '
                            '"tf32" (GPUs) rounded to TF32')

    @pydantic.field_validator("chunk_size", mode="before")
    @classmethod
    def _auto_or_positive(cls, value: Any) -> Union[int, str]:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f'should be "auto" or an integer >= 1, not {value!r}')


class ExperimentConfig(_Strict):
    imports: tuple[str, ...] = ()
    data: Component
    model: Component
    prior: Component
    guide: Component
    objective: Component
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    def to_toml_dict(self) -> dict[str, Any]:
        """The flat TOML form (``name`` beside the options) that :func:`load_config` reads."""
        out: dict[str, Any] = {"imports": list(self.imports)} if self.imports else {}
        for section in COMPONENTS:
            part: Component = getattr(self, section)
            out[section] = {"name": part.name, **_drop_none(part.options)}
        out["train"] = _drop_none(self.train.model_dump())
        out["eval"] = _drop_none(self.eval.model_dump())
        return out

    def experiment_key(self) -> dict[str, Any]:
        """The flat ``{"section.key": value}`` of what defines the experiment
        (everything but the evaluation and :data:`RESUMABLE_TRAIN_KEYS`)."""
        flat = _flatten({k: v for k, v in self.to_toml_dict().items() if k != "eval"})
        flat.setdefault("imports", [])
        return {k: v for k, v in flat.items() if k.removeprefix("train.") not in RESUMABLE_TRAIN_KEYS}

    def experiment_differences(self, other: "ExperimentConfig") -> list[str]:
        """``"model.latent_dim: 50 -> 20"`` for each experiment-defining value
        that differs from ``self`` to ``other`` (empty: the same experiment)."""
        mine, theirs = self.experiment_key(), other.experiment_key()
        return [f"{key}: {mine.get(key, '(unset)')!r} -> {theirs.get(key, '(unset)')!r}"
                for key in sorted(set(mine) | set(theirs)) if mine.get(key) != theirs.get(key)]

    def setting_changes(self, other: "ExperimentConfig") -> list[str]:
        """Like :meth:`experiment_differences`, for the settings that may change on resume."""
        mine, theirs = _flatten(self.to_toml_dict()), _flatten(other.to_toml_dict())
        keys = sorted(k for k in set(mine) | set(theirs) if k not in self.experiment_key() and k not in other.experiment_key())
        return [f"{key}: {mine.get(key, '(unset)')!r} -> {theirs.get(key, '(unset)')!r}"
                for key in keys if mine.get(key) != theirs.get(key)]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not prefix:
            out.update(_flatten(value, f"{key}."))
        else:
            out[prefix + key] = value
    return out


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.epochs=3"`` -> (["train", "epochs"], 3); the value is read as a
    TOML value (numbers, booleans, lists, quoted strings) or else as a bare string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form section.key=value (e.g. train.epochs=3)")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return raw


def config_from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a raw (TOML-shaped) dict into an :class:`ExperimentConfig`."""
    raw = dict(raw)
    imports = raw.get("imports", [])
    if not isinstance(imports, list) or not all(isinstance(m, str) and MODULE_NAME.fullmatch(m) for m in imports):
        raise ConfigError(f"`imports` must be a list of module names such as \"my_parts\" or \"lab.priors\" "
                          f"(not file paths); got {imports!r}")
    registry.load_catalogue(imports)
    known = {"imports", "train", "eval", *COMPONENTS}
    for section in sorted(set(raw) - known):
        raise ConfigError(f"unknown section [{section}].{did_you_mean(section, known)} "
                          f"A config has sections {', '.join(sorted(known - {'imports'}))} and `imports`.")
    for section in COMPONENTS:
        if section not in raw:
            raise ConfigError(f"missing section [{section}]; it needs at least `name = ...` "
                              f"(one of: {', '.join(registry.ALL[section].names())})")
        options = dict(raw[section])
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"[{section}] needs `name = \"...\"`, one of: {', '.join(registry.ALL[section].names())}")
        raw[section] = {"name": name, "options": registry.ALL[section].validate(name, options)}
    try:
        return ExperimentConfig(**raw)
    except pydantic.ValidationError as exc:
        raise ConfigError(f"invalid config: {'; '.join(map(_describe, exc.errors()))}") from None


_FIXED_SECTIONS = {"train": TrainConfig, "eval": EvalConfig}
MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _describe(error: dict) -> str:
    """One pydantic error as ``train.lrr: unknown key. Did you mean 'lr'? Keys of [train]: ...``."""
    loc = ".".join(map(str, error["loc"]))
    section = _FIXED_SECTIONS.get(str(error["loc"][0]))
    if error["type"] == "extra_forbidden" and section is not None and len(error["loc"]) == 2:
        valid = section.model_fields
        return (f"{loc}: unknown key.{did_you_mean(str(error['loc'][1]), valid)} "
                f"Keys of [{error['loc'][0]}]: {', '.join(valid)}")
    if error["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    return f"{loc}: " + error["msg"].removeprefix("Value error, ")  # a validator's own message


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Read a TOML experiment file, apply ``section.key=value`` overrides, validate."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return config_from_dict(apply_overrides(raw, overrides))


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(tomli_w.dumps(config.to_toml_dict()))
