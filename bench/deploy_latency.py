"""Where a deployed round's time goes, on loopback: a real SuperLink (TLS, node authentication) and
SuperNodes on this host, each node with its own data file, running the default model and task.

Per task (from the run's records): ``downlink_seconds`` (server send -> the ClientApp's handler
starts: SuperNode polling, the ClientApp process starting and importing), ``setup_seconds`` (the
handler building the model and data), ``train_seconds`` (the training loop), the rest of
``compute_seconds`` (encoding the reply), ``uplink_seconds`` (reply -> the server has it). Prints the
medians, the round times, and the setup's share of training. The last line is
``RESULT setup_share=... start_seconds=... round_seconds=...``.

Usage:
    python bench/deploy_latency.py                 # 2 devices, 2 rounds, the default model
    python bench/deploy_latency.py --shared        # the nodes derive the simulator's partitions
    python bench/deploy_latency.py --warm          # each node hands its messages to a warm worker
    python bench/deploy_latency.py --quick         # the tiny model
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from _benchpath import ROOT, host_line  # first: keeps bench/ off sys.path

sys.path.insert(0, str(ROOT))  # the loopback helper of the test suite
from tests.deployment import Loopback, write_node_files

from fedspine.config import load_config
from fedspine.deploy.setup import write_app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="the tiny model")
    parser.add_argument(
        "--shared", action="store_true", help="nodes derive the shared partition (the testbed mode)"
    )
    parser.add_argument("--warm", action="store_true", help="each node hands its messages to a warm worker")
    args = parser.parse_args()
    devices = 2
    overrides = [
        f'fleet.groups=[{{device_class = "laptop", count = {devices}, network = "wifi"}}]',
        f"scheduler.clients_per_round={devices}",
        f"scheduler.rounds={args.rounds}",
        f"run.threads={args.threads}",
        "eval.at_start=false",
        "eval.every=1000",
        "data.test_size=30",
        "export.save=false",
        "export.speed=false",
    ]
    cfg = load_config(ROOT / "configs" / "tiny.toml" if args.quick else None, overrides)
    data = "shared partitions" if args.shared else "own data files"
    data += ", warm workers" if args.warm else ""
    print(host_line(f"{devices} SuperNodes on loopback, {args.rounds} rounds, {cfg.model.source}, {data}"))
    with tempfile.TemporaryDirectory() as tmp, Loopback(Path(tmp)) as dep:
        dep.start_superlink()
        pairs = dep.keys([f"node{i}" for i in range(devices)])
        for _, public in pairs:
            dep.register(public)
        files = write_node_files(dep.root, per_device=80)
        for i, (private, _) in enumerate(pairs):
            socket = dep.root / f"worker{i}.sock"
            if args.warm:
                dep.start_worker(f"worker{i}", socket)
            worker = str(socket) if args.warm else ""
            dep.start_supernode(f"node{i}", private, i, data_path=files[i], worker=worker)
        dep.wait_connected([f"node{i}" for i in range(devices)])
        out = dep.root / "run"
        write_app(dep.root / "app", cfg, out, round_timeout=900, wait_for_nodes=120, shared_data=args.shared)
        done = dep.run_app(dep.root / "app", timeout=1800)
        if not (out / "summary.json").exists():
            sys.exit(f"the run did not finish:\n{done.stdout}{done.stderr}")
        events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    tasks = [e for e in events if e["event"] == "task" and e["status"] == "ok"]

    def median(key: str) -> float:
        return statistics.median(float(t[key]) for t in tasks)

    encode = statistics.median(
        float(t["compute_seconds"] - t["setup_seconds"] - t["train_seconds"]) for t in tasks
    )
    print(f"\n{len(tasks)} tasks; medians in seconds:")
    for label, value in (
        ("downlink (polling, process start, imports)", median("downlink_seconds")),
        ("setup (model and data)", median("setup_seconds")),
        ("training loop", median("train_seconds")),
        ("reply encoding", encode),
        ("uplink (until the server has it)", median("uplink_seconds")),
    ):
        print(f"  {label:44} {value:8.3f}")
    round_seconds = statistics.median(_round_times(events))
    share = median("setup_seconds") / median("train_seconds")
    print(f"  {'round (first send -> last arrival)':44} {round_seconds:8.3f}")
    print(f"setup / training = {share:.1%}")
    start = median("downlink_seconds")
    print(f"RESULT setup_share={share:.3f} start_seconds={start:.2f} round_seconds={round_seconds:.2f}")


def _round_times(events: list[dict]) -> list[float]:
    """Per round: the latest arrival minus the earliest send of its tasks."""
    by_round: dict[int, list[dict]] = {}
    for e in events:
        if e["event"] == "task":
            by_round.setdefault(int(e["round"]), []).append(e)
    return [
        max(t["virtual_end"] for t in ts) - min(t["virtual_start"] for t in ts) for ts in by_round.values()
    ]


if __name__ == "__main__":
    main()
