"""Hyperparameters as plain dataclasses, with validated ``--set key=value`` overrides.

Every method and benchmark declares a ``Config`` dataclass whose defaults come from its paper or
official code; per-benchmark defaults are applied on top, then the budget flags, then the user's
overrides (``resolve_config``, which also says where each value came from, for ``--dry-run``).
Values are parsed with ``ast.literal_eval`` and checked against the field's type, so
``--set sdlora.rank=x`` fails with a one-line message instead of a crash halfway through a run.
"""
from __future__ import annotations

import ast
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import ClassVar

from clbench.errors import UsageError


@dataclass
class TrainConfig:
    """Training budget shared by every method; ``--epochs/--lr/--batch-size`` override it for all.

    ``lr_scaled_fields`` is the method's side of that contract: other learning rates of the
    config (a first-task or head lr) that ``--lr`` scales by the same factor as ``lr``."""

    lr_scaled_fields: ClassVar[tuple[str, ...]] = ()
    epochs: int = 5
    lr: float = 0.01
    batch_size: int = 32
    eval_batch_size: int = 256


@dataclass(frozen=True)
class Override:
    scope: str | None  # method or benchmark name, or None for "whichever has the key"
    key: str
    raw: str


def parse_override(text: str) -> Override:
    if "=" not in text:
        raise UsageError(f"--set expects key=value (e.g. --set sdlora.rank=8), got {text!r}")
    key, raw = text.split("=", 1)
    scope, _, name = key.rpartition(".")
    return Override(scope or None, name.strip(), raw.strip())


def _coerce(raw: str, annotation, where: str):
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # bare words are strings
    origin = typing.get_origin(annotation)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(annotation) or (object,)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{where} expects a list like [10,8,6], got {raw!r}")
        if item_type is float:
            value = [float(v) for v in value]
        if item_type is not object and not all(isinstance(v, item_type) for v in value):
            raise UsageError(f"{where} expects a list of {item_type.__name__}, got {raw!r}")
        return origin(value)
    expected = annotation if isinstance(annotation, type) else None
    if origin in (typing.Union, types.UnionType):  # Optional[X] and X | None
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        expected = options[0] if options else None
    if expected is not None and expected is not object:
        if expected is bool and not isinstance(value, bool):
            raise UsageError(f"{where} expects true/false (True or False), got {raw!r}")
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise UsageError(f"{where} expects {expected.__name__}, got {raw!r}")
    return value


def field_types(config_cls) -> dict[str, object]:
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def resolve_overrides(config, overrides: list[Override], scope: str) -> dict:
    """Typed values of the overrides that target ``scope`` (explicitly or by bare key)."""
    types = field_types(type(config))
    values = {}
    for item in overrides:
        if item.scope == scope or (item.scope is None and item.key in types):
            where = f"--set {scope}.{item.key}"
            if item.key not in types:
                raise UsageError(f"unknown hyperparameter {item.key!r} for {scope}; "
                                 f"valid: {', '.join(sorted(types))}")
            values[item.key] = _coerce(item.raw, types[item.key], where)
    return values


def matches(item: Override, scopes_and_configs: list[tuple[str, object]]) -> bool:
    """Whether the override sets a field of one of these (name, config) pairs."""
    return any((item.scope == scope or item.scope is None) and item.key in field_types(type(cfg))
               for scope, cfg in scopes_and_configs)


def check_all_used(overrides: list[Override], scopes_and_configs: list[tuple[str, object]]) -> None:
    """Every override must match some method or benchmark of this run."""
    for item in overrides:
        if not matches(item, scopes_and_configs):
            names = ", ".join(scope for scope, _ in scopes_and_configs)
            target = f"{item.scope}.{item.key}" if item.scope else item.key
            raise UsageError(f"--set {target}: no method or benchmark in this run ({names}) "
                             "has that hyperparameter; `clbench list` shows them")


PAPER, RECIPE, SET = "paper default", "benchmark recipe", "--set"


def resolve_config(strategy_cls, benchmark: str, n_tasks: int, budget: dict, overrides):
    """(config, {field: source}): paper defaults ← the benchmark recipe (``defaults_for``) ←
    budget flags ({field: (value, flag)}; the method's declared contract: ``--lr`` sets ``lr``
    and scales every field in ``lr_scaled_fields`` by the same factor) ← ``--set``."""
    config = strategy_cls.Config()
    sources = dict.fromkeys((f.name for f in dataclasses.fields(config)), PAPER)
    chosen = resolve_overrides(config, overrides, strategy_cls.registered_name)
    # A method whose per-benchmark defaults depend on a chosen variant names it in variant_keys.
    variant = {k: chosen[k] for k in strategy_cls.variant_keys if k in chosen}
    recipe = strategy_cls.defaults_for(benchmark, n_tasks, **variant)
    config = dataclasses.replace(config, **recipe)
    sources.update(dict.fromkeys(recipe, f"{RECIPE} ({benchmark})"))
    values = {name: value for name, (value, _) in budget.items()}
    sources.update({name: flag for name, (_, flag) in budget.items()})
    if "lr" in budget:
        factor = values["lr"] / config.lr
        for name in config.lr_scaled_fields:
            value = getattr(config, name)
            if value is not None:
                values[name] = value * factor
                sources[name] = f"{budget['lr'][1]} (scaled ×{factor:.6g} from {value:.6g})"
    config = dataclasses.replace(config, **values)
    sources.update(dict.fromkeys(chosen, SET))
    return dataclasses.replace(config, **chosen), sources


def as_dict(config) -> dict:
    return dataclasses.asdict(config)
