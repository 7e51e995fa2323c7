"""Building a run's data from its config: the examples, the task that encodes them, the held-out test
set and the devices' partitions, and the training objective."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fedspine.client.evaluate import EvalSet
from fedspine.client.objectives import ClassificationObjective, LanguageModelingObjective, Objective
from fedspine.config import BIBLE_GENRE_WORDS, BIBLE_PROMPT, Config
from fedspine.data import (
    ClassificationTask,
    EncodedDataset,
    Example,
    LanguageModelingTask,
    hold_out,
    load_csv,
    load_jsonl,
    load_source,
    partition,
    top_labels,
    train_test_split,
    with_label,
)
from fedspine.errors import ConfigError, DataError

LOCAL_TEST_STREAM = 7
"""Seeds the generator of the devices' held-out slices (with the run's seed)."""


def load_examples(cfg: Config, rng: np.random.Generator) -> list[Example]:
    """Read the data source, attach labels (classification) and subsample."""
    d = cfg.data
    examples = load_source(d.source, d.path, "data.source")
    if d.task == "classification":
        if d.label_key in examples[0].meta:
            examples = with_label(examples, d.label_key)
        elif any(ex.label is None for ex in examples):
            raise ConfigError(
                "data.label_key", f"examples have neither a label nor the meta key '{d.label_key}'"
            )
        if d.max_labels:
            examples = top_labels(examples, d.max_labels)
    if d.max_examples and len(examples) > d.max_examples:
        keep = np.sort(rng.choice(len(examples), d.max_examples, replace=False))
        examples = [examples[i] for i in keep]
    needed = d.test_size + len(cfg.fleet.groups)
    if len(examples) < needed:
        raise DataError(f"data source '{d.source}' has {len(examples)} examples; need at least {needed}")
    return examples


def build_task(cfg: Config, examples: Sequence[Example]) -> ClassificationTask | LanguageModelingTask:
    """The task object that encodes examples for the model (its labels: ``data.labels`` when set, else
    those of ``examples``)."""
    d = cfg.data
    if d.task == "lm":
        return LanguageModelingTask(d.prompt_template or "{text}")
    found = {ex.label for ex in examples if ex.label is not None}
    if d.labels:
        unknown = sorted(found - set(d.labels))
        if unknown:
            raise DataError(
                f"the data has labels {unknown} that data.labels {sorted(d.labels)} does not list"
            )
    labels = sorted(d.labels or found)
    if len(labels) < 2:
        raise DataError(
            f"classification needs at least two labels; data.label_key '{d.label_key}' of this data "
            f"gives {labels or 'none'}"
        )
    # The default verbalizer and prompt are the Bible genre task's: another source that does not
    # set its own gets its labels as words and the task's generic prompt.
    bible_defaults = d.source == "bible"
    label_words = d.label_words if bible_defaults or d.label_words != BIBLE_GENRE_WORDS else {}
    prompt = d.prompt_template if bible_defaults or d.prompt_template != BIBLE_PROMPT else ""
    unknown = sorted(set(label_words) - set(labels))
    if unknown:
        raise ConfigError(f"data.label_words.{unknown[0]}", f"not a label of this data; labels: {labels}")
    words = [label_words.get(label, label) for label in labels]
    template = prompt or ClassificationTask(labels).prompt_template
    return ClassificationTask(labels, words, template, d.label_prefix)


@dataclass(frozen=True)
class NodeData:
    """A deployed device's own examples, read on its node (the server never reads them)."""

    device_id: int
    examples: list[Example]


@dataclass(frozen=True)
class DeclaredData:
    """What a deployed node that brings its own data told the server when it was discovered."""

    examples: int
    """Examples it trains on (bounds and weighs its updates)."""
    eval_examples: int
    """Examples it holds out for federated evaluation."""
    error: str = ""
    """Why its data cannot be used ("" when it can): its tasks are refused with this reason."""


