"""Named constructors of generators and segmenters (extension by registration), and plug-ins.

``load_generator("sceneworld")`` and ``load_segmenter("sceneworld", device="cuda")`` find the
constructor and call it with the options.  A name is looked up, in this order, among
- registrations: ``register_generator(name, constructor, description)`` (the built-in families too);
- plug-ins: installed packages declare ``name = package.module:factory`` in the entry-point groups
  ``gandissect_widgets.generators`` / ``gandissect_widgets.segmenters``; each is imported only when
  used, and one that fails is named in a one-line ``PluginError`` without touching the others;
- import paths: ``package.module:factory`` itself (imported with the current directory on
  ``sys.path``, as ``python -m`` has it; never evaluated as text).
The engine never changes for a new family.

A model the registry makes carries its recipe (``recipe(model)``: the name, where it comes from, the
checkpoint), so ``recorded_models(G, S)`` tells a result how to load its models again, in the
structure the command line writes into ``dissect.json``'s ``settings["models"]``.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import inspect
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable

__all__ = ["Registry", "GENERATORS", "SEGMENTERS", "UnknownNameError", "PluginError", "register_generator",
           "register_segmenter", "load_generator", "load_segmenter", "load_model", "list_generators", "list_segmenters",
           "takes_option", "is_import_path", "import_object", "refuse_code_inside", "recorded_models",
           "models_in_settings", "model_to_load", "models_to_load", "recipe", "origin", "list_models"]

PLUGIN_GROUPS = {"generator": "gandissect_widgets.generators", "segmenter": "gandissect_widgets.segmenters"}
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class UnknownNameError(KeyError):
    """A generator or segmenter name that is not registered (the message lists the registered ones)."""

    def __str__(self):  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class PluginError(ImportError):
    """A plug-in or an import path that cannot be loaded (the message names it, and why)."""


def is_import_path(name) -> bool:
    """Whether ``name`` is meant as ``package.module:factory`` (it has a colon)."""
    return isinstance(name, str) and ":" in name


@contextlib.contextmanager
def _cwd_on_path():
    """The current directory on ``sys.path`` for the duration, as ``python -m`` puts it there."""
    cwd = os.getcwd()
    if "" in sys.path or cwd in sys.path:
        yield
        return
    sys.path.insert(0, cwd)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(cwd)


def _first_line(e) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def import_object(spec: str, what: str = "import path"):
    """The callable ``package.module:attr[.attr]`` names: its module imported, never text evaluated.

    ``what`` starts the messages (e.g. "generator").  A malformed path, a missing module or
    attribute, a module that fails to import and a non-callable are each a one-line ``PluginError``."""
    if not isinstance(spec, str) or not _IMPORT_PATH.match(spec):
        raise PluginError(f"{what} {spec!r} is not an import path: write package.module:factory (dotted Python "
                          f"names, one colon before the callable)")
    modname, _, attr = spec.partition(":")
    with _cwd_on_path():
        try:
            obj = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name and (modname == e.name or modname.startswith(e.name + ".")):
                raise PluginError(f"{what} {spec!r}: no module named {e.name!r} in the current directory "
                                  f"({os.getcwd()}) or the installed packages; check its name, or run from the "
                                  f"folder that holds {e.name.split('.')[0]}.py") from None
            raise PluginError(f"{what} {spec!r}: importing {modname} failed: {_first_line(e)}") from e
        except Exception as e:  # a module that raises while importing (SyntaxError too)
            raise PluginError(f"{what} {spec!r}: importing {modname} failed: {_first_line(e)}") from e
    owner = modname
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None)))
            shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
            raise PluginError(f"{what} {spec!r}: {owner} has no attribute {part!r}; callables in it: "
                              f"{shown or '(none)'}")
        obj, owner = getattr(obj, part), f"{owner}.{part}"
    if not callable(obj):
        raise PluginError(f"{what} {spec!r} is a {type(obj).__name__}, not callable; name a function or class "
                          f"that returns the model")
    return obj


def name_it(kind: str, spec: str, style: str = "cli") -> str:
    """How a user names the ``kind`` ``spec`` themselves: ``--generator X`` (cli) or ``generator='X'`` (python)."""
    return f"--{kind} {spec}" if style == "cli" else f"{kind}={spec!r}"


def refuse_code_inside(spec, directory, what: str = "model", style: str = "cli"):
    """Raise ``PluginError`` if the import path ``spec`` (read from a result in ``directory``) names a
    module that lies inside ``directory``: code that arrives with a result is never imported on its
    word.  Only finds the top-level module's file; runs nothing.  ``style`` words the advice for the
    command line ("cli") or the Python API ("python")."""
    import importlib.machinery
    if not is_import_path(spec):
        return
    top = spec.partition(":")[0].split(".")[0]
    if top in sys.modules:
        return
    found = importlib.machinery.PathFinder.find_spec(top, [os.getcwd()] + [p or os.getcwd() for p in sys.path])
    where = getattr(found, "origin", None) or next(iter(getattr(found, "submodule_search_locations", None) or []), None)
    if where and os.path.realpath(where).startswith(os.path.join(os.path.realpath(directory), "")):
        raise PluginError(f"{directory}/dissect.json names the {what} {spec!r}, whose module {top} lies inside that "
                          f"result directory ({where}): code that comes with a result is not imported on its word; "
                          f"if you trust it, name it yourself ({name_it(what, spec, style)})")


def recorded_models(generator, segmenter) -> dict | None:
    """How to load ``generator`` and ``segmenter`` again, as the command line records it in a result's
    ``settings["models"]``: {kind: {"name", "from", "where", ["package",] "checkpoint", "trust_pickle"}}
    for each one the registry made (``load_generator``, ``load_segmenter``, ``load_model``), None when
    neither came from it (a module built in Python, a model wrapped or made with other options).
    ``models_in_settings`` reads a result's record."""
    out = {kind: recipe(model) for kind, model in (("generator", generator), ("segmenter", segmenter))}
    out = {kind: r for kind, r in out.items() if r is not None}
    return out or None


