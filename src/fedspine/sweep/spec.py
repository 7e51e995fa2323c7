"""A sweep file: a base config, the arms to compare (named and/or a grid) and the seeds.

```toml
base = "../../configs/hetero.toml"   # relative to this file; omit for the built-in default
seeds = [0, 1, 2]                    # or a count: seeds = 3 is [0, 1, 2]
reference = "fedit"                  # paired differences against this arm (default: the first)
target = 0.4                         # or "0.95*fedit": 95% of fedit's mean final metric

[set]                                # applied to every arm
"data.test_size" = 600

[arms.fedit]                         # a named arm: dotted keys, TOML values, as --set takes them
"strategy.name" = "fedit"
"lora.rank" = 4

[arms.flora]
"strategy.name" = "flora"

[grid]                               # and/or a product of value lists
"train.lr" = [1e-3, 2e-3]
```

With both, every named arm is combined with every grid point (``fedit,lr=0.001`` ...); with a grid
alone, its points are the arms. ``run.seed`` comes from ``seeds`` and ``run.threads`` from the
sweep's thread budget, so neither may be set here. Every (arm, seed) config is built and checked
(:func:`~fedspine.runtime.experiment.check_config`) when the file is loaded, before any run starts.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedspine.config import (
    RUN_NAME,
    Config,
    apply_override,
    from_dict,
    key_parts,
    read_toml,
    to_dict,
    to_toml,
)
from fedspine.errors import ConfigError, FedspineError
from fedspine.report.compare import target_form
from fedspine.runtime.experiment import check_config

SWEEP_KEYS = ("name", "base", "seeds", "reference", "target", "set", "arms", "grid")
RESERVED = {"run.seed": "seeds", "run.threads": "--threads / --workers"}
ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=,-]*$")
MAX_RUNS = 10_000
"""Arms times seeds: more runs than any sweep finishes (a typo such as ``seeds = 1000000000``)."""


@dataclass(frozen=True)
class Arm:
    """One setting of the comparison: its name and its overrides (dotted key -> value)."""

    name: str
    overrides: dict[str, object]


@dataclass(frozen=True)
class Sweep:
    """A parsed, checked sweep file."""

    name: str
    base: Path | None
    """Base config file (None: the built-in default experiment)."""
    common: dict[str, object]
    """Overrides every arm gets (``[set]``), applied before the arm's own."""
    arms: list[Arm]
    seeds: list[int]
    reference: str | None
    target: str | float | None

    def config(self, arm: Arm, seed: int, threads: int | None = None) -> Config:
        """The run config of ``arm`` at ``seed`` (``threads``: ``run.threads``, else the base's).

        Raises:
            ConfigError: naming the arm and the key, e.g. ``arms.fedit.strategy.nme``.
        """
        data = read_toml(self.base) if self.base is not None else to_dict(Config())
        settings = {**self.common, **arm.overrides, "run.seed": seed}
        if threads is not None:
            settings["run.threads"] = threads
        try:
            for key, value in settings.items():
                apply_override(data, key_parts(key), value)
            return from_dict(data)
        except ConfigError as error:
            where = (
                "set" if error.key in self.common and error.key not in arm.overrides else f"arms.{arm.name}"
            )
            raise ConfigError(f"{where}.{error.key}", error.message) from None

    def fingerprint(self, arm: Arm) -> str:
        """A digest of the arm's resolved config, seed and threads aside (``--resume`` compares it)."""
        text = to_toml(self.config(arm, seed=0, threads=1))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def plan(self) -> dict[str, object]:
        """What ``sweep.json`` records: arm order, overrides, seeds, reference, target, fingerprints."""
        return {
            "name": self.name,
            "base": str(self.base) if self.base else None,
            "seeds": self.seeds,
            "arms": [a.name for a in self.arms],
            "reference": self.reference,
            "target": self.target,
            "common": self.common,
            "overrides": {a.name: a.overrides for a in self.arms},
            "fingerprints": {a.name: self.fingerprint(a) for a in self.arms},
        }


def load_sweep(path: Path) -> Sweep:
    """Read, parse and check a sweep file; every (arm, seed) config is built and checked.

    Raises:
        ConfigError: naming the key (``arms.fedit.strategy.nme``, ``grid``, ``seeds``...).
    """
    data = read_toml(path)
    sweep = parse_sweep(data, path.parent, path.stem)
    check_sweep(sweep)
    return sweep


def parse_sweep(data: dict[str, Any], root: Path, default_name: str) -> Sweep:
    """A :class:`Sweep` from the TOML table of a sweep file (paths relative to ``root``)."""
    unknown = [k for k in data if k not in SWEEP_KEYS]
    if unknown:
        raise ConfigError(unknown[0], f"unknown key in a sweep file; allowed: {', '.join(SWEEP_KEYS)}")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not RUN_NAME.match(name):
        raise ConfigError(
            "name", f"must be letters, digits, '.', '_' or '-' (it names a folder under runs/), got {name!r}"
        )
    base = data.get("base")
    if base is not None and not isinstance(base, str):
        raise ConfigError("base", f"expected a path (string), got {type(base).__name__}")
    base_path = None if base in (None, "", "default") else (root / str(base)).resolve()
    if base_path is not None and not base_path.is_file():
        raise ConfigError("base", f"config file not found: {base_path}")
    common = _overrides(data.get("set", {}), "set")
    arms = _arms(data.get("arms", {}), _grid(data.get("grid", {})))
    reference = data.get("reference")
    if reference is not None and reference not in [a.name for a in arms]:
        raise ConfigError("reference", f"unknown arm {reference!r}; arms: {', '.join(a.name for a in arms)}")
    target = data.get("target")
    seeds = _seeds(data.get("seeds", 3))
    if len(arms) * len(seeds) > MAX_RUNS:
        raise ConfigError("seeds", f"{len(arms)} arms x {len(seeds)} seeds is more than {MAX_RUNS} runs")
    _check_target(target, [a.name for a in arms])
    return Sweep(name, base_path, common, arms, seeds, reference, target)


