"""Name -> class registries. A class registers itself where it is defined, with a
decorator; a config may also name a class from the user's own package by its import
path (``name: mypackage.losses.ScaledKD``), so adding one needs no edit to kdrun."""

from __future__ import annotations

import importlib
import inspect

from kdrun.checks import Check
from kdrun.errors import ConfigError


class Registry:
    """Named classes (``base`` given: each must subclass it) or builder functions."""

    def __init__(self, kind: str, base: type | None = None, hidden: tuple[str, ...] = ()):
        self.kind, self.base, self.hidden = kind, base, hidden  # hidden: not for configs
        self._classes: dict[str, object] = {}
        self._rules: dict[str, dict[str, Check]] = {}

    def register(self, name: str, rules: dict[str, Check] | None = None):
        """Decorator: ``@LOSSES.register("kd")`` on a class (its ``config_rules`` check
        its keys), ``@MODELS.register("mlp", rules={...})`` on a builder function."""
        def add(thing):
            if name in self._classes:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._classes[name] = thing
            self._rules[name] = rules or {}
            return thing
        return add

    def rules(self, name: str) -> dict[str, Check]:
        """The checks an option declares for its keys (none for an imported one, whose
        keys are still checked against its signature)."""
        if self.base is not None:  # classes: declared on the class, inherited
            return self.get(name, "name").config_rules
        return self._rules.get(name, {})

    def arguments(self, name: str, key: str, given: tuple[str, ...] = ()) -> dict:
        """The keyword arguments the option takes from its config: name -> Parameter.
        ``given`` are passed by kdrun itself (e.g. a model's input shape)."""
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        return {n: p for n, p in inspect.signature(self.get(name, key)).parameters.items()
                if p.kind not in variadic and n not in given}

    def names(self) -> list[str]:
        return sorted(n for n in self._classes if n not in self.hidden)

    def get(self, name: str, key: str):
        """The class registered as ``name``, or imported from the dotted path ``name``;
        ``key`` (e.g. ``loss.name``) names the config key in errors."""
        if name in self._classes and name not in self.hidden:
            return self._classes[name]
        module, _, attribute = name.rpartition(".")
        what = "class" if self.base is not None else "builder function"
        valid = f"one of {', '.join(self.names())}, or a {what}'s import path"
        if not module:
            raise ConfigError(key, name, f"not a known {self.kind}; valid: {valid}")
        try:
            cls = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as e:
            raise ConfigError(key, name, f"cannot import it ({e}); valid: {valid}") from e
        if self.base is None and not callable(cls):
            raise ConfigError(key, name, f"not a {self.kind} builder (a function)")
        if self.base is not None and not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise ConfigError(key, name, f"not a subclass of {self.base.__module__}."
                                         f"{self.base.__name__}")
        return cls
