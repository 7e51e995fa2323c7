"""The catalog of real device classes and network presets the simulated fleet is drawn from.

Device classes (effective figures; ``algorithms.md`` §10.2-§10.3). ``peak_flops`` is the dense peak in
the precision training runs in (fp16 on GPUs, with tensor cores where the GPU has them; fp32 on CPUs),
derived as units x FLOP/cycle x clock. ``memory_bandwidth`` is the vendor peak of the memory interface
for every class alike, so that classes compare fairly on the roofline's memory term.
``memory_bytes`` is what one training process can use: the whole board on headless Linux devices and
the laptop, the per-app budget on phones (Android kills apps well below physical RAM).

| class              | peak TFLOPS        | MFU  | eff. TFLOPS | GB/s  | mem GiB | dtype | sigma |
| ------------------ | ------------------ | ---- | ----------- | ----- | ------- | ----- | ----- |
| raspberry_pi_4     | 0.048 fp32 (CPU)   | 0.20 | 0.0096      | 12.8  | 8       | 4     | 0.05  |
| raspberry_pi_5     | 0.154 fp32 (CPU)   | 0.20 | 0.031       | 17.1  | 8       | 4     | 0.05  |
| phone_midrange     | 1.16 fp16 (GPU)    | 0.15 | 0.17        | 51.2  | 3       | 2     | 0.20  |
| laptop             | 0.845 fp32 (CPU)   | 0.25 | 0.21        | 76.8  | 32      | 4     | 0.05  |
| jetson_tx2         | 1.33 fp16 (GPU)    | 0.20 | 0.27        | 59.7  | 8       | 2     | 0.10  |
| phone_flagship     | 5.55 fp16 (GPU)    | 0.15 | 0.83        | 76.8  | 6       | 2     | 0.20  |
| jetson_orin_nano   | 10.2 fp16 (tensor) | 0.25 | 2.55        | 68.0  | 8       | 2     | 0.10  |
| jetson_orin_nx     | 15.0 fp16 (tensor) | 0.25 | 3.75        | 102.4 | 16      | 2     | 0.10  |
| jetson_agx_orin    | 42.6 fp16 (tensor) | 0.25 | 10.65       | 204.8 | 64      | 2     | 0.10  |

Orin tensor-core rate: Orin's Ampere SMs run fp16 (fp32 accumulate) at 2048 dense FLOP/cycle/SM, the
GA100 rate. This reproduces NVIDIA's sparse INT8 figures: Orin Nano 8 SM x 625 MHz x 8192 = 41 TOPS
("40 TOPS"), AGX Orin 16 SM x 1.3 GHz x 8192 = 170 TOPS. MFU sits inside the ranges of §10.3; the older
Pascal TX2 and phone GPUs (immature training stacks, thermal limits) sit at the low end.

Network presets (application-level effective rates; ``algorithms.md`` §10.1). Hayek et al. measured
5G-SA uplink time = 33.3x Ethernet and 17.8x WiFi on the same Raspberry Pi clients, so effective uplink
rates stand Eth : WiFi : 5G = 33.3 : 1.87 : 1. Anchoring Ethernet at 250 Mbit/s (a Pi 4's GbE capped by
Python/gRPC serialisation) gives the rest:

| preset        | UL Mbit/s          | DL Mbit/s | RTT ms | k   | jitter | derivation                    |
| ------------- | ------------------ | --------- | ------ | --- | ------ | ----------------------------- |
| ethernet      | 250                | 250       | 0.5    | 2   | 0.05   | anchor (200-300 effective)    |
| wifi          | 133.5 (5G x 17.8)  | 200       | 3      | 2   | 0.20   | Eth / WiFi = 1.87             |
| 5g            | 7.5 (Eth / 33.3)   | 50        | 25     | 3   | 0.30   | SDR gNB, TDD, uplink-limited  |
| 5g_commercial | 40                 | 200       | 35     | 3   | 0.30   | typical, far below modem peak |
| 4g            | 10                 | 40        | 50     | 3   | 0.30   | LTE typical                   |

Uplink time of a payload, latency aside: 5G / Eth = 250 / 7.5 = 33.3, 5G / WiFi = 133.5 / 7.5 = 17.8.
k = handshakes (round trips per transfer); cellular links pay one more (connection setup) and
+-30% rate jitter (§10.1).
"""

from __future__ import annotations

from fedspine.errors import ConfigError
from fedspine.types import DeviceClass, NetworkProfile

_GIB = 2**30
_GB_S = 1e9  # bytes/s per GB/s
_TFLOPS = 1e12
_MBPS = 1e6  # bits/s per Mbit/s
_MS = 1e-3

