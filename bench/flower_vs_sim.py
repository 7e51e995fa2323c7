"""The same FedIT workload in fedspine's simulator and in Flower's simulation engine: wall time.

Both sides run one config (the tiny model, a 10-device fleet, every device in every round, 3 rounds,
seed 0) through the same strategy and local-training code; they differ only in the executor:

* ``fedspine``: the simulator's engine, every task trained in this process;
* ``flower``: fedspine's ServerApp and ClientApp (``fedspine.deploy.app``) in Flower's simulation
  engine (``flwr.simulation.run_simulation`` on Ray, one ClientApp actor per core): every task is a
  Flower message, a ClientApp builds the experiment once per actor.

Prints wall time end to end (Flower's includes starting Ray) and of the federated loop alone (the
summary's ``wall_seconds``), their ratios, and checks that both reached the same final model (equal
final evaluation loss). The last line is ``RESULT sim_speedup_vs_flower=... loop_speedup=...``.

Usage:
    python bench/flower_vs_sim.py              # 10 devices, 3 rounds (about 2 min on 2 cores)
    python bench/flower_vs_sim.py --devices 4 --rounds 1 --quick
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _benchpath import host_line  # first: keeps bench/ off sys.path
from fedspine.api import run_experiment
from fedspine.config import Config, load_config, to_toml

TINY = Path(__file__).parents[1] / "configs" / "tiny.toml"


def config(devices: int, rounds: int, quick: bool) -> Config:
    overrides = [
        f'fleet.groups=[{{device_class = "jetson_orin_nano", count = {devices}, network = "wifi"}}]',
        f"scheduler.clients_per_round={devices}",
        f"scheduler.rounds={rounds}",
        "strategy.name=fedit",
        "eval.at_start=false",
        "export.save=false",
        "export.speed=false",
    ]
    if quick:
        overrides += ["data.test_size=40", "train.local_steps=2"]
    return load_config(TINY, overrides)


def run_sim(cfg: Config, out: Path) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    summary = run_experiment(cfg, out).summary.to_json()
    return time.perf_counter() - started, summary


def run_flower(cfg: Config, out: Path, devices: int) -> tuple[float, dict[str, Any]]:
    from flwr.simulation import run_simulation

    from fedspine.deploy.app import make_apps
    from fedspine.deploy.settings import CONFIG_KEY, DATA_KEY, NODES_KEY, OUT_KEY

    # the simulator's partitions on both sides: the comparison is of the engines, not of the data
    server_app, client_app = make_apps(
        {CONFIG_KEY: to_toml(cfg), OUT_KEY: str(out), NODES_KEY: 300.0, DATA_KEY: "shared"}
    )
    cores = os.cpu_count() or 1
    started = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=devices,
        backend_name="ray",
        backend_config={
            "init_args": {"num_cpus": cores, "num_gpus": 0, "include_dashboard": False},
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        },
    )
    seconds = time.perf_counter() - started
    summary_path = out / "summary.json"
    if not summary_path.exists():
        raise SystemExit("the Flower run did not finish (no summary.json); see the log above")
    return seconds, json.loads(summary_path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="runs per side (the median is reported)")
    parser.add_argument("--quick", action="store_true", help="fewer steps and test examples (a smoke test)")
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_worker_niceness", "0")  # at 15 (Ray's default) a busy host starves them
    logging.getLogger("flwr").setLevel(logging.WARNING)
    cfg = config(args.devices, args.rounds, args.quick)
    print(host_line(f"{args.devices} devices, {args.rounds} rounds, FedIT, tiny model"))
    sides: dict[str, list[tuple[float, dict[str, Any]]]] = {"fedspine": [], "flower": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            sides["fedspine"].append(run_sim(cfg, Path(tmp) / f"sim{repeat}"))
            sides["flower"].append(run_flower(cfg, Path(tmp) / f"flower{repeat}", args.devices))
    total = {name: statistics.median(s for s, _ in runs) for name, runs in sides.items()}
    loop = {name: statistics.median(r["wall_seconds"] for _, r in runs) for name, runs in sides.items()}
    losses = {name: runs[0][1]["final_eval_loss"] for name, runs in sides.items()}
    tasks = {name: runs[0][1]["tasks"]["ok"] for name, runs in sides.items()}
    print(f"\n{'side':9} {'wall s':>8} {'loop s':>8} {'tasks ok':>8} {'final eval loss':>16}")
    for name in sides:
        print(f"{name:9} {total[name]:8.1f} {loop[name]:8.1f} {tasks[name]:8d} {losses[name]:16.6f}")
    same = abs(losses["fedspine"] - losses["flower"]) <= 1e-4 * abs(losses["fedspine"])
    print(f"same final model: {'yes' if same else 'NO'} (final evaluation loss)")
    speedup, loop_speedup = total["flower"] / total["fedspine"], loop["flower"] / loop["fedspine"]
    print(f"fedspine's simulator: {speedup:.2f}x faster end to end, {loop_speedup:.2f}x in the loop")
    result = f"sim_speedup_vs_flower={speedup:.2f} loop_speedup={loop_speedup:.2f} same_model={int(same)}"
    print(f"RESULT {result}")


if __name__ == "__main__":
    main()
