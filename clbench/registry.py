"""Name → class registries for methods and benchmarks, timm-style.

Discovery order: built-in modules under ``clbench.methods`` / ``clbench.benchmarks``, then
installed packages exposing the entry-point groups of the same names, then ``--plugin`` files or
modules. Registration records where each entry came from so ``clbench list`` can say so.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import pkgutil
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

from clbench.errors import UsageError


@dataclass
class Entry:
    name: str
    obj: type
    description: str
    origin: str


class Registry:
    def __init__(self, kind: str, package: str):
        self.kind = kind
        self.package = package
        self._entries: dict[str, Entry] = {}
        self._discovered = False
        self._origin = "built-in"

    def register(self, name: str, description: str | None = None) -> Callable[[type], type]:
        if name != name.lower() or " " in name or "_" in name:
            raise ValueError(f"{self.kind} names are lower-case with hyphens, got {name!r}")

        def decorator(obj: type) -> type:
            doc = description or (obj.__doc__ or "").strip().splitlines()[0:1]
            text = doc if isinstance(doc, str) else (doc[0] if doc else "")
            existing = self._entries.get(name)
            if existing is not None and _qualified(existing.obj) != _qualified(obj):
                raise UsageError(f"{self.kind} {name!r} from {self._origin} is already registered by "
                                 f"{existing.origin}; register it under another name")
            obj.registered_name = name
            self._entries[name] = Entry(name, obj, text, self._origin)
            return obj

        return decorator

    def discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        package = importlib.import_module(self.package)  # family folders: walk them all
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{self.package}."):
            if not info.name.rpartition(".")[2].startswith("_"):
                importlib.import_module(info.name)
        for ep in entry_points(group=self.package):
            self._origin = f"entry point {ep.value}"
            try:
                ep.load()
            finally:
                self._origin = "built-in"

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._entries)

    def builtin_names(self) -> list[str]:
        return [n for n in self.names() if self._entries[n].origin == "built-in"]

    def get(self, name: str) -> type:
        self.discover()
        if name not in self._entries:
            close = difflib.get_close_matches(name, self.names(), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"unknown {self.kind} {name!r}.{hint} "
                             f"Valid {self.kind}s: {', '.join(self.names())}")
        return self._entries[name].obj


def _qualified(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def load_plugin_module(spec: str) -> None:
    """Import a plugin given as a ``.py`` file path or a dotted module name."""
    path = Path(spec)
    if spec.endswith(".py"):
        if not path.is_file():
            raise UsageError(f"plugin file {spec} not found: pass an existing .py file or a module name")
        module_name = f"clbench_plugin_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except UsageError:
            raise
        except Exception as exc:  # SyntaxError, ImportError, a bad registered name, ...
            sys.modules.pop(module_name, None)
            raise UsageError(f"plugin {spec} fails to load: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}; fix the file") from None
    else:
        try:
            importlib.import_module(spec)
        except UsageError:
            raise
        except Exception as exc:
            raise UsageError(f"plugin module {spec!r} cannot be imported ({type(exc).__name__}: "
                             f"{exc}); pass a .py file path or an importable module name") from None


METHODS = Registry("method", "clbench.methods")
BENCHMARKS = Registry("benchmark", "clbench.benchmarks")
register_method = METHODS.register
register_benchmark = BENCHMARKS.register


def load_plugins(specs: list[str]) -> None:
    """Plugins may register methods, benchmarks or both; tag both registries' origins."""
    for spec in specs:
        METHODS.discover()
        BENCHMARKS.discover()
        METHODS._origin = BENCHMARKS._origin = f"plugin {spec}"
        try:
            load_plugin_module(spec)
        finally:
            METHODS._origin = BENCHMARKS._origin = "built-in"


def _declared_in(path: Path, decorator: str) -> list[tuple[str, str]]:
    """(name, description) of every ``@decorator("name", "description")`` in a source file."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == decorator
                and node.args and isinstance(node.args[0], ast.Constant)):
            description = node.args[1].value if len(node.args) > 1 and isinstance(
                node.args[1], ast.Constant) else ""
            found.append((node.args[0].value, description))
    return found


def static_entries(registry: Registry, plugin_files: list[str] = ()) -> list[Entry]:
    """Entries read from source, without importing (``clbench list`` stays instant: importing a
    method pulls in Avalanche, about 15 s cold). Entry points are listed by name."""
    decorator = "register_method" if registry is METHODS else "register_benchmark"
    spec = importlib.util.find_spec(registry.package)
    found: dict[str, Entry] = {}
    for folder in spec.submodule_search_locations or []:
        for path in sorted(Path(folder).rglob("*.py")):  # modules and method packages
            if not path.name.startswith("_") or path.name == "__init__.py":
                for name, text in _declared_in(path, decorator):
                    found[name] = Entry(name, object, text,
                                        f"built-in ({path.relative_to(folder).as_posix()})")
    for ep in entry_points(group=registry.package):
        found.setdefault(ep.name, Entry(ep.name, object, "(installed package)", f"entry point {ep.value}"))
    for plugin in plugin_files:
        if not plugin.endswith(".py"):
            continue  # a module name: listed once imported by `run`
        if not Path(plugin).is_file():
            raise UsageError(f"plugin file {plugin} not found: pass an existing .py file")
        try:
            declared = _declared_in(Path(plugin), decorator)
        except SyntaxError as exc:
            raise UsageError(f"plugin {plugin} has a syntax error (line {exc.lineno}); fix the file") from None
        for name, text in declared:
            if name in found:
                raise UsageError(f"{registry.kind} {name!r} from plugin file {plugin} is already "
                                 f"registered by {found[name].origin}; register it under another name")
            found[name] = Entry(name, object, text, f"plugin file {plugin}")
    return [found[n] for n in sorted(found)]