def recipe(model) -> dict | None:
    """The recipe the registry attached to ``model`` when it made it (a copy), or None."""
    r = getattr(model, RECIPE_ATTRIBUTE, None) if model is not None else None
    return dict(r) if isinstance(r, dict) else None


RECIPE_ATTRIBUTE = "_gandissect_recipe"
RECORDABLE_OPTIONS = {"device", "checkpoint", "trust_pickle"}  # what a result's record can say again


def _attach_recipe(model, origin: dict, options: dict):
    """Give ``model`` the recipe of ``options`` when they can be recorded: a checkpoint given as a path
    (kept absolute), and no other options than the device and trust; else leave it without one."""
    ckpt = options.get("checkpoint")
    if set(options) - RECORDABLE_OPTIONS or not (ckpt is None or isinstance(ckpt, (str, os.PathLike))):
        with contextlib.suppress(Exception):
            setattr(model, RECIPE_ATTRIBUTE, None)  # a stale recipe of an earlier call must not stay
        return
    r = dict(origin, checkpoint=os.path.abspath(os.fspath(ckpt)) if ckpt is not None else None,
             trust_pickle=bool(options.get("trust_pickle", False)))
    with contextlib.suppress(Exception):  # a model that takes no attributes simply has no recipe
        setattr(model, RECIPE_ATTRIBUTE, r)


def models_in_settings(settings) -> dict:
    """{kind: {"name", "checkpoint"}} that a result's settings record for loading its models again
    (``settings["models"]``, written by the command line; older results give only their names)."""
    if not isinstance(settings, dict):
        return {}
    recorded = settings.get("models") if isinstance(settings.get("models"), dict) else {}
    out = {}
    for kind in ("generator", "segmenter"):
        r = recorded.get(kind) if isinstance(recorded.get(kind), dict) else {}
        name = r.get("name") or settings.get(kind)
        if isinstance(name, str) and name:
            ckpt = r.get("checkpoint")
            out[kind] = {"name": name, "checkpoint": ckpt if isinstance(ckpt, str) and ckpt else None}
    return out


def model_to_load(kind: str, settings, directory, name=None, checkpoint=None, default=None,
                  style: str = "cli") -> tuple:
    """(name, checkpoint) of the ``kind`` to load for the result in ``directory``: the one given, else the
    one it records (with its checkpoint unless another is given), else ``default``.  A recorded import
    path whose module lies inside ``directory`` raises ``PluginError`` (advice worded for ``style``)."""
    r = models_in_settings(settings).get(kind, {})
    if name is None and r.get("name"):
        refuse_code_inside(r["name"], directory, kind, style)
    name = name or r.get("name") or default
    if checkpoint is None and name == r.get("name"):
        checkpoint = r.get("checkpoint")
    return name, checkpoint


def models_to_load(settings, directory, generator=None, checkpoint=None, segmenter=None, segmenter_checkpoint=None,
                   default=None, style: str = "cli") -> dict:
    """{"generator": (name, checkpoint), "segmenter": (name, checkpoint)}: ``model_to_load`` of each."""
    return {kind: model_to_load(kind, settings, directory, name, ckpt, default, style)
            for kind, name, ckpt in (("generator", generator, checkpoint),
                                     ("segmenter", segmenter, segmenter_checkpoint))}