def _check_target(target: object, arms: list[str]) -> None:
    """The comparison's target, checked before any run (:func:`~fedspine.report.compare.target_form`)
    and its arm against this sweep's (whether a fraction suits the metric's direction is known only
    from the runs: ``compare`` checks it)."""
    if target is None:
        return
    _, arm = target_form(target, "target")
    if arm is not None and arm not in arms:
        raise ConfigError("target", f"names no arm of this sweep: {arm[:60]!r}; arms: {', '.join(arms)}")


def _seeds(value: object) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= MAX_RUNS:
            raise ConfigError("seeds", f"a count must be in 1..{MAX_RUNS}, got {value}")
        return list(range(value))
    if not isinstance(value, list) or not value:
        raise ConfigError("seeds", "expected a count or a non-empty list of integers")
    if len(value) > MAX_RUNS:
        raise ConfigError("seeds", f"at most {MAX_RUNS} seeds, got {len(value)}")
    if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63 for s in value):
        raise ConfigError("seeds", f"every seed must be an integer >= 0, got {value}")
    if len(set(value)) != len(value):
        raise ConfigError("seeds", f"seeds repeat: {value}")
    return list(value)


def _overrides(table: object, where: str) -> dict[str, object]:
    if not isinstance(table, dict):
        raise ConfigError(where, f"expected a table of dotted keys, got {type(table).__name__}")
    flat: dict[str, object] = {}
    for key, value in _flatten(table):
        if key in RESERVED:
            raise ConfigError(f"{where}.{key}", f"is set by the sweep ({RESERVED[key]}), not by an override")
        flat[key] = value
    return flat


def _flatten(table: dict[str, object], prefix: str = "") -> list[tuple[str, object]]:
    """Dotted keys of a table: quoted (``"strategy.name" = ...``) and nested tables both work.

    A non-empty table is set key by key (merged into the base's table); an empty table ``{}``
    replaces the base's (e.g. ``"lora.class_ranks" = {}``).
    """
    out: list[tuple[str, object]] = []
    for key, value in table.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out += _flatten(value, dotted)
        else:
            out.append((dotted, value))
    return out


def _grid(table: object) -> list[Arm]:
    if not isinstance(table, dict):
        raise ConfigError("grid", f"expected a table of value lists, got {type(table).__name__}")
    for key, values in table.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key}", "expected a non-empty list of values")
        if key in RESERVED:
            raise ConfigError(f"grid.{key}", f"is set by the sweep ({RESERVED[key]})")
    keys = list(table)
    if not keys:
        return []
    if math.prod(len(table[k]) for k in keys) > MAX_RUNS:
        raise ConfigError("grid", f"has more than {MAX_RUNS} points; a sweep that large never finishes")
    points = []
    for values in itertools.product(*(table[k] for k in keys)):
        label = ",".join(f"{key_parts(k)[-1]}={_label(v)}" for k, v in zip(keys, values, strict=True))
        points.append(Arm(label, dict(zip(keys, values, strict=True))))
    return points


def _label(value: object) -> str:
    return json.dumps(value, separators=(",", ":")).strip('"') if not isinstance(value, str) else value


def _arms(table: object, grid: list[Arm]) -> list[Arm]:
    if not isinstance(table, dict):
        raise ConfigError("arms", f"expected a table of named arms, got {type(table).__name__}")
    named = [Arm(str(name), _overrides(over, f"arms.{name}")) for name, over in table.items()]
    if not named and not grid:
        raise ConfigError("arms", "the sweep has no arms: add [arms.NAME] tables and/or a [grid]")
    if named and grid:
        if len(named) * len(grid) > MAX_RUNS:
            raise ConfigError("grid", f"times the named arms gives more than {MAX_RUNS} arms")
        arms = [Arm(f"{a.name},{g.name}", {**a.overrides, **g.overrides}) for a in named for g in grid]
    else:
        arms = named or grid
    for arm in arms:
        if not ARM_NAME.match(arm.name) or len(arm.name) > 120:
            raise ConfigError(
                f"arms.{arm.name}",
                "an arm name becomes a folder: letters, digits and ._+=,- only, at most 120",
            )
    return arms


def check_sweep(sweep: Sweep) -> None:
    """Build and check every (arm, seed) config: nothing runs unless every one is valid.

    Raises:
        ConfigError: naming the arm and the key.
    """
    for arm in sweep.arms:
        for seed in sweep.seeds:
            config = sweep.config(arm, seed)
            try:
                check_config(config)
            except ConfigError as error:
                raise ConfigError(f"arms.{arm.name}.{error.key}", error.message) from None
            except FedspineError as error:
                raise ConfigError(f"arms.{arm.name}", str(error)) from None
