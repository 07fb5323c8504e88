"""Named constructors of generators and segmenters (extension by registration).

``load_generator("sceneworld")`` and ``load_segmenter("sceneworld", device="cuda")`` look the name up
here and call the registered constructor with the options.  A new family registers itself with
``register_generator(name, constructor, description)``; the engine never changes.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Callable

__all__ = ["Registry", "GENERATORS", "SEGMENTERS", "UnknownNameError", "register_generator", "register_segmenter",
           "load_generator", "load_segmenter", "list_generators", "list_segmenters", "takes_option"]


class UnknownNameError(KeyError):
    """A generator or segmenter name that is not registered (the message lists the registered ones)."""

    def __str__(self):  # KeyError quotes its message; we want it plain
        return str(self.args[0])


@dataclass
class Entry:
    name: str
    constructor: Callable | str  # a callable, or "module:function" imported on first use
    description: str

    def resolve(self) -> Callable:
        if isinstance(self.constructor, str):
            mod, _, fn = self.constructor.partition(":")
            self.constructor = getattr(importlib.import_module(mod), fn)
        return self.constructor


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, constructor, description: str = "", overwrite: bool = False):
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise ValueError(f"a {self.kind} name must be a non-empty string without surrounding spaces, got {name!r}")
        if not (callable(constructor) or (isinstance(constructor, str) and ":" in constructor)):
            raise TypeError(f"the {self.kind} constructor for {name!r} must be callable or 'module:function', "
                            f"got {type(constructor).__name__}")
        if name in self._entries and not overwrite:
            raise ValueError(f"a {self.kind} named {name!r} is already registered; pass overwrite=True to replace it")
        self._entries[name] = Entry(name, constructor, description)

    def unregister(self, name: str):
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def describe(self) -> dict[str, str]:
        return {n: self._entries[n].description for n in self.names()}

    def __contains__(self, name):
        return name in self._entries

    def _entry(self, name) -> Entry:
        if name not in self._entries:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; registered {self.kind}s: "
                                   f"{', '.join(self.names()) or '(none)'}")
        return self._entries[name]

    def options(self, name: str) -> list[str] | None:
        """The keyword options the constructor of ``name`` takes (None: any, it takes ``**kwargs``)."""
        fn = self._entry(name).resolve()
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return None
        if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            return None
        return [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def takes(self, name: str, option: str) -> bool:
        """Whether the constructor of ``name`` takes ``option`` (True for one taking ``**kwargs``)."""
        opts = self.options(name)
        return opts is None or option in opts

    def load(self, name: str, /, **options):  # positional-only: a family may take a name= option
        fn = self._entry(name).resolve()
        known = self.options(name)
        if known is not None:
            unknown = sorted(set(options) - set(known))
            if unknown:
                raise TypeError(f"{self.kind} {name!r} does not take option(s) {unknown}; "
                                f"it takes: {', '.join(known) or '(none)'}")
        return fn(**options)


GENERATORS = Registry("generator")
SEGMENTERS = Registry("segmenter")


def register_generator(name, constructor, description="", overwrite=False):
    GENERATORS.register(name, constructor, description, overwrite)


def register_segmenter(name, constructor, description="", overwrite=False):
    SEGMENTERS.register(name, constructor, description, overwrite)


def _builtins():
    # Imported for their registrations; each family module registers itself lazily by path.
    import gandissect_widgets.models  # noqa: F401
    import gandissect_widgets.segmenters  # noqa: F401


def load_generator(name: str = "sceneworld", /, **options):
    """A generator by registered name; options go to its constructor (``checkpoint=PATH``, ``device=``)."""
    _builtins()
    return GENERATORS.load(name, **options)


def load_segmenter(name: str = "sceneworld", /, **options):
    """A segmenter by registered name; options go to its constructor."""
    _builtins()
    return SEGMENTERS.load(name, **options)


def takes_option(kind: str, name: str, option: str) -> bool:
    """Whether the registered ``kind`` ("generator" or "segmenter") ``name`` takes ``option``."""
    _builtins()
    return (GENERATORS if kind == "generator" else SEGMENTERS).takes(name, option)


def list_generators() -> dict[str, str]:
    _builtins()
    return GENERATORS.describe()


def list_segmenters() -> dict[str, str]:
    _builtins()
    return SEGMENTERS.describe()