_DEVICES: tuple[DeviceClass, ...] = (
    DeviceClass(
        name="raspberry_pi_4",
        description="Raspberry Pi 4 Model B 8GB (4x Cortex-A72 @ 1.5 GHz, CPU only)",
        peak_flops=0.048 * _TFLOPS,  # 4 cores x 1.5 GHz x 8 fp32 FLOP/cycle (one 128-bit FMA)
        mfu=0.20,
        memory_bandwidth=12.8 * _GB_S,  # LPDDR4-3200, 32-bit
        memory_bytes=8 * _GIB,
        train_dtype_bytes=4,
        slowdown_sigma=0.05,
        source="RPi 4 datasheet; HPL ~8 GFLOPS fp64 (feiereisen.net); algorithms.md 10.2",
    ),
    DeviceClass(
        name="raspberry_pi_5",
        description="Raspberry Pi 5 8GB (4x Cortex-A76 @ 2.4 GHz, CPU only)",
        peak_flops=0.1536 * _TFLOPS,  # 4 cores x 2.4 GHz x 16 fp32 FLOP/cycle (two 128-bit FMA)
        mfu=0.20,
        memory_bandwidth=17.1 * _GB_S,  # LPDDR4X-4267, 32-bit
        memory_bytes=8 * _GIB,
        train_dtype_bytes=4,
        slowdown_sigma=0.05,
        source="RPi 5 product brief (BCM2712); Arm Cortex-A76 optimisation guide",
    ),
    DeviceClass(
        name="jetson_tx2",
        description="NVIDIA Jetson TX2 8GB (Pascal, 256 CUDA cores @ 1.3 GHz)",
        peak_flops=1.33 * _TFLOPS,  # fp16 at 2x the 0.665 TFLOPS fp32 rate
        mfu=0.20,
        memory_bandwidth=59.7 * _GB_S,  # LPDDR4, 128-bit
        memory_bytes=8 * _GIB,
        train_dtype_bytes=2,
        slowdown_sigma=0.10,
        source="NVIDIA Jetson TX2 module datasheet",
    ),
    DeviceClass(
        name="jetson_xavier_nx",
        description="NVIDIA Jetson Xavier NX 8GB (Volta, 384 CUDA / 48 tensor cores @ 1.1 GHz)",
        peak_flops=6.76 * _TFLOPS,  # 48 tensor cores x 1.1 GHz x 128 fp16 FLOP/cycle (64 FMA)
        mfu=0.20,
        memory_bandwidth=51.2 * _GB_S,  # LPDDR4x, 128-bit at 1600 MHz
        memory_bytes=8 * _GIB,
        train_dtype_bytes=2,
        slowdown_sigma=0.10,
        source="NVIDIA Jetson Xavier NX data sheet DA-09366-001 (21 INT8 TOPS, 1100 MHz GPU, 8 GB LPDDR4x)",
    ),
    DeviceClass(
        name="jetson_agx_xavier",
        description="NVIDIA Jetson AGX Xavier 32GB (Volta, 512 CUDA / 64 tensor cores @ 1.377 GHz)",
        peak_flops=11.3 * _TFLOPS,  # 64 tensor cores x 1.377 GHz x 128 fp16 FLOP/cycle (64 FMA)
        mfu=0.20,
        memory_bandwidth=136.5 * _GB_S,  # LPDDR4x, 256-bit at 2133 MHz
        memory_bytes=32 * _GIB,
        train_dtype_bytes=2,
        slowdown_sigma=0.10,
        source="NVIDIA Jetson AGX Xavier module data sheet (32 INT8 TOPS, 1377 MHz GPU, 32 GB at 137 GB/s)",
    ),
    DeviceClass(
        name="jetson_orin_nano",
        description="NVIDIA Jetson Orin Nano 8GB (Ampere, 8 SM / 32 tensor cores @ 625 MHz, 15 W)",
        peak_flops=10.2 * _TFLOPS,  # 8 SM x 625 MHz x 2048 fp16 tensor FLOP/cycle (dense)
        mfu=0.25,
        memory_bandwidth=68.0 * _GB_S,  # LPDDR5, 128-bit (original, not "Super")
        memory_bytes=8 * _GIB,
        train_dtype_bytes=2,
        slowdown_sigma=0.10,
        source="NVIDIA Orin Nano datasheet (40 sparse INT8 TOPS, 68 GB/s); algorithms.md 10.2",
    ),
    DeviceClass(
        name="jetson_orin_nx",
        description="NVIDIA Jetson Orin NX 16GB (Ampere, 8 SM / 32 tensor cores @ 918 MHz)",
        peak_flops=15.0 * _TFLOPS,  # 8 SM x 918 MHz x 2048 fp16 tensor FLOP/cycle (dense)
        mfu=0.25,
        memory_bandwidth=102.4 * _GB_S,  # LPDDR5, 128-bit
        memory_bytes=16 * _GIB,
        train_dtype_bytes=2,
        slowdown_sigma=0.10,
        source="NVIDIA Jetson Orin NX series datasheet",
    ),
    DeviceClass(
        name="jetson_agx_orin",
        description="NVIDIA Jetson AGX Orin 64GB (Ampere, 16 SM / 64 tensor cores @ 1.3 GHz)",
        peak_flops=42.6 * _TFLOPS,  # 16 SM x 1.3 GHz x 2048 fp16 tensor FLOP/cycle (dense)
        mfu=0.25,
        memory_bandwidth=204.8 * _GB_S,  # LPDDR5, 256-bit
        memory_bytes=64 * _GIB,
        train_dtype_bytes=2,
        slowdown_sigma=0.10,
        source="NVIDIA Jetson AGX Orin technical brief (170 sparse INT8 TOPS)",
    ),
    DeviceClass(
        name="phone_midrange",
        description="Mid-range phone, Dimensity 7200 class (Mali-G610 MC4 @ 1.13 GHz), 8 GB",
        peak_flops=1.16 * _TFLOPS,  # 4 cores x 1.13 GHz x 128 fp32 FLOP/cycle, fp16 at 2x
        mfu=0.15,
        memory_bandwidth=51.2 * _GB_S,  # LPDDR5-6400, 64-bit
        memory_bytes=3 * _GIB,  # app budget of an 8 GB phone
        train_dtype_bytes=2,
        slowdown_sigma=0.20,
        source="MediaTek Dimensity 7200 spec; Arm Mali-G610 (Valhall) core rates",
    ),
    DeviceClass(
        name="phone_flagship",
        description="Flagship phone, Snapdragon 8 Gen 3 class (Adreno 750 @ 903 MHz), 16 GB",
        peak_flops=5.55 * _TFLOPS,  # 1536 ALUs x 903 MHz x 2 = 2.77 fp32 TFLOPS, fp16 at 2x
        mfu=0.15,
        memory_bandwidth=76.8 * _GB_S,  # LPDDR5X-9600, 64-bit
        memory_bytes=6 * _GIB,  # app budget of a 12-16 GB phone
        train_dtype_bytes=2,
        slowdown_sigma=0.20,
        source="Qualcomm Snapdragon 8 Gen 3 product brief; Xiao et al. arXiv 2410.03613",
    ),
    DeviceClass(
        name="laptop",
        description="Laptop, 8-core x86 CPU (Zen 4 class @ 3.3 GHz all-core), 32 GB, CPU training",
        peak_flops=0.845 * _TFLOPS,  # 8 cores x 3.3 GHz x 32 fp32 FLOP/cycle (two 256-bit FMA)
        mfu=0.25,
        memory_bandwidth=76.8 * _GB_S,  # DDR5-4800, dual channel (128-bit)
        memory_bytes=32 * _GIB,
        train_dtype_bytes=4,
        slowdown_sigma=0.05,
        source="AMD Ryzen 7 7840U spec; Zen 4 FP pipes (2x256-bit FMA)",
    ),
)

