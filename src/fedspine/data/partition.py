"""Partitioners: split example indices over clients (numpy only).

Every partitioner takes a ``numpy.random.Generator`` and returns ``list[np.ndarray]``: one sorted int64
array of example positions per client. The arrays are disjoint and together cover ``range(n)``.
Invalid arguments raise ``ValueError``; data that cannot be split as asked raises ``DataError``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from fedspine.errors import ConfigError, DataError

Partition = list[np.ndarray]


def _check_clients(n: int, num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if n < num_clients:
        raise DataError(f"cannot split {n} examples over {num_clients} clients (fewer examples than clients)")


def _encode(values: ArrayLike) -> np.ndarray:
    """Map arbitrary labels/keys to integer codes 0..K-1, in sorted order of the values."""
    _, codes = np.unique(np.asarray(values), return_inverse=True)
    return codes.reshape(-1)


def train_test_split(
    n: int, test_fraction: float, rng: np.random.Generator, stratify: ArrayLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into (train, test) positions, optionally stratified by a label per example.

    With ``stratify``, each class contributes ``round(test_fraction * class size)`` examples to the test set.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    codes = np.zeros(n, dtype=np.int64) if stratify is None else _encode(stratify)
    if len(codes) != n:
        raise ValueError(f"stratify has {len(codes)} labels for {n} examples")
    test = []
    for code in range(int(codes.max(initial=-1)) + 1):
        members = rng.permutation(np.flatnonzero(codes == code))
        test.append(members[: round(test_fraction * len(members))])
    test_idx = np.sort(np.concatenate(test)) if test else np.empty(0, dtype=np.int64)
    if len(test_idx) in (0, n):
        raise DataError(f"test_fraction {test_fraction} leaves an empty train or test set of {n} examples")
    return np.setdiff1d(np.arange(n), test_idx), test_idx


def _split_by_sizes(order: np.ndarray, sizes: np.ndarray) -> Partition:
    """Cut ``order`` into consecutive chunks of ``sizes`` (which sum to ``len(order)``), sorted."""
    return [np.sort(chunk) for chunk in np.split(order, np.cumsum(sizes)[:-1])]


def iid(n: int, num_clients: int, rng: np.random.Generator) -> Partition:
    """Shuffle and deal ``range(n)`` into ``num_clients`` shards whose sizes differ by at most one."""
    _check_clients(n, num_clients)
    return [np.sort(part) for part in np.array_split(rng.permutation(n), num_clients)]


def quantity_skew(n: int, num_clients: int, rng: np.random.Generator, alpha: float) -> Partition:
    """IID content, skewed sizes: client shares ~ Dirichlet(alpha); every client gets at least one example.

    Smaller ``alpha`` gives more unequal sizes.
    """
    _check_clients(n, num_clients)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    shares = rng.dirichlet(np.full(num_clients, alpha))  # (num_clients,)
    sizes = 1 + rng.multinomial(n - num_clients, shares)  # (num_clients,), sums to n
    return _split_by_sizes(rng.permutation(n), sizes)


def _dirichlet_once(codes: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> Partition:
    """One draw: each class is split over clients by its own Dirichlet(alpha) proportions.

    As in NIID-Bench (Li et al., 2022), a client already holding ``n / num_clients`` examples gets no
    share of later classes, which keeps clients from ending up empty.
    """
    chunks: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    loads = np.zeros(num_clients, dtype=np.int64)  # (num_clients,) examples held so far
    for code in range(int(codes.max()) + 1):
        members = rng.permutation(np.flatnonzero(codes == code))
        shares = rng.dirichlet(np.full(num_clients, alpha)) * (loads < len(codes) / num_clients)
        cuts = (np.cumsum(shares / shares.sum())[:-1] * len(members)).astype(np.int64)
        for client, part in enumerate(np.split(members, cuts)):
            chunks[client].append(part)
            loads[client] += len(part)
    return [np.sort(np.concatenate(parts)) for parts in chunks]


def dirichlet(
    labels: ArrayLike,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
    max_attempts: int = 100,
) -> Partition:
    """Label skew: per-class Dirichlet(alpha) proportions over clients (Hsu et al., 2019).

    Draws again until every client holds at least ``min_size`` examples. Smaller ``alpha`` gives each
    client fewer classes.

    Raises:
        DataError: no draw in ``max_attempts`` gave every client ``min_size`` examples.
    """
    codes = _encode(labels)
    _check_clients(len(codes), num_clients)
    if alpha <= 0 or min_size < 0:
        raise ValueError(f"need alpha > 0 and min_size >= 0, got alpha={alpha}, min_size={min_size}")
    for _ in range(max_attempts):
        parts = _dirichlet_once(codes, num_clients, alpha, rng)
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise DataError(
        f"dirichlet partition: no draw in {max_attempts} attempts gave all {num_clients} clients "
        f">= {min_size} of {len(codes)} examples (alpha={alpha}); "
        "raise alpha, lower min_size or use fewer clients"
    )


def natural(groups: ArrayLike, num_clients: int, rng: np.random.Generator) -> Partition:
    """Natural split: each client receives whole groups (e.g. Bible books, anime shows).

    Groups are dealt largest first (ties in a random order from ``rng``) to the client holding the
    fewest examples so far, which balances client sizes.

    Raises:
        DataError: fewer distinct groups than clients.
    """
    codes = _encode(groups)
    sizes = np.bincount(codes)  # (num_groups,)
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if len(sizes) < num_clients:
        raise DataError(f"natural partition: {len(sizes)} groups cannot fill {num_clients} clients")
    shuffled = rng.permutation(len(sizes))
    order = shuffled[np.argsort(-sizes[shuffled], kind="stable")]
    loads = np.zeros(num_clients, dtype=np.int64)
    owner = np.empty(len(sizes), dtype=np.int64)  # group code -> client
    for group in order:
        owner[group] = int(np.argmin(loads))
        loads[owner[group]] += sizes[group]
    client_of_example = owner[codes]
    return [np.flatnonzero(client_of_example == c) for c in range(num_clients)]


def cap_client_sizes(parts: Sequence[np.ndarray], max_examples: int, rng: np.random.Generator) -> Partition:
    """Keep at most ``max_examples`` per client, a random subset (sorted) of each larger shard."""
    if max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    return [
        np.sort(rng.choice(p, size=max_examples, replace=False)) if len(p) > max_examples else p
        for p in parts
    ]


def held_out_size(n: int, fraction: float, max_examples: int = 0) -> int:
    """How many of a shard's ``n`` examples :func:`hold_out` holds out."""
    k = round(fraction * n) if max_examples < 1 else min(round(fraction * n), max_examples)
    return min(max(k, 1), n - 1) if n >= 2 else 0