def load_node_examples(cfg: Config, path: str | Path) -> list[Example]:
    """A node's data file (``.jsonl`` or ``.csv``, the formats of the ``jsonl``/``csv`` sources), labelled
    for the run's task: a row's ``label``, or its ``data.label_key`` column; every label one of
    ``data.labels``.

    Raises:
        DataError: the file is missing, unreadable or malformed, or an example has no label or one the
            run does not know (the message names the file).
        ConfigError: a classification run without ``data.labels``.
    """
    path = Path(path)
    d = cfg.data
    if path.suffix.lower() in (".jsonl", ".json"):
        examples = load_jsonl(path)
    elif path.suffix.lower() == ".csv":
        examples = load_csv(path)
    else:
        raise DataError(f"{path}: a node's data must be a .jsonl or .csv file")
    if d.task == "lm":
        return examples
    if not d.labels:
        raise ConfigError("data.labels", "a node with its own data needs the run's labels in the config")
    labelled, labels = [], set()
    for i, ex in enumerate(examples):
        label = ex.label if ex.label is not None else ex.meta.get(d.label_key)
        if label is None:
            raise DataError(f"{path}: example {i + 1} has no label (no 'label' and no '{d.label_key}')")
        labelled.append(replace(ex, label=label))
        labels.add(label)
    unknown = sorted(labels - set(d.labels))
    if unknown:
        raise DataError(f"{path}: labels {unknown} are not among the run's data.labels {sorted(d.labels)}")
    return labelled


def node_partition(node: NodeData, num_devices: int) -> list[np.ndarray]:
    """Partitions in which ``node``'s device holds all of its examples (the others none, on this node)."""
    if not 0 <= node.device_id < num_devices:
        raise DataError(f"device {node.device_id} is not in the fleet of {num_devices} devices")
    parts = [np.empty(0, dtype=np.int64) for _ in range(num_devices)]
    parts[node.device_id] = np.arange(len(node.examples), dtype=np.int64)
    return parts


def split_and_partition(
    cfg: Config, examples: Sequence[Example], num_devices: int, rng: np.random.Generator
) -> tuple[list[Example], list[Example], list[np.ndarray]]:
    """Hold out the global test set, then split the rest across devices."""
    d = cfg.data
    labels = [ex.label or "" for ex in examples] if d.task == "classification" else None
    train_idx, test_idx = train_test_split(len(examples), d.test_size / len(examples), rng, stratify=labels)
    train = [examples[i] for i in train_idx]
    test = [examples[i] for i in test_idx]
    groups = [ex.meta.get(d.partition_key, "") for ex in train] if d.partition == "natural" else None
    parts = partition(
        d.partition,
        num_clients=num_devices,
        rng=rng,
        key="data.partition",
        n=len(train),
        labels=[ex.label or "" for ex in train] if d.partition == "dirichlet" else None,
        groups=groups,
        alpha=d.dirichlet_alpha if d.partition == "dirichlet" else d.quantity_alpha,
    )
    return train, test, parts


def holds_out(cfg: Config) -> bool:
    """Whether every device keeps a held-out slice of its data: to evaluate the global model on the
    devices (``eval.mode``), or the personal models (``personalize.method``)."""
    return cfg.eval.mode != "central" or cfg.personalize.method != "none"


def local_test_sets(
    cfg: Config, train_data: EncodedDataset, parts: list[np.ndarray]
) -> tuple[list[np.ndarray], dict[int, EvalSet]]:
    """The devices' training partitions and, when ``eval.mode`` evaluates on the devices or a
    ``personalize.method`` is set, each device's held-out slice (``eval.local_fraction`` of its
    examples) as an evaluation set.

    The slices are drawn from their own generator, so a central run's partitions, and every draw
    after them, are those of a run without local evaluation.
    """
    if not holds_out(cfg):
        return parts, {}
    rng = np.random.default_rng([cfg.run.seed, LOCAL_TEST_STREAM])
    kept, held = hold_out(parts, cfg.eval.local_fraction, rng, cfg.eval.local_max_examples)
    tests = {
        device: EvalSet.from_dataset(train_data, cfg.eval.batch_size, indices)
        for device, indices in enumerate(held)
        if len(indices)
    }
    return kept, tests


def objective_for(train_data: EncodedDataset) -> Objective:
    if train_data.label_token_ids is not None:
        return ClassificationObjective(train_data.label_token_ids)
    return LanguageModelingObjective()


def task_name(cfg: Config) -> str:
    d = cfg.data
    if d.task == "classification":
        return f"{d.source}-{d.label_key} classification"
    return f"{d.source} language modelling"
