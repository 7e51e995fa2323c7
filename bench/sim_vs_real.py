"""The simulator's cost model against the wall clock: calibrate this host, then run one job simulated
and deployed on loopback, and compare each task's compute time.

1. ``fedspine calibrate`` measures this host for the config's model and task and writes a profile;
2. the same job (a fleet of ``--devices`` devices of that profile on Ethernet, one device per round,
   ``--rounds`` rounds, FedIT, the nodes deriving the simulator's partitions) runs
   * simulated: each task's compute time is the cost model's (virtual seconds);
   * deployed: a SuperLink (TLS, node authentication) and one SuperNode per device on this host, as
     docs/deploy.md starts them; each task's training loop is timed on its node. One device per
     round, so no two tasks share the host's cores;
3. tasks are paired by (round, device) (the same seed samples the same device, which trains the same
   batches on both sides) and the per-task error ``simulated / measured - 1`` is printed, with its
   median and the median of its magnitude.

Both sides train with ``--threads`` torch threads. The last line is
``RESULT median_error=... median_abs_error=... tasks=...``.

Usage:
    python bench/sim_vs_real.py                   # the default model and task, 3 devices, 6 rounds
    python bench/sim_vs_real.py --quick           # the tiny model (a smoke test of the pipeline)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from _benchpath import ROOT, host_line  # first: keeps bench/ off sys.path

sys.path.insert(0, str(ROOT))  # the loopback helper of the test suite
from tests.deployment import Loopback

from fedspine.api import run_experiment
from fedspine.config import Config, load_config
from fedspine.deploy.setup import write_app
from fedspine.fleet.profile import profile_toml
from fedspine.runtime.calibrate import calibrate


def job(profile: Path, devices: int, rounds: int, threads: int, quick: bool) -> Config:
    base = ROOT / "configs" / "tiny.toml" if quick else None
    overrides = [
        f'fleet.groups=[{{count = {devices}, network = "ethernet", profile = "{profile}"}}]',
        "scheduler.clients_per_round=1",  # one task at a time: tasks never share the host's cores
        f"scheduler.rounds={rounds}",
        "strategy.name=fedit",
        f"run.threads={threads}",
        "eval.at_start=false",
        "eval.every=1000",
        "data.test_size=30",
        "export.save=false",
        "export.speed=false",
        "run.checkpoint_every=0",
    ]
    if quick:
        overrides += ["data.max_examples=400"]
    return load_config(base, overrides)


def run_deployed(cfg: Config, out: Path, devices: int) -> list[dict[str, Any]]:
    """The job on loopback: a SuperLink (TLS, node authentication) and one SuperNode per device, each
    deriving the simulator's partition (so both sides train the same batches)."""
    with Loopback(out.parent / "loopback") as dep:
        dep.start_superlink()
        pairs = dep.keys([f"node{i}" for i in range(devices)])
        for _, public in pairs:
            dep.register(public)
        for i, (private, _) in enumerate(pairs):
            dep.start_supernode(f"node{i}", private, i)
        dep.wait_connected([f"node{i}" for i in range(devices)])
        write_app(dep.root / "app", cfg, out, round_timeout=1800, wait_for_nodes=120, shared_data=True)
        done = dep.run_app(dep.root / "app", timeout=3600)
        if not (out / "summary.json").exists():
            raise SystemExit(f"the deployed run did not finish:\n{done.stdout}{done.stderr}")
    return _tasks(out)


def _tasks(run_dir: Path) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == "task" and e["status"] == "ok"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="the tiny model: a smoke test")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    print(host_line(f"{os.cpu_count()} CPUs, {args.devices} devices, {args.rounds} rounds, FedIT"))
    with tempfile.TemporaryDirectory() as tmp:
        profile = Path(tmp) / "host.toml"
        plain = load_config(ROOT / "configs" / "tiny.toml" if args.quick else None, _plain(args))
        result = calibrate(plain, "host", tasks=3, status=lambda m: print(f"  calibrate: {m}", flush=True))
        profile.write_text(profile_toml(result.device_class, result.measured), encoding="utf-8")
        step = result.measured["train_seconds_per_step"]
        print(f"calibrated: {step:.3f} s/step, {result.device_class.peak_flops / 1e9:.1f} GFLOP/s")
        cfg = job(profile, args.devices, args.rounds, args.threads, args.quick)
        simulated = {
            (t["round"], t["device_id"]): t for t in _tasks(run_experiment(cfg, Path(tmp) / "sim").run_dir)
        }
        deployed = {
            (t["round"], t["device_id"]): t for t in run_deployed(cfg, Path(tmp) / "real", args.devices)
        }
    pairs = sorted(simulated.keys() & deployed.keys())
    if not pairs:
        sys.exit("no task ran on both sides")
    print(f"\n{'round':>5} {'device':>6} {'simulated s':>12} {'measured s':>11} {'error':>7}")
    errors = []
    for key in pairs:
        sim, real = simulated[key]["compute_seconds"], deployed[key]["train_seconds"]
        errors.append(sim / real - 1)
        print(f"{key[0]:5d} {key[1]:6d} {sim:12.3f} {real:11.3f} {errors[-1]:+7.1%}")
    median = statistics.median(errors)
    magnitude = statistics.median(abs(e) for e in errors)
    print(
        f"\nper-task compute time, simulated vs measured: median error {median:+.1%}, "
        f"median |error| {magnitude:.1%}"
    )
    print(f"RESULT median_error={median:.3f} median_abs_error={magnitude:.3f} tasks={len(pairs)}")


def _plain(args: argparse.Namespace) -> list[str]:
    """The calibration's config: the job's model, task and batch shape on this host."""
    overrides = [f"run.threads={args.threads}", "data.test_size=30"]
    return [*overrides, "data.max_examples=400"] if args.quick else overrides


if __name__ == "__main__":
    main()