_NETWORKS: tuple[NetworkProfile, ...] = (
    NetworkProfile("ethernet", 250 * _MBPS, 250 * _MBPS, 0.5 * _MS, handshakes=2, rate_jitter=0.05),
    NetworkProfile("wifi", 133.5 * _MBPS, 200 * _MBPS, 3 * _MS, handshakes=2, rate_jitter=0.20),
    NetworkProfile("5g", 7.5 * _MBPS, 50 * _MBPS, 25 * _MS, handshakes=3, rate_jitter=0.30),
    NetworkProfile("5g_commercial", 40 * _MBPS, 200 * _MBPS, 35 * _MS, handshakes=3, rate_jitter=0.30),
    NetworkProfile("4g", 10 * _MBPS, 40 * _MBPS, 50 * _MS, handshakes=3, rate_jitter=0.30),
)

DEVICE_CATALOG: dict[str, DeviceClass] = {d.name: d for d in _DEVICES}
"""Known device classes by name."""

NETWORK_PRESETS: dict[str, NetworkProfile] = {n.name: n for n in _NETWORKS}
"""Known network presets by name."""


def device_class(name: str, key: str = "device_class") -> DeviceClass:
    """Look up a device class by catalog name.

    Args:
        name: catalog key, e.g. ``"jetson_orin_nano"``.
        key: dotted config key the name came from, for the error message.

    Raises:
        ConfigError: the name is not in the catalog; the message lists the known names.
    """
    if name not in DEVICE_CATALOG:
        raise ConfigError(key, f"unknown device class {name!r}; known: {', '.join(sorted(DEVICE_CATALOG))}")
    return DEVICE_CATALOG[name]


def network_profile(name: str, key: str = "network") -> NetworkProfile:
    """Look up a network preset by name.

    Args:
        name: preset key, e.g. ``"wifi"``.
        key: dotted config key the name came from, for the error message.

    Raises:
        ConfigError: the name is not a preset; the message lists the known names.
    """
    if name not in NETWORK_PRESETS:
        raise ConfigError(key, f"unknown network {name!r}; known: {', '.join(sorted(NETWORK_PRESETS))}")
    return NETWORK_PRESETS[name]
