"""Tests of the fleet layer: catalog, cost-model arithmetic, fleet building, jitter, summaries."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter

import pytest

from fedspine.errors import ConfigError
from fedspine.fleet import (
    DEVICE_CATALOG,
    NETWORK_PRESETS,
    CostModel,
    GroupSpec,
    build_fleet,
    compute_slowdown,
    device_class,
    fleet_summary,
    fleet_table_rows,
    is_available,
    link_rate_factor,
    network_profile,
    split_counts,
)
from fedspine.types import Device, DeviceClass, NetworkProfile, TrainWorkload

TOY_CLASS = DeviceClass(
    name="toy",
    description="toy",
    peak_flops=1e12,
    mfu=0.5,  # effective 5e11 FLOP/s
    memory_bandwidth=1e10,
    memory_bytes=1000,
    train_dtype_bytes=2,
    slowdown_sigma=0.2,
    source="test",
)
TOY_NET = NetworkProfile(
    name="toy", uplink_bps=8e6, downlink_bps=80e6, rtt_seconds=0.05, handshakes=2, rate_jitter=0.2
)
TOY = CostModel(TOY_CLASS, TOY_NET)


def _workload(flops: float, bytes_moved: float) -> TrainWorkload:
    return TrainWorkload(flops=flops, bytes_moved=bytes_moved, peak_memory_bytes=0, tokens=0)


# --- cost model arithmetic -------------------------------------------------------------------------


def test_train_seconds_compute_bound() -> None:
    # 1e12 FLOPs at 5e11 FLOP/s = 2 s; 1e9 bytes at 1e10 B/s = 0.1 s
    assert TOY.train_seconds(_workload(1e12, 1e9)) == pytest.approx(2.0)


def test_train_seconds_memory_bound() -> None:
    # 1e11 FLOPs = 0.2 s; 5e10 bytes at 1e10 B/s = 5 s
    assert TOY.train_seconds(_workload(1e11, 5e10)) == pytest.approx(5.0)


def test_train_seconds_slowdown_multiplies() -> None:
    assert TOY.train_seconds(_workload(1e12, 0), slowdown=1.5) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        TOY.train_seconds(_workload(1e12, 0), slowdown=0.0)


def test_transfer_seconds_with_latency() -> None:
    # 2 handshakes x 50 ms + 1e6 B x 8 / 8e6 bit/s = 0.1 + 1.0
    assert TOY.transfer_seconds(1_000_000, "up") == pytest.approx(1.1)
    # downlink is 10x faster: 0.1 + 0.1
    assert TOY.transfer_seconds(1_000_000, "down") == pytest.approx(0.2)


def test_transfer_zero_bytes_costs_nothing() -> None:
    assert TOY.transfer_seconds(0, "up") == 0.0
    assert TOY.transfer_seconds(0, "down", rate_factor=0.5) == 0.0


def test_transfer_rate_factor() -> None:
    # rate halved: 0.1 + 2.0
    assert TOY.transfer_seconds(1_000_000, "up", rate_factor=0.5) == pytest.approx(2.1)
    with pytest.raises(ValueError):
        TOY.transfer_seconds(1, "up", rate_factor=0.0)
    with pytest.raises(ValueError):
        TOY.transfer_seconds(-1, "up")


def test_fits() -> None:
    assert TOY.fits(1000)
    assert not TOY.fits(1001)


def test_for_device_uses_device_class_and_network() -> None:
    device = Device(0, TOY_CLASS, TOY_NET, 1.0)
    assert CostModel.for_device(device) == TOY
    assert TOY.effective_flops == pytest.approx(5e11)


# --- catalog ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fast", "expected"), [("ethernet", 33.3), ("wifi", 17.8)])
def test_5g_uplink_time_ratios_match_measurements(fast: str, expected: float) -> None:
    payload = 10_000_000  # latency left out: rate only
    slow_s = payload * 8 / network_profile("5g").uplink_bps
    fast_s = payload * 8 / network_profile(fast).uplink_bps
    assert slow_s / fast_s == pytest.approx(expected, rel=0.10)


def test_catalog_spread_is_realistic() -> None:
    def eff(name: str) -> float:
        return CostModel(device_class(name), network_profile("wifi")).effective_flops

    assert eff("jetson_agx_orin") / eff("raspberry_pi_4") > 50
    assert eff("raspberry_pi_4") < eff("raspberry_pi_5") < eff("jetson_orin_nano")
    assert eff("jetson_orin_nano") < eff("jetson_orin_nx") < eff("jetson_agx_orin")
    assert eff("jetson_tx2") < eff("jetson_xavier_nx") < eff("jetson_agx_xavier") < eff("jetson_agx_orin")
    assert eff("phone_midrange") < eff("phone_flagship")


@pytest.mark.parametrize("name", sorted(DEVICE_CATALOG))
def test_catalog_entries_are_sane(name: str) -> None:
    cls = DEVICE_CATALOG[name]
    assert cls.name == name
    assert 0.1 <= cls.mfu <= 0.35
    assert cls.train_dtype_bytes in (2, 4)
    assert cls.peak_flops > 0 and cls.memory_bandwidth > 0 and cls.memory_bytes >= 2**30
    assert cls.source


def test_cpu_only_devices_train_in_fp32() -> None:
    assert device_class("raspberry_pi_4").train_dtype_bytes == 4
    assert device_class("jetson_orin_nano").train_dtype_bytes == 2


@pytest.mark.parametrize("name", sorted(NETWORK_PRESETS))
def test_network_presets_are_sane(name: str) -> None:
    net = NETWORK_PRESETS[name]
    assert net.name == name
    assert 0 < net.uplink_bps <= net.downlink_bps
    assert net.rtt_seconds > 0 and net.handshakes >= 1 and 0 <= net.rate_jitter < 1


def test_unknown_device_class_names_key_and_lists_known() -> None:
    with pytest.raises(ConfigError) as info:
        device_class("pi_zero", key="fleet.groups[2].device_class")
    assert info.value.key == "fleet.groups[2].device_class"
    assert "fleet.groups[2].device_class" in str(info.value)
    assert "'pi_zero'" in str(info.value)
    assert all(name in str(info.value) for name in DEVICE_CATALOG)


def test_unknown_network_names_key_and_lists_known() -> None:
    with pytest.raises(ConfigError) as info:
        network_profile("6g", key="fleet.groups[0].network")
    assert info.value.key == "fleet.groups[0].network"
    assert all(name in str(info.value) for name in NETWORK_PRESETS)


# --- building the fleet ----------------------------------------------------------------------------


def test_build_fleet_numbers_devices_in_group_order() -> None:
    fleet = build_fleet(
        [GroupSpec("raspberry_pi_4", 2, "ethernet"), GroupSpec("jetson_orin_nano", 3, "wifi", 0.5)], seed=0
    )
    assert [d.device_id for d in fleet] == [0, 1, 2, 3, 4]
    assert [d.device_class.name for d in fleet] == ["raspberry_pi_4"] * 2 + ["jetson_orin_nano"] * 3
    assert [d.network.name for d in fleet] == ["ethernet"] * 2 + ["wifi"] * 3
    assert [d.availability for d in fleet] == [1.0, 1.0, 0.5, 0.5, 0.5]


@pytest.mark.parametrize(
    ("mix", "count", "expected"),
    [
        ({"wifi": 0.5, "5g": 0.5}, 10, {"wifi": 5, "5g": 5}),
        ({"wifi": 0.5, "5g": 0.5}, 7, {"wifi": 4, "5g": 3}),  # tie goes to the first listed
        ({"ethernet": 0.2, "wifi": 0.3, "5g": 0.5}, 9, {"ethernet": 2, "wifi": 3, "5g": 4}),
        ({"wifi": 1 / 3, "5g": 1 / 3, "4g": 1 / 3}, 100, {"wifi": 34, "5g": 33, "4g": 33}),
        ({"wifi": 0.0, "5g": 1.0}, 4, {"wifi": 0, "5g": 4}),
    ],
)
def test_network_mix_has_exact_proportions(mix: dict[str, float], count: int, expected: dict) -> None:
    # 9 x (0.2, 0.3, 0.5) = (1.8, 2.7, 4.5): floors (1, 2, 4), two left go to remainders 0.8 and 0.7
    assert split_counts(mix, count) == expected
    fleet = build_fleet([GroupSpec("phone_flagship", count, mix)], seed=3)
    got = Counter(d.network.name for d in fleet)
    assert {name: got.get(name, 0) for name in mix} == expected


def test_network_mix_is_deterministic_and_seed_dependent() -> None:
    groups = [GroupSpec("phone_midrange", 40, {"wifi": 0.5, "5g": 0.5})]

    def networks(seed: int) -> list[str]:
        return [d.network.name for d in build_fleet(groups, seed=seed)]

    assert networks(7) == networks(7)
    assert networks(7) != networks(8)
    assert networks(7)[:20] != ["wifi"] * 20  # shuffled, not laid out in blocks


def test_group_mix_does_not_depend_on_other_groups() -> None:
    mixed = GroupSpec("laptop", 20, {"wifi": 0.5, "4g": 0.5})
    first = build_fleet([GroupSpec("laptop", 5, "wifi"), mixed], seed=1)[5:]
    edited = build_fleet([GroupSpec("laptop", 5, {"wifi": 0.2, "4g": 0.8}), mixed], seed=1)[5:]
    assert [d.network.name for d in first] == [d.network.name for d in edited]
    assert [d.device_id for d in edited] == list(range(5, 25))


@pytest.mark.parametrize(
    ("group", "key"),
    [
        (GroupSpec("pi_zero", 1, "wifi"), "fleet.groups[1].device_class"),
        (GroupSpec("laptop", 0, "wifi"), "fleet.groups[1].count"),
        (GroupSpec("laptop", 1, "6g"), "fleet.groups[1].network"),
        (GroupSpec("laptop", 1, {"wifi": 0.5, "6g": 0.5}), "fleet.groups[1].network"),
        (GroupSpec("laptop", 1, {"wifi": 0.5, "5g": 0.4}), "fleet.groups[1].network"),
        (GroupSpec("laptop", 1, {"wifi": 1.5, "5g": -0.5}), "fleet.groups[1].network"),
        (GroupSpec("laptop", 1, {}), "fleet.groups[1].network"),
        (GroupSpec("laptop", 1, "wifi", availability=0.0), "fleet.groups[1].availability"),
        (GroupSpec("laptop", 1, "wifi", availability=1.2), "fleet.groups[1].availability"),
    ],
)
def test_bad_group_names_its_field(group: GroupSpec, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_fleet([GroupSpec("laptop", 1, "wifi"), group], seed=0)
    assert info.value.key == key


def test_empty_fleet_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"fleet\.groups"):
        build_fleet([], seed=0)


# --- jitter ----------------------------------------------------------------------------------------

FLEET = build_fleet(
    [GroupSpec("phone_flagship", 4, {"wifi": 0.5, "5g": 0.5}, 0.3), GroupSpec("laptop", 2, "ethernet")],
    seed=0,
)


def test_jitter_is_deterministic() -> None:
    device = FLEET[1]
    assert compute_slowdown(device, 5, 9) == compute_slowdown(device, 5, 9)
    assert link_rate_factor(device, 5, 9, "up") == link_rate_factor(device, 5, 9, "up")
    assert is_available(device, 5, 9) == is_available(device, 5, 9)
    slowdowns = {compute_slowdown(device, 5, r) for r in range(20)}
    assert len(slowdowns) == 20  # varies with the round
    assert compute_slowdown(FLEET[0], 5, 9) != compute_slowdown(FLEET[1], 5, 9)
    assert compute_slowdown(device, 5, 9) != compute_slowdown(device, 6, 9)
    assert link_rate_factor(device, 5, 9, "up") != link_rate_factor(device, 5, 9, "down")


def test_jitter_does_not_touch_global_random_state() -> None:
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    compute_slowdown(FLEET[0], 1, 1)
    link_rate_factor(FLEET[0], 1, 1, "down")
    is_available(FLEET[0], 1, 1)
    assert random.random() == expected


def test_link_rate_factor_in_range() -> None:
    for device in FLEET:
        half = device.network.rate_jitter
        factors = [link_rate_factor(device, 0, r, "up") for r in range(500)]
        assert all(1 - half <= f <= 1 + half for f in factors)
        assert max(factors) - min(factors) > half  # spreads over the interval
    assert link_rate_factor(FLEET[0], 0, 0, "up", jitter_scale=0.0) == 1.0


def test_compute_slowdown_is_mean_one_lognormal() -> None:
    device = FLEET[0]  # phone: sigma 0.2
    draws = [compute_slowdown(device, 0, r) for r in range(20_000)]
    assert all(d > 0 for d in draws)
    assert sum(draws) / len(draws) == pytest.approx(1.0, abs=0.01)
    logs = [math.log(d) for d in draws]
    mean_log = sum(logs) / len(logs)
    sd_log = math.sqrt(sum((x - mean_log) ** 2 for x in logs) / len(logs))
    assert sd_log == pytest.approx(0.2, rel=0.05)
    assert compute_slowdown(device, 0, 0, jitter_scale=0.0) == 1.0
    scaled = [compute_slowdown(device, 0, r, jitter_scale=2.0) for r in range(2000)]
    assert max(scaled) > max(draws[:2000])  # scale widens the spread


def test_availability_frequency_matches_probability() -> None:
    device = FLEET[0]  # availability 0.3
    online = sum(is_available(device, 11, r) for r in range(10_000))
    assert online / 10_000 == pytest.approx(0.3, abs=0.02)
    assert all(is_available(FLEET[-1], 11, r) for r in range(1000))  # availability 1.0


# --- summary ---------------------------------------------------------------------------------------


def test_fleet_summary_groups_by_class_and_network() -> None:
    rows = fleet_summary(FLEET)
    assert [(r.device_class, r.network, r.count) for r in rows] == [
        ("phone_flagship", FLEET[0].network.name, 2),
        ("phone_flagship", "5g" if FLEET[0].network.name == "wifi" else "wifi", 2),
        ("laptop", "ethernet", 2),
    ]
    laptop = rows[-1]
    assert laptop.effective_tflops == pytest.approx(0.845 * 0.25)
    assert laptop.memory_gib == 32 and laptop.rtt_ms == pytest.approx(0.5)
    assert laptop.uplink_mbps == pytest.approx(250) and laptop.mean_availability == 1.0


def test_fleet_table_rows_are_strings() -> None:
    rows = fleet_table_rows(FLEET)
    assert len(rows) == 3
    assert rows[-1]["device class"] == "laptop" and rows[-1]["count"] == "2"
    assert rows[-1]["mem GiB"] == "32"
    assert all(isinstance(v, str) for row in rows for v in row.values())


def test_fleet_package_does_not_import_torch() -> None:
    code = "import sys, fedspine.fleet; print(sorted({'torch', 'transformers', 'peft'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
