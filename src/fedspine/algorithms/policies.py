"""Policies that choose each device's (pruning ratio, LoRA rank) for a task (algorithms.md §1.4).

* :class:`SlidingWindowUCB`, FedSpine's online bandit: one per device over the arm grid
  ``ratios x ranks``, learning only from the outcomes it observes (no device profile). Untried arms
  are played first (the most pruned, or with ``explore = "floor"`` the least pruned eligible one,
  lowest rank first); then the arm with the highest windowed
  mean reward plus ``c * sqrt(2 ln(min(t, W)) / n_W(a))``.
* :class:`PooledUCB`: the same reward, but an arm's quality is learned across the
  fleet and each device's time at any arm is predicted from its own observed speed, so a device's
  first tasks are not blind.
* :class:`PacedPolicy` (the default): each device plays the least pruned arm its observed speed
  predicts to keep the fleet's pace (the deadline, or the median device's time), the oracle's rule
  without reading a profile.
* :class:`FixedPolicy` (FedMP-like fixed ratios, and prune-then-tune), :class:`RandomPolicy`, and
  :class:`OraclePolicy`, which reads the device profiles through a time predictor.

Every policy is asked with a *floor*, the schedule's current sparsity target: arms below it are not
eligible, so the global sparsity rises over rounds whatever the policy.
"""

from __future__ import annotations

import math
import random
import statistics
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from fedspine.registry import Registry

EPS = 1e-9
SLACK = 0.05
"""A device that cannot keep the pace plays its least pruned arm within this fraction of its fastest
arm's time: pruning that saves less (a device held back by its link, not its compute) is not worth the
model it removes."""


def paced_choice(arms: Sequence[Arm], seconds: dict[Arm, float], pace: float) -> Arm:
    """The least pruned arm (then the highest rank) whose ``seconds`` meet ``pace``; when none does, the
    least pruned one within :data:`SLACK` of the fastest."""
    meeting = [a for a in arms if seconds[a] <= pace * (1 + EPS)]
    if not meeting:
        fastest = min(seconds[a] for a in arms)
        meeting = [a for a in arms if seconds[a] <= fastest * (1 + SLACK) + EPS]
    return min(meeting, key=lambda a: (a.ratio, -a.rank))


@dataclass(frozen=True)
class Outcome:
    """What the server observed of one task played at an arm.

    Attributes:
        reward: the scalar reward in [-1, 1] (-1 = out of memory or late).
        seconds: the task's virtual time (download + compute + upload).
        quality: the trained submodel's quality on held-out local data, normalised so that 1 is the
            round's mean (None if not measured).
        deadline: the round's deadline, or its median task time.
        failed: the task ran out of memory or missed the deadline.
        work: the task's training work relative to the dense model's at the largest rank (0: unknown).
        compute_seconds: the part of ``seconds`` the device spent training, as it reported it (None:
            not reported; then all of ``seconds`` is taken to scale with the work).
    """

    reward: float
    seconds: float = 0.0
    quality: float | None = None
    deadline: float = 0.0
    failed: bool = False
    work: float = 0.0
    compute_seconds: float | None = None


@dataclass(frozen=True, order=True)
class Arm:
    """One choice: prune ``ratio`` of every pruned layer's KV groups and channels; train at ``rank``."""

    ratio: float
    rank: int