@dataclass
class Entry:
    name: str
    constructor: object  # a callable, "module:function" (built-in, imported on first use) or an EntryPoint
    description: str
    origin: str = "registered"  # "registered", "entry point" or "import path"
    package: str | None = None  # the distribution that declares an entry point ("name version")

    def __post_init__(self):
        self.builtin = isinstance(self.constructor, str) and self.constructor.startswith("gandissect_widgets.")

    def where(self) -> str:
        """Where the constructor comes from, in words."""
        if self.origin == "entry point":
            ep = self.constructor
            return f"entry point {ep.name} = {ep.value} of package {self.package}"
        if self.origin == "import path":
            return f"import path {self.name}"
        if self.builtin:
            return "built in"
        return "registered in Python"

    def resolve(self, kind: str) -> Callable:
        if self.origin == "import path":
            return import_object(self.name, kind)
        if self.origin == "entry point":
            ep = self.constructor
            try:
                fn = ep.load()
            except Exception as e:
                raise PluginError(f"{kind} {self.name!r} of plug-in package {self.package} ({ep.group}: "
                                  f"{ep.name} = {ep.value}) cannot be loaded: {_first_line(e)}; fix or uninstall "
                                  f"that package") from e
            if not callable(fn):
                raise PluginError(f"{kind} {self.name!r} of plug-in package {self.package} ({ep.value}) is a "
                                  f"{type(fn).__name__}, not callable; the entry point must name a factory")
            return fn
        if isinstance(self.constructor, str):
            mod, _, fn = self.constructor.partition(":")
            self.constructor = getattr(importlib.import_module(mod), fn)
        return self.constructor


class Registry:
    def __init__(self, kind: str, group: str | None = None):
        self.kind = kind
        self.group = group
        self._entries: dict[str, Entry] = {}
        self._plugin_cache: tuple | None = None  # (sys.path it was read under, {name: Entry}, [not used])

    def register(self, name: str, constructor, description: str = "", overwrite: bool = False):
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise ValueError(f"a {self.kind} name must be a non-empty string without surrounding spaces, got {name!r}")
        if ":" in name:
            raise ValueError(f"a {self.kind} name cannot hold ':' ({name!r}): names with a colon are import paths")
        if not (callable(constructor) or (isinstance(constructor, str) and ":" in constructor)):
            raise TypeError(f"the {self.kind} constructor for {name!r} must be callable or 'module:function', "
                            f"got {type(constructor).__name__}")
        if name in self._entries and not overwrite:
            raise ValueError(f"a {self.kind} named {name!r} is already registered; pass overwrite=True to replace it")
        self._entries[name] = Entry(name, constructor, description)

    def unregister(self, name: str):
        self._entries.pop(name, None)

    def plugins(self) -> dict[str, Entry]:
        """The installed packages' entry points of this kind, by name (read again when sys.path changes)."""
        return self._read_plugins()[1]

    def _read_plugins(self):
        key = tuple(sys.path)
        if self._plugin_cache is None or self._plugin_cache[0] != key:
            found, unused = {}, []
            if self.group:
                try:
                    eps = importlib.metadata.entry_points(group=self.group)
                except Exception:  # unreadable metadata of some package: no plug-ins rather than no registry
                    eps = []
                for ep in eps:
                    dist = getattr(ep, "dist", None)
                    package = f"{dist.name} {dist.version}" if dist is not None else "(unknown package)"
                    entry = Entry(ep.name, ep, "", "entry point", package)
                    if ep.name in found or ":" in ep.name:
                        unused.append(entry)
                    else:
                        found[ep.name] = entry
            self._plugin_cache = (key, found, unused)
        return self._plugin_cache

    def names(self) -> list[str]:
        """Registered names and plug-in names (a registration wins over a plug-in of the same name)."""
        return sorted(set(self._entries) | set(self.plugins()))

    def describe(self) -> dict[str, str]:
        return {n: self._entry(n).description or self._entry(n).where() for n in self.names()}

    def sources(self) -> dict[str, dict]:
        """{name: {"description", "from"}} of every name, and plug-ins that are not used (name taken)."""
        out = {n: {"description": self._entry(n).description, "from": self._entry(n).where()} for n in self.names()}
        _, plugins, unused = self._read_plugins()
        for e in list(unused) + [p for n, p in plugins.items() if n in self._entries]:
            out.setdefault("(not used)", []).append(f"{e.where()}: the name {e.name!r} is taken")
        return out

    def __contains__(self, name):
        return name in self._entries or name in self.plugins()

    def _entry(self, name) -> Entry:
        if name in self._entries:
            return self._entries[name]
        plugin = self.plugins().get(name)
        if plugin is not None:
            return plugin
        if is_import_path(name):
            return Entry(name, name, "", "import path")
        plug = sorted(self.plugins())
        raise UnknownNameError(f"unknown {self.kind} {name!r}; registered {self.kind}s: "
                               f"{', '.join(sorted(self._entries)) or '(none)'}"
                               + (f"; plug-ins: {', '.join(plug)}" if plug else "")
                               + "; or give an import path, package.module:factory")

    def origin(self, name: str) -> dict:
        """How ``name`` is found again: {"name", "from" ("registered", "entry point", "import path"), ...}."""
        e = self._entry(name)
        out = {"name": name, "from": e.origin, "where": e.where()}
        if e.package:
            out["package"] = e.package
        return out

    def options(self, name: str) -> list[str] | None:
        """The keyword options the constructor of ``name`` takes (None: any, it takes ``**kwargs``)."""
        fn = self._entry(name).resolve(self.kind)
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
        entry = self._entry(name)
        here = _cwd_on_path() if entry.origin == "import path" else contextlib.nullcontext()
        with here:  # an import path's factory may import its neighbours when called
            fn = entry.resolve(self.kind)
            known = self.options(name)
            if known is not None:
                unknown = sorted(set(options) - set(known))
                if unknown:
                    raise TypeError(f"{self.kind} {name!r} does not take option(s) {unknown}; "
                                    f"it takes: {', '.join(known) or '(none)'}")
            model = fn(**options)
        _attach_recipe(model, self.origin(name), options)
        return model


