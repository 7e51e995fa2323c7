"""Aggregation throughput: GB/s of LoRA update data merged, beside a plain memory copy in the same run.

Builds ``--clients`` fp32 updates of a SmolLM2-135M-sized adapter in memory (30 layers; LoRA on q, k,
v, o, gate, up and down projections) and times ``aggregate(strategy, updates)`` for each strategy.

Conventions: GB = 1e9 bytes. Aggregation GB/s = bytes of all A and B tensors of all updates / seconds
of ``aggregate`` (accumulate + finalize). Copy GB/s = bytes of the source tensor / seconds of
``dst.copy_(src)`` of as many bytes as the updates (each byte is read once and written once). The
copy and the headline FedIT aggregation are timed alternately, so both see the same machine (the
memory bandwidth of this shared VM drifts by tens of percent within a minute). Every figure is the
median of ``--repeats`` timed runs after one untimed warm-up run.

Rows: every strategy on the same rank-8 updates (the headline is FedIT), FedIT through a LIFL tree
(``fan_in`` 10, exercising ``merge``), and the zero-padding strategies on updates of mixed ranks
{2, 4, 8} (exercising the padding path). The stacked strategies (FLoRA, FlexLoRA) only append blocks
while accumulating; their cost is in ``finalize`` (FLoRA: ``B_s A_s``; FlexLoRA: QR + SVD of a
(sum r_k)-wide core per module), shown apart and timed ``--stacked-repeats`` times without warm-up.
FlexLoRA's SVDs take tens of seconds for the whole model, so it runs on the first
``--flexlora-layers`` layers; its cost is per module, so the full model takes 30 / that times longer.

Usage:
    python bench/aggregate.py [--clients 100] [--repeats 7] [--stacked-repeats 3] [--flexlora-layers 1]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

import _benchpath  # noqa: F401  (must precede the fedspine imports)
from fedspine.algorithms.aggregate import aggregate
from fedspine.algorithms.strategies import STRATEGIES, Strategy
from fedspine.types import ClientUpdate

GB = 1e9
RANK = 8
LORA_ALPHA = 16.0
SMOLLM2_MODULES = {  # (out_features, in_features): hidden 576, 3 KV heads of 64, MLP 1536
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (192, 576),
    "self_attn.v_proj": (192, 576),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (1536, 576),
    "mlp.up_proj": (1536, 576),
    "mlp.down_proj": (576, 1536),
}
SMOLLM2_LAYERS = 30


@dataclass
class Row:
    """One measured configuration: median seconds of the whole aggregation and of its finalize."""

    label: str
    update_bytes: int
    seconds: float
    finalize_seconds: float

    @property
    def gbps(self) -> float:
        return self.update_bytes / self.seconds / GB


class TimedFinalize:
    """Wraps a strategy's aggregation and records how long its ``finalize`` took."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.finalize_seconds = 0.0

    def init_partial(self) -> Any:
        return self.strategy.init_partial()

    def accumulate(self, partial: Any, update: ClientUpdate) -> Any:
        return self.strategy.accumulate(partial, update)

    def merge(self, left: Any, right: Any) -> Any:
        return self.strategy.merge(left, right)

    def finalize(self, partial: Any) -> None:
        start = time.perf_counter()
        self.strategy.finalize(partial)
        self.finalize_seconds = time.perf_counter() - start


def smollm2_shapes() -> dict[str, tuple[int, int]]:
    """``(out, in)`` of every adapted linear module of SmolLM2-135M."""
    return {
        f"model.layers.{layer}.{name}": shape
        for layer in range(SMOLLM2_LAYERS)
        for name, shape in SMOLLM2_MODULES.items()
    }


def make_updates(shapes: dict[str, tuple[int, int]], ranks: list[int], seed: int) -> list[ClientUpdate]:
    """One random fp32 update per entry of ``ranks``, with random sample counts and alpha = 16."""
    gen = torch.Generator().manual_seed(seed)
    updates = []
    for device, rank in enumerate(ranks):
        state = {
            m: {"A": torch.randn(rank, i, generator=gen), "B": torch.randn(o, rank, generator=gen)}
            for m, (o, i) in shapes.items()
        }
        samples = int(torch.randint(50, 500, (1,), generator=gen))
        updates.append(ClientUpdate(1, device, samples, state, 0, 0.0, 0, 0.0, rank, LORA_ALPHA / rank))
    return updates


def update_bytes(updates: list[ClientUpdate]) -> int:
    """Bytes of every A and B tensor of every update."""
    return sum(
        t.numel() * t.element_size() for u in updates for f in u.lora_state.values() for t in f.values()
    )


def first_layers(updates: list[ClientUpdate], layers: int) -> list[ClientUpdate]:
    """The updates restricted to the modules of the first ``layers`` layers (same tensors, no copy)."""
    prefixes = tuple(f"model.layers.{i}." for i in range(layers))
    return [
        replace(u, lora_state={m: f for m, f in u.lora_state.items() if m.startswith(prefixes)})
        for u in updates
    ]


def median_seconds(run: Callable[[], float], repeats: int, warmup: bool = True) -> float:
    """Median over ``repeats`` calls of ``run`` (which returns its own seconds), after a warm-up call."""
    if warmup:
        run()
    return statistics.median(run() for _ in range(repeats))


def alternating_seconds(runs: list[Callable[[], float]], repeats: int) -> list[list[float]]:
    """Seconds of ``repeats`` calls of each run, called in turn (after one warm-up each), so that all of
    them see the same machine: the bandwidth of a shared VM drifts by tens of percent within a minute."""
    for run in runs:
        run()
    return [list(col) for col in zip(*([run() for run in runs] for _ in range(repeats)), strict=True)]


