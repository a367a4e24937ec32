"""``--set`` values are coerced to the field's declared type, ``X | None`` included, and the
resolved config says where every value came from."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest

from clbench.errors import UsageError
from clbench.hparams import TrainConfig, parse_override, resolve_config, resolve_overrides


@dataclass
class Options:
    rate: float | None = None
    old_style: Optional[float] = 0.5
    count: int | None = None
    name: str | None = None
    flag: bool | None = None


def _set(*items):
    return resolve_overrides(Options(), [parse_override(i) for i in items], "m")


@pytest.mark.parametrize("item, key, expected, kind", [
    ("m.rate=1", "rate", 1.0, float),          # an int literal for a float | None field
    ("m.rate=2.5", "rate", 2.5, float),
    ("m.old_style=3", "old_style", 3.0, float),  # Optional[float] spelled the old way
    ("m.rate=None", "rate", None, type(None)),
    ("m.old_style=None", "old_style", None, type(None)),
    ("m.count=4", "count", 4, int),
    ("m.count=None", "count", None, type(None)),
    ("m.name=coda", "name", "coda", str),      # bare words are strings
    ("m.flag=True", "flag", True, bool),
])
def test_optional_fields_take_their_type_or_none(item, key, expected, kind):
    value = _set(item)[key]
    assert value == expected and type(value) is kind


@pytest.mark.parametrize("item, message", [
    ("m.rate=fast", "expects float"), ("m.count=1.5", "expects int"),
    ("m.count=True", "expects int"), ("m.flag=1", "expects true/false"),
])
def test_optional_fields_refuse_other_types(item, message):
    with pytest.raises(UsageError, match=message):
        _set(item)


class _Method:  # the contract's part that resolve_config reads (CLStrategy's defaults)
    registered_name = "toy"
    variant_keys = ()

    @dataclass
    class Config(TrainConfig):
        lr_scaled_fields = ("head_lr",)
        head_lr: float | None = 0.1
        other_lr: float | None = None

    @classmethod
    def defaults_for(cls, benchmark, n_tasks):
        return {"epochs": 7, "head_lr": 0.2} if benchmark == "b" else {}


def test_resolved_config_names_the_source_of_each_value():
    budget = {"lr": (0.02, "--lr"), "batch_size": (8, "--batch-size")}
    config, sources = resolve_config(_Method, "b", 5, budget, [parse_override("toy.other_lr=1")])
    assert (config.epochs, config.lr, config.batch_size, config.head_lr, config.other_lr) == \
        (7, 0.02, 8, pytest.approx(0.4), 1.0)
    assert sources == {"epochs": "benchmark recipe (b)", "lr": "--lr", "batch_size": "--batch-size",
                       "eval_batch_size": "paper default", "head_lr": "--lr (scaled ×2 from 0.2)",
                       "other_lr": "--set"}
