"""Strategies: what a device receives and how updates merge. Importing this package registers them."""

from fedspine.algorithms.strategies.base import STRATEGIES, Assignment, Dispatch, Strategy
from fedspine.algorithms.strategies.fedit import FedIT
from fedspine.algorithms.strategies.fedspine import FedSpine
from fedspine.algorithms.strategies.flexlora import FlexLoRA
from fedspine.algorithms.strategies.flora import FLoRA
from fedspine.algorithms.strategies.hetlora import HetLoRA
from fedspine.algorithms.strategies.presets import PRESETS, Preset
from fedspine.algorithms.strategies.zeropad import ZeroPad

__all__ = [
    "PRESETS",
    "STRATEGIES",
    "Assignment",
    "Dispatch",
    "FLoRA",
    "FedIT",
    "FedSpine",
    "FlexLoRA",
    "HetLoRA",
    "Preset",
    "Strategy",
    "ZeroPad",
]
