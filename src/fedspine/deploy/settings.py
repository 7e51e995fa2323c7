"""What a Flower run carries: the fedspine config (run config) and each node's device (node config).

The resolved fedspine config travels as TOML text under the run-config key ``fedspine-config``, so
the ServerApp and every ClientApp build the same experiment from the same bytes, wherever they run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from fedspine.config import Config, from_dict, tomllib
from fedspine.errors import ConfigError, DataError, DeployError

CONFIG_KEY = "fedspine-config"
"""Run-config key holding the resolved fedspine config as TOML text."""
OUT_KEY = "out-dir"
"""Run-config key: the directory (on the server's machine) that receives the run's records."""
TIMEOUT_KEY = "round-timeout"
"""Run-config key: seconds the server waits for a round's replies when the config has no deadline."""
NODES_KEY = "wait-for-nodes"
"""Run-config key: seconds the server waits for every device's node to connect before starting."""
BIND_KEY = "node-devices"
"""Run-config key: Flower node id -> device id, as ``"NODE=DEVICE,NODE=DEVICE"`` (empty: nodes say who
they are). With it, only those nodes take part, each as its bound device."""
RESUME_KEY = "resume"
"""Run-config key: ``true`` continues the interrupted run in ``out-dir`` from its newest checkpoint
(``flwr run APP --run-config "resume=true"``); ``false`` (the app's default) starts a new run."""
DATA_KEY = "node-data"
"""Run-config key: where the devices' training data comes from. ``"local"`` (the default): each node
reads its own file (:data:`DATA_PATH_KEY`) and the server never sees it; ``"shared"``: a testbed's
nodes derive their partition of the config's data source, as the simulator does."""
DATA_MODES = ("local", "shared")
DATA_PATH_KEY = "data-path"
"""Node-config key: the node's own data file (``.jsonl`` or ``.csv``), for ``node-data = "local"``."""
WORKER_KEY = "worker"
"""Node-config key: the Unix socket of this node's warm worker (``fedspine deploy worker``), which
keeps the model built across messages; without it, each message's ClientApp process builds it."""
MODEL_DIR_KEY = "model-dir"
"""Node-config key: where the node saves the final models runs give it (default ``~/.fedspine/models``)."""
MODEL_ACTION = "query.model"
"""The message type that hands a device its final model."""
DEVICE_KEY = "device-id"
"""Node-config key: which device of the config's fleet this SuperNode is."""
PARTITION_KEY = "partition-id"
"""Node-config key Flower's simulation engine gives its virtual nodes; used when ``device-id`` is absent."""

MAX_SECONDS = 7 * 24 * 3600.0
"""Longest round timeout or wait for the nodes: a week. Longer is a mistake; NaN would make every
timeout comparison false (a round that waits forever), and infinity is the same wait, spelled out."""

Value = bool | float | int | str
"""A Flower run- or node-config value."""


def config_from_run(run_config: Mapping[str, Value]) -> tuple[Config, str]:
    """The fedspine config of the run and its TOML text."""
    text = run_config.get(CONFIG_KEY)
    if not isinstance(text, str) or not text.strip():
        raise DeployError(f"the Flower run config has no '{CONFIG_KEY}' (the fedspine config as TOML text)")
    try:
        config = from_dict(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(CONFIG_KEY, f"invalid TOML: {exc}") from exc
    if config.executor.name != "simulation":
        raise ConfigError(
            "executor.name",
            f"{config.executor.name!r} is for simulated runs; a deployment trains on its SuperNodes",
        )
    return config, text


def device_id_from_node(node_config: Mapping[str, Value]) -> int:
    """The device id given to this SuperNode with ``--node-config "device-id=N"``."""
    value = node_config.get(DEVICE_KEY, node_config.get(PARTITION_KEY))
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise DeployError(
            f"the SuperNode's node config needs '{DEVICE_KEY}' as a non-negative integer "
            f'(flower-supernode --node-config "{DEVICE_KEY}=0"), got {value!r}'
        )
    return value


def data_mode(run_config: Mapping[str, Value]) -> str:
    """The run's :data:`DATA_KEY`: ``"local"`` (absent) or ``"shared"``."""
    value = run_config.get(DATA_KEY, "local")
    if value not in DATA_MODES:
        raise DeployError(f"run config '{DATA_KEY}' must be one of {', '.join(DATA_MODES)}, got {value!r}")
    return str(value)


def data_path_from_node(node_config: Mapping[str, Value]) -> str:
    """The node's own data file (:data:`DATA_PATH_KEY`).

    Raises:
        DataError: the node config names none (the node's tasks are then refused, not the run).
    """
    value = node_config.get(DATA_PATH_KEY)
    if not isinstance(value, str) or not value.strip():
        raise DataError(
            f"this node's config names no '{DATA_PATH_KEY}' "
            f"""(flower-supernode --node-config '{DEVICE_KEY}=0 {DATA_PATH_KEY}="/path/to/data.jsonl"')"""
        )
    return value


def node_bindings(run_config: Mapping[str, Value]) -> dict[int, int] | None:
    """The run's node -> device bindings (:data:`BIND_KEY`), or None when it has none."""
    text = run_config.get(BIND_KEY, "")
    if not isinstance(text, str):
        raise DeployError(f"run config '{BIND_KEY}' must be text like \"12345=0,67890=1\", got {text!r}")
    if not text.strip():
        return None
    bound: dict[int, int] = {}
    for item in text.split(","):
        node, sep, device = item.strip().partition("=")
        if not sep or not node.strip().isdigit() or not device.strip().isdigit():
            raise DeployError(f"run config '{BIND_KEY}': {item.strip()!r} is not NODE=DEVICE")
        if int(device) in bound.values() or int(node) in bound:
            raise DeployError(f"run config '{BIND_KEY}': node {node} or device {device} is bound twice")
        bound[int(node)] = int(device)
    return bound


def number(run_config: Mapping[str, Value], key: str, default: float) -> float:
    """A number of seconds in the run config (above 0, at most :data:`MAX_SECONDS`), or ``default``
    when absent."""
    value = run_config.get(key, default)
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not 0 < value <= MAX_SECONDS
    ):
        raise DeployError(
            f"run config '{key}' must be a number of seconds above 0 and at most {MAX_SECONDS:g}, "
            f"got {value!r}"
        )
    return float(value)


def flag(run_config: Mapping[str, Value], key: str) -> bool:
    """A boolean run-config setting (absent: false)."""
    value = run_config.get(key, False)
    if not isinstance(value, bool):
        raise DeployError(f"run config '{key}' must be true or false, got {value!r}")
    return value
