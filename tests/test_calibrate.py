"""``fedspine calibrate`` and device profiles: a measured machine as a fleet's device class."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedspine.cli import app as cli
from fedspine.config import load_config, tomllib
from fedspine.errors import ConfigError
from fedspine.fleet.cost import CostModel
from fedspine.fleet.profile import load_profile, profile_toml
from fedspine.runtime.experiment import build_experiment, build_fleet_from_config
from fedspine.types import DeviceClass
from tests.conftest import CONFIGS

FAST = ["data.max_examples=300", "data.test_size=30", "train.local_steps=2", "run.threads=1"]


def test_calibrate_writes_a_profile_a_fleet_loads_and_the_cost_model_charges_what_was_measured(
    tmp_path: Path,
) -> None:
    profile = tmp_path / "host.toml"
    args = [
        "calibrate",
        "-c",
        str(CONFIGS / "tiny.toml"),
        "--out",
        str(profile),
        "--name",
        "host",
        "--tasks",
        "2",
    ]
    done = CliRunner().invoke(cli, [*args, *[a for o in FAST for a in ("--set", o)]])
    assert done.exit_code == 0, done.output
    device = load_profile(profile)
    assert device.name == "host" and device.mfu == 1.0 and device.peak_flops > 0
    assert device.memory_bandwidth > 1e8 and device.memory_bytes > 2**28 and device.train_dtype_bytes == 4
    measured = tomllib.loads(profile.read_text())["measured"]
    assert measured["decode_tokens_per_second"] > 0 and measured["peak_memory_bytes"] > 0
    assert len(measured["train_seconds_per_step_all"]) == 2

    group = f'fleet.groups=[{{device_class = "laptop", count = 2, network = "wifi", profile = "{profile}"}}]'
    cfg = load_config(CONFIGS / "tiny.toml", [*FAST, group])
    fleet = build_fleet_from_config(cfg)
    assert [d.device_class for d in fleet] == [device, device]  # the profile, not the catalog's laptop
    exp = build_experiment(cfg)
    prepared = exp.trainer.executor.prepare(1, fleet[0], exp.device_lora[0], cfg.train.local_steps)
    predicted = CostModel.for_device(fleet[0]).train_seconds(prepared.workload)
    per_step = measured["train_seconds_per_step"]
    # the calibrated workload's predicted time is the measured one (the median task's throughput)
    assert math.isclose(predicted / cfg.train.local_steps, per_step, rel_tol=0.5)

    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 2 and "exists" in again.output


def test_a_bad_profile_names_the_group_and_the_field(tmp_path: Path) -> None:
    good = DeviceClass("x", "d", 1e10, 1.0, 1e10, 2**30, 4, 0.05, "s")
    path = tmp_path / "p.toml"
    key = "fleet.groups[0].profile"
    for edit, match in (
        (lambda t: t.replace("mfu = 1.0", "mfu = 2.0"), "'mfu' must be in"),
        (
            lambda t: t.replace("peak_flops = 10000000000.0", 'peak_flops = "fast"'),
            "'peak_flops' must be a finite",
        ),
        (lambda t: t.replace('name = "x"', 'name = "x"\nturbo = true'), "unknown field"),
        (lambda t: t.replace("memory_bytes = 1073741824", ""), "'memory_bytes' must be an integer"),
        (lambda t: t + "\n[[[", "not valid TOML"),
    ):
        path.write_text(edit(profile_toml(good, {"note": 1})))
        group = f'fleet.groups=[{{count = 1, network = "wifi", profile = "{path}"}}]'
        with pytest.raises(ConfigError, match=match) as info:
            build_fleet_from_config(load_config(CONFIGS / "tiny.toml", [group]))
        assert info.value.key == key
    path.write_text(profile_toml(good, {}))
    assert load_profile(path) == good
    with pytest.raises(ConfigError, match="not found"):
        load_profile(tmp_path / "missing.toml")
