"""Schedulers: who trains when. Importing this package registers them."""

from fedspine.algorithms.schedulers.base import (
    SCHEDULERS,
    Arrival,
    Cohort,
    Limits,
    Order,
    RoundPlan,
    Scheduler,
    ServerStep,
    TaskOrder,
)
from fedspine.algorithms.schedulers.fedasync import FedAsync, FedBuff
from fedspine.algorithms.schedulers.fedcompass import FedCompass
from fedspine.algorithms.schedulers.sync import SyncScheduler

__all__ = [
    "SCHEDULERS",
    "Arrival",
    "Cohort",
    "FedAsync",
    "FedBuff",
    "FedCompass",
    "Limits",
    "Order",
    "RoundPlan",
    "Scheduler",
    "ServerStep",
    "SyncScheduler",
    "TaskOrder",
]
