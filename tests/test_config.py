"""Config tree: TOML round trip, validation messages that name the key, overrides, shipped configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedspine.config import Config, from_dict, load_config, parse_override, read_toml, to_dict, to_toml
from fedspine.errors import ConfigError
from fedspine.runtime.experiment import (
    build_device_lora,
    build_fleet_from_config,
    build_scheduler,
    build_strategy,
    strategy_class,
)
from fedspine.runtime.experiment.data import load_examples, split_and_partition
from tests.conftest import CONFIGS


def test_toml_round_trip_preserves_every_field(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(to_toml(Config()))
    assert to_dict(load_config(path)) == to_dict(Config())


def test_shipped_default_toml_is_the_builtin_default() -> None:
    assert to_dict(load_config(CONFIGS / "default.toml")) == to_dict(load_config(None))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_resolves(path: Path) -> None:
    cfg = load_config(path)
    devices = build_fleet_from_config(cfg)
    assert len(devices) == sum(g.count for g in cfg.fleet.groups)
    build_scheduler(cfg, len(devices), strategy_class(cfg))


def test_the_paper_like_fleet_has_80_devices_each_with_data() -> None:
    cfg = load_config(CONFIGS / "fleet80.toml")
    assert len(build_fleet_from_config(cfg)) == 80
    rng = np.random.default_rng(cfg.run.seed)
    _, _, parts = split_and_partition(cfg, load_examples(cfg, rng), 80, rng)
    assert len(parts) == 80 and min(len(p) for p in parts) >= cfg.train.batch_size


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [
        ({"train": {"lrr": 1.0}}, "train.lrr", "allowed keys here: local_steps"),
        ({"train": {"lr": "fast"}}, "train.lr", "expected float, got str"),
        ({"train": {"local_steps": 2.5}}, "train.local_steps", "expected int"),
        ({"train": {"local_steps": True}}, "train.local_steps", "expected int, got bool"),
        ({"data": {"task": "regression"}}, "data.task", "'classification' | 'lm'"),
        ({"train": {"local_steps": 0}}, "train.local_steps", ">= 1"),
        ({"fleet": {"groups": [{"count": "two"}]}}, "fleet.groups[0].count", "expected int"),
        ({"fleet": {"groups": []}}, "fleet.groups", "at least one"),
        ({"lora": {"target_modules": "q_proj"}}, "lora.target_modules", "list"),
        ({"colour": "red"}, "colour", "allowed keys here: run, model"),
    ],
)
def test_validation_errors_name_the_key(data: dict, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    assert info.value.key == key
    assert key in str(info.value)
    assert fragment in str(info.value)


def test_unknown_registered_names_list_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"strategy.name.*unknown strategy 'fedavgx'; known: .*fedit"):
        build_strategy(load_config(None, ["strategy.name=fedavgx"]))
    with pytest.raises(ConfigError, match=r"scheduler.name.*known: .*sync"):
        cfg = load_config(None, ["scheduler.name=nope"])
        build_scheduler(cfg, 10, strategy_class(cfg))


def test_unknown_device_class_names_the_group() -> None:
    cfg = load_config(None, ["fleet.groups.1.device_class=toaster"])
    with pytest.raises(ConfigError, match=r"fleet.groups\[1\].device_class.*raspberry_pi_4"):
        build_fleet_from_config(cfg)


def test_overrides_parse_toml_values_and_bare_strings() -> None:
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("strategy.name=fedit") == (["strategy", "name"], "fedit")
    assert parse_override("lora.target_modules=['q_proj']") == (["lora", "target_modules"], ["q_proj"])
    assert parse_override("fleet.groups[0].count=3") == (["fleet", "groups", "0", "count"], 3)
    cfg = load_config(None, ["fleet.groups[0].count=3", "fleet.groups.1.network={wifi=0.5, 5g=0.5}"])
    assert cfg.fleet.groups[0].count == 3
    assert cfg.fleet.groups[1].network == {"wifi": 0.5, "5g": 0.5}


def test_override_errors() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match="list index"):
        load_config(None, ["fleet.groups.99.count=1"])
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_config(None, ["train.lr=abc"])


def test_bad_toml_file_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        read_toml(bad)
    with pytest.raises(ConfigError, match="not found"):
        read_toml(tmp_path / "missing.toml")


def test_fedit_refuses_heterogeneous_ranks_and_lists_the_alternatives() -> None:
    cfg = load_config(CONFIGS / "hetero.toml", ["strategy.name=fedit"])
    devices = build_fleet_from_config(cfg)
    with pytest.raises(ConfigError, match=r"lora.ranks.*one rank for every device.*flora"):
        build_device_lora(cfg, devices, strategy_class(cfg))


def test_device_ranks_and_alphas() -> None:
    cfg = load_config(CONFIGS / "hetero.toml")
    devices = build_fleet_from_config(cfg)
    table = build_device_lora(cfg, devices, strategy_class(cfg))
    assert {d.device_class.name: table[d.device_id].rank for d in devices}["raspberry_pi_4"] == 4
    assert {lora.scaling for lora in table.values()} == {2.0}
    ranks = list(range(1, 11))
    cfg = load_config(
        None, [f"lora.ranks={ranks}", f"lora.alphas={[2.0 * r + 1 for r in ranks]}", "strategy.name=flora"]
    )
    table = build_device_lora(cfg, build_fleet_from_config(cfg), strategy_class(cfg))
    assert [table[i].rank for i in range(10)] == ranks
    assert table[3].alpha == pytest.approx(9.0)
    with pytest.raises(ConfigError, match=r"lora.ranks.*3 entries for 10 devices"):
        bad = load_config(None, ["lora.ranks=[4, 8, 16]", "strategy.name=flora"])
        build_device_lora(bad, build_fleet_from_config(bad), strategy_class(bad))