class Policy(ABC):
    """Chooses arms for devices and learns from what happened."""

    name = ""

    explore: Literal["safest", "floor"] = "safest"
    """Which untried arm a bandit plays first: the most pruned (least likely to run out of memory or
    time) or the least pruned eligible one (the schedule's floor: the mask the global model is
    evaluated at, once the floor reaches the target). Both take the lowest rank first."""

    def __init__(self, ratios: Sequence[float], ranks: Sequence[int]) -> None:
        if not ratios or not ranks:
            raise ValueError("a policy needs at least one ratio and one rank")
        self.arms = [Arm(float(p), int(r)) for p in sorted(set(ratios)) for r in sorted(set(ranks))]

    def first(self, arms: Sequence[Arm]) -> Arm:
        """The untried arm to play first, by :attr:`explore`."""
        if self.explore == "floor":
            return min(arms, key=lambda a: (a.ratio, a.rank))
        return max(arms, key=lambda a: (a.ratio, -a.rank))

    def eligible(self, floor: float) -> list[Arm]:
        """Arms whose ratio reaches ``floor``; if none does, the most pruned ones, raised to the floor."""
        arms = [a for a in self.arms if a.ratio >= floor - EPS]
        if arms:
            return arms
        return sorted({Arm(floor, a.rank) for a in self.arms})

    @abstractmethod
    def choose(self, device_id: int, floor: float) -> Arm:
        """The arm device ``device_id`` plays in its next task."""

    def observe(self, device_id: int, arm: Arm, outcome: Outcome) -> None:  # noqa: B027 (optional hook)
        """Learn from one outcome."""

    def best(self, device_id: int, floor: float) -> Arm:
        """The arm to deploy on the device at the end of the run."""
        return self.choose(device_id, floor)

    def predicted_seconds(self, device_id: int, arm: Arm) -> float | None:
        """The device's predicted task time at ``arm``, or None when the policy cannot tell."""
        return None

    def state(self) -> dict[str, object]:
        """A JSON-ready summary of what the policy learned."""
        return {}


class FixedPolicy(Policy):
    """Every device plays one arm: ``ratio`` (or its per-device ratio) at its configured rank."""

    name = "fixed"

    def __init__(
        self,
        ratios: Sequence[float],
        ranks: Sequence[int],
        device_ratios: dict[int, float],
        device_ranks: dict[int, int],
    ) -> None:
        super().__init__(ratios, ranks)
        self.device_ratios = device_ratios
        self.device_ranks = device_ranks

    def choose(self, device_id: int, floor: float) -> Arm:
        return Arm(max(self.device_ratios[device_id], floor), self.device_ranks[device_id])


class RandomPolicy(Policy):
    """A uniformly random eligible arm per task (seeded)."""

    name = "random"

    def __init__(self, ratios: Sequence[float], ranks: Sequence[int], seed: int) -> None:
        super().__init__(ratios, ranks)
        self.rng = random.Random(seed)

    def choose(self, device_id: int, floor: float) -> Arm:
        return self.rng.choice(self.eligible(floor))


class OraclePolicy(Policy):
    """Knows every device's predicted task time per arm (from its profile), which no real server does.

    The target time is the median, over devices, of the time of the least pruned lowest-rank arm, so
    that the slower half of the fleet prunes to keep up with the median device; each device plays its
    least pruned arm (then the highest rank) that meets the target, else its fastest
    (:func:`paced_choice`).
    """

    name = "oracle"

    def __init__(
        self,
        ratios: Sequence[float],
        ranks: Sequence[int],
        device_ids: Sequence[int],
        predict_seconds: Callable[[int, Arm], float],
    ) -> None:
        super().__init__(ratios, ranks)
        self.device_ids = list(device_ids)
        self.predict = predict_seconds

    def predicted_seconds(self, device_id: int, arm: Arm) -> float | None:
        return self.predict(device_id, arm)

    def choose(self, device_id: int, floor: float) -> Arm:
        arms = self.eligible(floor)
        reference = min(arms, key=lambda a: (a.ratio, a.rank))
        target = statistics.median(self.predict(d, reference) for d in self.device_ids)
        return paced_choice(arms, {a: self.predict(device_id, a) for a in arms}, target)


