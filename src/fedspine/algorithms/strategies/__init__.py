"""Strategies: what a device receives and how updates merge. Importing this package registers them."""

from fedspine.algorithms.strategies.base import STRATEGIES, Strategy
from fedspine.algorithms.strategies.fedit import FedIT

__all__ = ["STRATEGIES", "FedIT", "Strategy"]