GENERATORS = Registry("generator", PLUGIN_GROUPS["generator"])
SEGMENTERS = Registry("segmenter", PLUGIN_GROUPS["segmenter"])


def register_generator(name, constructor, description="", overwrite=False):
    GENERATORS.register(name, constructor, description, overwrite)


def register_segmenter(name, constructor, description="", overwrite=False):
    SEGMENTERS.register(name, constructor, description, overwrite)


def _builtins():
    # Imported for their registrations; each family module registers itself lazily by path.
    import gandissect_widgets.models  # noqa: F401
    import gandissect_widgets.segmenters  # noqa: F401


def _registry(kind: str) -> Registry:
    _builtins()
    return GENERATORS if kind == "generator" else SEGMENTERS


def load_generator(name: str = "sceneworld", /, **options):
    """A generator by registered name, plug-in name or import path; options go to its constructor
    (``checkpoint=PATH``, ``device=``)."""
    return _registry("generator").load(name, **options)


def load_segmenter(name: str = "sceneworld", /, **options):
    """A segmenter by registered name, plug-in name or import path; options go to its constructor."""
    return _registry("segmenter").load(name, **options)


def load_model(kind: str, name: str, device=None, checkpoint=None, trust_pickle: bool = False):
    """The ``kind`` ``name`` with the usual options, each passed only to a constructor that takes it:
    ``device``, ``checkpoint`` (given to one that takes none: ``ValueError``) and ``trust_pickle``."""
    reg = _registry(kind)
    opts = {}
    if device is not None and reg.takes(name, "device"):
        opts["device"] = device
    if checkpoint is not None:
        if not reg.takes(name, "checkpoint"):
            raise ValueError(f"{kind} {name!r} loads no checkpoint (its options: "
                             f"{', '.join(reg.options(name) or []) or 'none'}), and {checkpoint} was given for it")
        opts["checkpoint"] = checkpoint
    if trust_pickle and reg.takes(name, "trust_pickle"):
        opts["trust_pickle"] = True
    return reg.load(name, **opts)


def takes_option(kind: str, name: str, option: str) -> bool:
    """Whether the ``kind`` ("generator" or "segmenter") ``name`` takes ``option``."""
    return _registry(kind).takes(name, option)


def origin(kind: str, name: str) -> dict:
    """How the ``kind`` ``name`` is found again (recorded in results): registered, entry point or import path."""
    return _registry(kind).origin(name)


def list_generators() -> dict[str, str]:
    return _registry("generator").describe()


def list_segmenters() -> dict[str, str]:
    return _registry("segmenter").describe()


def list_models() -> dict[str, dict]:
    """{"generators": {name: {"description", "from"}}, "segmenters": ...}: what ``gandissect models`` prints."""
    return {"generators": _registry("generator").sources(), "segmenters": _registry("segmenter").sources()}