class SlidingWindowUCB(Policy):
    """Per-device sliding-window UCB over the arm grid (rewards in [-1, 1])."""

    name = "swucb"

    def __init__(
        self, ratios: Sequence[float], ranks: Sequence[int], window: int = 20, c: float = 1.0
    ) -> None:
        super().__init__(ratios, ranks)
        if window < 1 or c < 0:
            raise ValueError("window must be >= 1 and c >= 0")
        self.window = window
        self.c = c
        self.history: dict[int, deque[tuple[Arm, float]]] = {}
        self.pulls: dict[int, int] = {}

    def _stats(self, device_id: int) -> dict[Arm, tuple[int, float]]:
        counts: dict[Arm, list[float]] = {}
        for arm, reward in self.history.get(device_id, ()):
            counts.setdefault(arm, []).append(reward)
        return {arm: (len(r), sum(r) / len(r)) for arm, r in counts.items()}

    def choose(self, device_id: int, floor: float) -> Arm:
        arms = self.eligible(floor)
        stats = self._stats(device_id)
        untried = [a for a in arms if a not in stats]
        if untried:
            return self.first(untried)
        t = min(self.pulls.get(device_id, 0), self.window)

        def bonus(n: int) -> float:
            return self.c * math.sqrt(2 * math.log(max(t, 2)) / n)

        return max(arms, key=lambda a: (stats[a][1] + bonus(stats[a][0]), a.ratio, -a.rank))

    def observe(self, device_id: int, arm: Arm, outcome: Outcome) -> None:
        history = self.history.setdefault(device_id, deque(maxlen=self.window))
        history.append((arm, max(-1.0, min(1.0, outcome.reward))))
        self.pulls[device_id] = self.pulls.get(device_id, 0) + 1

    def best(self, device_id: int, floor: float) -> Arm:
        """The eligible arm with the highest windowed mean (untried arms count as unknown, not best)."""
        arms = self.eligible(floor)
        stats = {a: s for a, s in self._stats(device_id).items() if a in arms}
        if not stats:
            return max(arms, key=lambda a: (a.ratio, -a.rank))
        return max(stats, key=lambda a: (stats[a][1], a.ratio, -a.rank))

    def state(self) -> dict[str, object]:
        return {
            str(device): [{"ratio": a.ratio, "rank": a.rank, "reward": r} for a, r in history]
            for device, history in sorted(self.history.items())
        }


class ObservedSpeed:
    """Each device's speed as the server observes it: a task takes ``fixed + per_work * work`` seconds,
    with ``per_work`` the device's training seconds per unit of relative work and ``fixed`` the rest of
    its task time (transfers, latency), each the median of its last ``window`` tasks; and the work of
    the lightest arm that ran out of memory on it. The arm's relative work comes from the model's
    shapes; no device profile is read. Without a reported training time the whole task time is taken
    to scale with the work."""

    def __init__(self, relative_work: Callable[[Arm], float], window: int) -> None:
        self.work = relative_work
        self.window = window
        self.speed: dict[int, deque[float]] = {}
        """Per device, observed training seconds per unit of relative work."""
        self.fixed: dict[int, deque[float]] = {}
        """Per device, observed task seconds that do not scale with the work."""
        self.ceiling: dict[int, float] = {}
        """Per device, the work of the lightest arm that ran out of memory."""

    def known(self, device_id: int) -> bool:
        """Whether the device has finished a task (its speed is measured)."""
        return bool(self.speed.get(device_id))

    def feasible(self, device_id: int, arms: list[Arm]) -> list[Arm]:
        """``arms`` lighter than the device's out-of-memory ceiling (at least the lightest arm)."""
        ceiling = self.ceiling.get(device_id, math.inf)
        fits = [a for a in arms if self.work(a) < ceiling]
        return fits or [min(arms, key=self.work)]

    def seconds(self, device_id: int, arm: Arm) -> float | None:
        """The device's predicted task time at ``arm``, None before its first task."""
        if not self.speed.get(device_id):
            return None
        fixed = statistics.median(self.fixed[device_id]) if self.fixed.get(device_id) else 0.0
        return fixed + statistics.median(self.speed[device_id]) * self.work(arm)

    def observe(self, device_id: int, arm: Arm, outcome: Outcome) -> bool:
        """Record the task's speed or its out-of-memory failure; False for a task that never ran."""
        if outcome.failed and outcome.seconds <= 0:  # out of memory: never ran
            self.ceiling[device_id] = min(self.ceiling.get(device_id, math.inf), self.work(arm))
            return False
        work = outcome.work if outcome.work > 0 else self.work(arm)
        if outcome.seconds > 0:
            compute = outcome.compute_seconds
            if compute is None or not 0 < compute <= outcome.seconds:
                compute = outcome.seconds  # not reported: all of it scales with the work
            self.speed.setdefault(device_id, deque(maxlen=self.window)).append(compute / work)
            self.fixed.setdefault(device_id, deque(maxlen=self.window)).append(outcome.seconds - compute)
        return True


