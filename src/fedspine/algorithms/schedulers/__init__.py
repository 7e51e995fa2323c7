"""Schedulers: who trains when. Importing this package registers them."""

from fedspine.algorithms.schedulers.base import SCHEDULERS, RoundPlan
from fedspine.algorithms.schedulers.sync import SyncScheduler

__all__ = ["SCHEDULERS", "RoundPlan", "SyncScheduler"]
