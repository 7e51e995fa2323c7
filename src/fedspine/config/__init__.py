"""The run's configuration: one dataclass tree, TOML in and out, validation that names the field.

Every section is a dataclass whose fields carry a one-line docstring (the attribute docstring
below the field). :func:`from_dict` checks types and unknown keys recursively and raises
:class:`~fedspine.errors.ConfigError` naming the dotted key, and refuses every non-finite float
(NaN, ±inf) and every integer outside the 64-bit range; each section's ``__post_init__`` checks the
ranges of its own fields. Names that refer to registries (``strategy.name``, ``scheduler.name``,
``fleet.groups[i].device_class``...) are resolved when the run is built, before anything starts.

The sections live by topic: :mod:`~fedspine.config.model` (model, LoRA, data),
:mod:`~fedspine.config.fleet`, :mod:`~fedspine.config.training` (train, executor, strategy),
:mod:`~fedspine.config.scheduling` (scheduler, compression, server), :mod:`~fedspine.config.run`
(run, eval, personalize, export) and :mod:`~fedspine.config.tree` (:class:`Config`); the shared range
checks in :mod:`~fedspine.config.limits`; reading, writing and overrides in
:mod:`~fedspine.config.loading`. Import every name from ``fedspine.config``.
"""

from fedspine.config.fleet import DEFAULT_FLEET, AttackSection, FleetGroup, FleetSection, TraceSection
from fedspine.config.limits import (
    DEVICE_NAME,
    MAX_DEVICES,
    MAX_MULTIPLIER,
    MAX_RANK,
    MAX_SECONDS,
    MAX_STEPS,
    MAX_THREADS,
    RUN_NAME,
)
from fedspine.config.loading import (
    apply_override,
    config_differences,
    from_dict,
    key_parts,
    load_config,
    parse_override,
    read_toml,
    to_dict,
    to_toml,
    tomllib,
)
from fedspine.config.model import (
    BIBLE_GENRE_WORDS,
    BIBLE_PROMPT,
    LLAMA_LINEAR_MODULES,
    DataSection,
    LoraSection,
    ModelSection,
    TinyModelSection,
)
from fedspine.config.run import EvalSection, ExportSection, PersonalizeSection, RunSection
from fedspine.config.scheduling import (
    CompressionSection,
    FedAsyncSection,
    FedBuffSection,
    FedCompassSection,
    SchedulerSection,
    ServerSection,
    StalenessSection,
)
from fedspine.config.training import (
    ExecutorSection,
    FedSpineSection,
    HetLoRASection,
    StrategySection,
    TrainSection,
)
from fedspine.config.tree import Config

__all__ = [
    "BIBLE_GENRE_WORDS",
    "BIBLE_PROMPT",
    "DEFAULT_FLEET",
    "DEVICE_NAME",
    "LLAMA_LINEAR_MODULES",
    "MAX_DEVICES",
    "MAX_MULTIPLIER",
    "MAX_RANK",
    "MAX_SECONDS",
    "MAX_STEPS",
    "MAX_THREADS",
    "RUN_NAME",
    "AttackSection",
    "CompressionSection",
    "Config",
    "DataSection",
    "EvalSection",
    "ExecutorSection",
    "ExportSection",
    "FedAsyncSection",
    "FedBuffSection",
    "FedCompassSection",
    "FedSpineSection",
    "FleetGroup",
    "FleetSection",
    "HetLoRASection",
    "LoraSection",
    "ModelSection",
    "PersonalizeSection",
    "RunSection",
    "SchedulerSection",
    "ServerSection",
    "StalenessSection",
    "StrategySection",
    "TinyModelSection",
    "TraceSection",
    "TrainSection",
    "apply_override",
    "config_differences",
    "from_dict",
    "key_parts",
    "load_config",
    "parse_override",
    "read_toml",
    "to_dict",
    "to_toml",
    "tomllib",
]