def copy_run(nbytes: int) -> Callable[[], float]:
    """A call of ``dst.copy_(src)`` over fp32 tensors of ``nbytes`` that returns its seconds."""
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)

    def run() -> float:
        start = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - start

    return run


def aggregation_run(
    name: str, updates: list[ClientUpdate], fan_in: int = 0
) -> tuple[Callable[[], float], list[float]]:
    """A call of ``aggregate`` with a fresh strategy ``name`` that returns its seconds, and the list that
    collects the seconds of each call's finalize."""
    strategy = STRATEGIES.get(name, "strategy.name")()
    shapes = {m: (f["B"].shape[0], f["A"].shape[1]) for m, f in updates[0].lora_state.items()}
    strategy.init_global(shapes, RANK, torch.Generator().manual_seed(0))
    timed = TimedFinalize(strategy)
    finalize: list[float] = []

    def run() -> float:
        start = time.perf_counter()
        aggregate(timed, updates, fan_in=fan_in)
        seconds = time.perf_counter() - start
        finalize.append(timed.finalize_seconds)
        strategy.take_base_delta()  # FLoRA: drop the merged dense delta, as the engine would
        return seconds

    return run, finalize


def measure(
    label: str, name: str, updates: list[ClientUpdate], repeats: int, fan_in: int = 0, warmup: bool = True
) -> Row:
    """Median time of ``aggregate`` with strategy ``name`` over ``updates`` and of its finalize."""
    run, finalize = aggregation_run(name, updates, fan_in)
    seconds = median_seconds(run, repeats, warmup)
    return Row(label, update_bytes(updates), seconds, statistics.median(finalize[-repeats:]))


def measure_beside_copy(
    label: str, name: str, updates: list[ClientUpdate], repeats: int
) -> tuple[Row, list[float]]:
    """Like :func:`measure`, alternating with a copy of as many bytes; also the copy's seconds."""
    nbytes = update_bytes(updates)
    run, finalize = aggregation_run(name, updates)
    agg_seconds, copy_seconds = alternating_seconds([run, copy_run(nbytes)], repeats)
    row = Row(label, nbytes, statistics.median(agg_seconds), statistics.median(finalize[-repeats:]))
    return row, copy_seconds


def hardware() -> str:
    """CPU model, platform and torch threading, for the record."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"host: {model} | {platform.platform()} | python {platform.python_version()} | torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"
    )


def print_table(rows: list[Row], copy: float) -> None:
    print(f"{'strategy':<28}{'update MB':>10}{'total s':>10}{'finalize s':>11}{'GB/s':>8}{'/ copy':>8}")
    for r in rows:
        print(
            f"{r.label:<28}{r.update_bytes / 1e6:>10.1f}{r.seconds:>10.4f}{r.finalize_seconds:>11.4f}"
            f"{r.gbps:>8.2f}{r.gbps / copy:>8.3f}"
        )


def measure_rest(
    uniform: list[ClientUpdate], mixed: list[ClientUpdate], args: argparse.Namespace
) -> list[Row]:
    """Every row after the headline, in order; FLoRA and FlexLoRA come last."""
    flexlora_updates = first_layers(uniform, args.flexlora_layers)
    return [
        measure("fedit r8 tree fan_in=10", "fedit", uniform, args.repeats, fan_in=10),
        measure("zeropad r8", "zeropad", uniform, args.repeats),
        measure("zeropad r2/4/8", "zeropad", mixed, args.repeats),
        measure("hetlora r8", "hetlora", uniform, args.repeats),
        measure("hetlora r2/4/8", "hetlora", mixed, args.repeats),
        measure("flora r8", "flora", uniform, args.stacked_repeats, warmup=False),
        measure(
            f"flexlora r8 ({args.flexlora_layers}/{SMOLLM2_LAYERS} layers)",
            "flexlora",
            flexlora_updates,
            args.stacked_repeats,
            warmup=False,
        ),
    ]


def copy_gbps(nbytes: int, seconds: list[float]) -> float:
    """Print the spread of the copy's bandwidth; return its median."""
    gbps = sorted(nbytes / s / GB for s in seconds)
    print(
        f"memory copy of {nbytes / 1e6:.0f} MB, alternating with fedit (GB/s = bytes of source copied per "
        f"second): median {statistics.median(gbps):.2f}, min {gbps[0]:.2f}, max {gbps[-1]:.2f}"
    )
    return statistics.median(gbps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--stacked-repeats", type=int, default=3)
    parser.add_argument("--flexlora-layers", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(hardware())
    shapes = smollm2_shapes()
    uniform = make_updates(shapes, [RANK] * args.clients, seed=0)
    mixed = make_updates(shapes, [(2, 4, 8)[i % 3] for i in range(args.clients)], seed=1)
    nbytes = update_bytes(uniform)
    print(f"{args.clients} updates x {len(shapes)} modules at rank {RANK}: {nbytes / 1e6:.1f} MB")
    head, copy_seconds = measure_beside_copy("fedit r8", "fedit", uniform, args.repeats)
    rows = [head, *measure_rest(uniform, mixed, args)]
    copy = copy_gbps(nbytes, copy_seconds)
    print_table(rows, copy)
    flora, flexlora = rows[-2], rows[-1]
    full = flexlora.finalize_seconds * SMOLLM2_LAYERS / args.flexlora_layers
    print(f"flexlora finalize is per module: the whole model would take about {full:.0f} s")
    print(
        f"RESULT agg_gbps={head.gbps:.3f} copy_gbps={copy:.3f} ratio={head.gbps / copy:.3f} "
        f"flora_finalize_s={flora.finalize_seconds:.3f} flexlora_finalize_s={flexlora.finalize_seconds:.3f} "
        f"flexlora_layers={args.flexlora_layers}"
    )


if __name__ == "__main__":
    main()