class PacedPolicy(Policy):
    """Each device keeps the fleet's pace with as much of the model as it can: it plays its least pruned
    arm (then its highest rank) that its observed speed predicts to finish within the pace, else its
    fastest arm (:func:`paced_choice`).

    The pace is the round's deadline when there is one; otherwise the median, over the devices whose
    speed is known, of their predicted time at the least pruned lowest-rank arm, so that the slower
    half of the fleet prunes to keep up with the median device. This is :class:`OraclePolicy`'s rule
    with each device's speed measured from its own tasks instead of read from its profile. A device
    that has not finished a task plays its first arm (:attr:`Policy.explore`) to measure its speed.

    What an arm trains is not estimated: keeping more of the model at a higher rank trains at least as
    well, and a probe's quality from one device's data mixes the arm's effect with the device's data.
    """

    name = "paced"

    def __init__(
        self,
        ratios: Sequence[float],
        ranks: Sequence[int],
        relative_work: Callable[[Arm], float],
        window: int = 20,
        deadline: float = 0.0,
    ) -> None:
        super().__init__(ratios, ranks)
        if window < 1 or deadline < 0:
            raise ValueError("window must be >= 1 and deadline >= 0")
        self.observed = ObservedSpeed(relative_work, window)
        self.deadline = deadline
        """The rounds' deadline in seconds (0: none)."""

    def predicted_seconds(self, device_id: int, arm: Arm) -> float | None:
        return self.observed.seconds(device_id, arm)

    def pace(self, arms: Sequence[Arm]) -> float | None:
        """The time a task should take: the deadline, or the fleet's median at the least pruned
        lowest-rank arm of ``arms`` (None while no device's speed is known)."""
        if self.deadline > 0:
            return self.deadline
        reference = min(arms, key=lambda a: (a.ratio, a.rank))
        times = [self.observed.seconds(d, reference) for d in self.observed.speed]
        known = [t for t in times if t is not None]
        return statistics.median(known) if known else None

    def choose(self, device_id: int, floor: float) -> Arm:
        arms = self.observed.feasible(device_id, self.eligible(floor))
        pace = self.pace(self.eligible(floor))
        if not self.observed.known(device_id) or pace is None:
            return self.first(arms)
        return paced_choice(arms, {a: self.observed.seconds(device_id, a) or 0.0 for a in arms}, pace)

    def observe(self, device_id: int, arm: Arm, outcome: Outcome) -> None:
        self.observed.observe(device_id, arm, outcome)

    def state(self) -> dict[str, object]:
        return {"seconds_per_work": {str(d): list(v) for d, v in sorted(self.observed.speed.items())}}