def hold_out(
    parts: Sequence[np.ndarray], fraction: float, rng: np.random.Generator, max_examples: int = 0
) -> tuple[Partition, Partition]:
    """Split each client's shard into (kept for training, held out for its own evaluation).

    A shard of ``n >= 2`` examples holds out ``round(fraction * n)`` of them (at most ``max_examples``
    when that is positive), at least 1 and at most ``n - 1``, drawn at random; a shard of one example
    holds out nothing. Both halves are sorted.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    kept, held = [], []
    for part in parts:
        n = len(part)
        k = held_out_size(n, fraction, max_examples)
        order = rng.permutation(part)
        held.append(np.sort(order[:k]))
        kept.append(np.sort(order[k:]))
    return kept, held


PARTITION_KINDS = ("dirichlet", "iid", "natural", "quantity_skew")


def partition(
    kind: str,
    *,
    num_clients: int,
    rng: np.random.Generator,
    key: str,
    n: int | None = None,
    labels: ArrayLike | None = None,
    groups: ArrayLike | None = None,
    alpha: float = 0.5,
    min_size: int = 1,
) -> Partition:
    """Partition by name: ``iid``, ``dirichlet``, ``natural`` or ``quantity_skew``.

    Args:
        kind: the partitioner's name.
        num_clients: number of shards.
        rng: the random generator.
        key: dotted config key of ``kind``, for error messages.
        n: number of examples; defaults to ``len(labels)`` or ``len(groups)``.
        labels: one class label per example (``dirichlet``).
        groups: one group key per example (``natural``), e.g. the book of each verse.
        alpha: Dirichlet concentration (``dirichlet``, ``quantity_skew``).
        min_size: minimum examples per client (``dirichlet``).

    Raises:
        ConfigError: unknown kind, or the data it needs is missing.
    """
    if kind not in PARTITION_KINDS:
        raise ConfigError(key, f"unknown partition kind {kind!r}; known: {', '.join(PARTITION_KINDS)}")
    if kind == "dirichlet":
        if labels is None:
            raise ConfigError(
                key, "partition 'dirichlet' needs a label per example (set the task's label key)"
            )
        return dirichlet(labels, num_clients, alpha, rng, min_size=min_size)
    if kind == "natural":
        if groups is None:
            raise ConfigError(key, "partition 'natural' needs a group key per example (e.g. book, show)")
        return natural(groups, num_clients, rng)
    size = _infer_size(n, labels, groups, key)
    return iid(size, num_clients, rng) if kind == "iid" else quantity_skew(size, num_clients, rng, alpha)


def _infer_size(n: int | None, labels: ArrayLike | None, groups: ArrayLike | None, key: str) -> int:
    if n is not None:
        return n
    for values in (labels, groups):
        if values is not None:
            return len(np.asarray(values))
    raise ConfigError(key, "partition needs n, labels or groups to know the number of examples")
