"""Name -> factory tables for the five kinds of parts an experiment names.

A part is registered with a decorator::

    @MODELS.register("mlp")
    class MLPDecoder(PyroModule): ...

The factory's signature *is* the schema of its config section: every parameter
that the engine does not supply itself (the ``context`` of the table, e.g. the
data's ``event_shape``) is an option the user may set, typed by its annotation
and defaulted by its default.  Unknown options, wrong types and unknown names
are reported with the valid choices.

The engine reaches the catalogue (:mod:`models`, :mod:`guides`) only through
:func:`load_catalogue`; a user adds a part by registering it in a module named
in the config's ``imports`` list.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable

import pydantic

from pyro_vae.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class Entry:
    """One registered factory."""

    name: str
    factory: Callable[..., Any]
    description: str
    options_schema: type[pydantic.BaseModel]


class Registry:
    """A table of named factories of one kind.

    :param kind: what the table holds ("model", "guide", ...), used in messages.
    :param context: parameter names the engine passes itself; they are not
        user options.
    :param deferred: parameter names passed later: :meth:`build` then returns
        the factory with every other argument bound, to be called with these
        (objectives: ``OBJECTIVES.build(name, options)(model, guide)``).
    :param optional: parameter names the engine passes only to factories that
        declare them (a prior built on the guide, as the VampPrior is; the
        data spec's keys); a factory that requires one the engine does not
        have is refused with a message naming it.
    """

    def __init__(self, kind: str, context: tuple[str, ...] = (), deferred: tuple[str, ...] = (),
                 optional: tuple[str, ...] = ()):
        self.kind = kind
        self.deferred = tuple(deferred)
        self.optional = frozenset(optional)
        self.context = frozenset(context) | frozenset(deferred) | self.optional
        self._entries: dict[str, Entry] = {}
        self._renamed: dict[str, str] = {}

    def rename(self, old: str, new: str) -> None:
        """Record that ``old`` is now called ``new``: configs naming ``old`` get
        an error that says so."""
        self._renamed[old] = new

    def register(self, name: str) -> Callable[[Callable], Callable]:
        """Decorator registering a class or function under ``name``."""

        def decorator(factory: Callable) -> Callable:
            if name in self._entries and self._entries[name].factory is not factory:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            doc = inspect.getdoc(factory) or ""
            self._entries[name] = Entry(
                name=name,
                factory=factory,
                description=doc.splitlines()[0] if doc else "",
                options_schema=self._options_schema(name, factory),
            )
            return factory

        return decorator

    def _options_schema(self, name: str, factory: Callable) -> type[pydantic.BaseModel]:
        target = factory.__init__ if inspect.isclass(factory) else factory
        hints = typing.get_type_hints(target)
        fields: dict[str, Any] = {}
        for param in inspect.signature(factory).parameters.values():
            if param.name in self.context or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            default = ... if param.default is inspect.Parameter.empty else param.default
            fields[param.name] = (hints.get(param.name, Any), default)
        return pydantic.create_model(
            f"{self.kind}:{name}", __config__=pydantic.ConfigDict(extra="forbid"), **fields
        )

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            if name in self._renamed:
                raise ConfigError(f"{self.kind} {name!r} is now called {self._renamed[name]!r}: "
                                  f"set `name = \"{self._renamed[name]}\"` in [{self.kind}]") from None
            raise ConfigError(
                f"unknown {self.kind} {name!r}.{did_you_mean(name, self._entries)} Registered {self.kind}s: "
                f"{', '.join(self.names())} (`pyro-vae list` describes each)."
            ) from None

    def validate(self, name: str, options: dict[str, Any]) -> dict[str, Any]:
        """Check ``options`` against the factory's signature; return them with
        defaults filled in."""
        entry = self.get(name)
        try:
            return entry.options_schema(**options).model_dump()
        except pydantic.ValidationError as exc:
            valid = ", ".join(entry.options_schema.model_fields) or "(none)"
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or '?'}: "
                + (f"unknown option.{did_you_mean(str(err['loc'][-1]), entry.options_schema.model_fields)}"
                   if err["type"] == "extra_forbidden" else err["msg"])
                for err in exc.errors()
            )
            raise ConfigError(
                f"[{self.kind}] {name!r}: {problems}. Options of {name!r}: {valid}."
            ) from None

    def accepts(self, name: str, parameter: str) -> bool:
        """Whether the factory registered as ``name`` takes ``parameter``."""
        return parameter in inspect.signature(self.get(name).factory).parameters

    def build(self, name: str, options: dict[str, Any], **context: Any) -> Any:
        """Call the factory with validated user options and engine context (or,
        for a table with ``deferred`` arguments, bind them and return the factory)."""
        entry = self.get(name)
        if self.optional:
            given = sorted(k for k in context if k in DATA_SPEC)
            context = {k: v for k, v in context.items() if k not in self.optional or self.accepts(name, k)}
            parameters = inspect.signature(entry.factory).parameters.values()
            missing = [p.name for p in parameters if p.name in self.optional and p.name not in context
                       and p.default is inspect.Parameter.empty]
            if missing:
                raise ConfigError(f"{self.kind} {name!r} needs {', '.join(missing)} from the data, which this "
                                  f"dataset does not give (its data spec: {', '.join(given) or 'nothing'}): pair it "
                                  f"with data of the modality it models")
        if self.deferred:
            return functools.partial(entry.factory, **self.validate(name, options), **context)
        return entry.factory(**self.validate(name, options), **context)


# A dataset's data spec (``dataset.spec``): what the parts need to know of the data, by modality.
# Images give ``event_shape``; text gives ``vocab_size``, ``pad_id``, ``max_length`` (and ``event_shape
# = (max_length,)``).  A part declares the keys it needs as parameters and gets only those.
DATA_SPEC = ("event_shape", "vocab_size", "pad_id", "max_length")

DATASETS = Registry("dataset", context=("device",))
PRIORS = Registry("prior", context=("latent_dim",), optional=("guide", *DATA_SPEC))
MODELS = Registry("model", context=("prior",), optional=DATA_SPEC)
GUIDES = Registry("guide", context=("latent_dim",), optional=DATA_SPEC)
OBJECTIVES = Registry("objective", deferred=("model", "guide"))

ALL = {"data": DATASETS, "prior": PRIORS, "model": MODELS, "guide": GUIDES, "objective": OBJECTIVES}

_CATALOGUE = ("pyro_vae.data.mnist", "pyro_vae.data.shapes", "pyro_vae.data.text", "pyro_vae.objectives", "models", "guides")


def load_catalogue(extra_modules: typing.Iterable[str] = ()) -> None:
    """Import the built-in catalogue and any user modules, registering their parts."""
    for module in (*_CATALOGUE, *extra_modules):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):
                raise ConfigError(
                    f"cannot import {module!r} named in `imports`: no such module on the Python path."
                ) from None
            raise