class PooledUCB(Policy):
    """A UCB policy that shares what does not depend on the device, and predicts what does.

    The reward ``Q * D / max(T, D)`` factors into the quality ``Q`` of what an arm trains, which
    depends on the arm (how much of the model is kept, at what rank) and hardly on the device, and the
    task time ``T``, which depends on the device. A per-device bandit must try every arm on every
    device; with a device taking part every few rounds it never leaves exploration. This policy

    * estimates each arm's quality from every device's observations (the last ``window`` per arm),
      optimistically: ``mean + c sqrt(2 ln N / n_a)`` with ``N`` every observation in the windows and
      ``n_a`` the arm's (an arm nobody has tried yet scores above every tried one, so each is tried
      once before any is repeated);
    * predicts device i's time at an arm from its own observed seconds per unit of work (the median
      of its last ``window`` tasks) times the arm's relative work, which the server knows from the
      model; no device profile is read;
    * after an out-of-memory failure at an arm, excludes arms with as much work or more on that device.

    ``D`` is the round's deadline (or the median task time the server last saw). A device that has
    not run a task yet plays its first arm (:attr:`Policy.explore`) to measure its speed.
    """

    name = "pooled"

    def __init__(
        self,
        ratios: Sequence[float],
        ranks: Sequence[int],
        relative_work: Callable[[Arm], float],
        window: int = 20,
        c: float = 0.25,
    ) -> None:
        super().__init__(ratios, ranks)
        if window < 1 or c < 0:
            raise ValueError("window must be >= 1 and c >= 0")
        self.window = window
        self.c = c
        self.quality: dict[Arm, deque[float]] = {}
        """Per arm, the normalised quality of the last ``window`` tasks that played it."""
        self.observed = ObservedSpeed(relative_work, window)
        self.deadline = 0.0

    def quality_estimate(self, arm: Arm, bonus: bool) -> float:
        """The arm's mean quality, plus the UCB bonus when exploring; inf (exploring) or NaN (deploying)
        for an arm nobody has played."""
        observed = self.quality.get(arm)
        if not observed:
            return math.inf if bonus else math.nan
        mean = statistics.fmean(observed)
        if not bonus:
            return mean
        total = sum(len(v) for v in self.quality.values())
        return mean + self.c * math.sqrt(2 * math.log(max(total, 2)) / len(observed))

    def predicted_seconds(self, device_id: int, arm: Arm) -> float | None:
        """Device ``device_id``'s predicted task time at ``arm`` (its seconds per work x the arm's work),
        None before its first task."""
        return self.observed.seconds(device_id, arm)

    def score(self, device_id: int, arm: Arm, bonus: bool) -> float:
        """``Q * D / max(T, D)`` with the arm's estimated quality and the device's predicted time."""
        quality = self.quality_estimate(arm, bonus)
        if math.isinf(quality) or math.isnan(quality):
            return quality
        seconds = self.predicted_seconds(device_id, arm)
        assert seconds is not None, "score() needs the device's speed"
        cap = self.deadline if self.deadline > 0 else seconds
        return quality * cap / max(seconds, cap, EPS)

    def choose(self, device_id: int, floor: float) -> Arm:
        arms = self.observed.feasible(device_id, self.eligible(floor))
        if not self.observed.known(device_id):
            return self.first(arms)
        untried = [a for a in arms if not self.quality.get(a)]
        if untried:
            return self.first(untried)
        return max(arms, key=lambda a: (self.score(device_id, a, bonus=True), a.ratio, -a.rank))

    def observe(self, device_id: int, arm: Arm, outcome: Outcome) -> None:
        if outcome.deadline > 0:
            self.deadline = outcome.deadline
        if not self.observed.observe(device_id, arm, outcome):
            return
        if outcome.quality is not None:
            self.quality.setdefault(arm, deque(maxlen=self.window)).append(outcome.quality)

    def best(self, device_id: int, floor: float) -> Arm:
        """The arm with the highest estimated reward for the device (arms nobody played are unknown)."""
        arms = self.observed.feasible(device_id, self.eligible(floor))
        known = [a for a in arms if self.quality.get(a)]
        if not self.observed.known(device_id) or not known:
            return max(arms, key=lambda a: (a.ratio, -a.rank))
        return max(known, key=lambda a: (self.score(device_id, a, bonus=False), a.ratio, -a.rank))

    def state(self) -> dict[str, object]:
        return {
            "quality": {f"{a.ratio:g}/{a.rank}": list(v) for a, v in sorted(self.quality.items())},
            "seconds_per_work": {str(d): list(v) for d, v in sorted(self.observed.speed.items())},
        }


POLICIES: Registry[type[Policy]] = Registry("policy")
for _cls in (FixedPolicy, RandomPolicy, OraclePolicy, SlidingWindowUCB, PooledUCB, PacedPolicy):
    POLICIES.register(_cls.name)(_cls)

__all__ = [
    "POLICIES",
    "Arm",
    "FixedPolicy",
    "ObservedSpeed",
    "OraclePolicy",
    "Outcome",
    "PacedPolicy",
    "Policy",
    "PooledUCB",
    "RandomPolicy",
    "SlidingWindowUCB",
]
