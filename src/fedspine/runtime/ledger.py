"""What a run writes as it goes: each task's event and its device's totals, and each server step's
record (a synchronous round's, or an asynchronous step's)."""

from __future__ import annotations

import statistics

from fedspine.metrics.events import TaskEvent
from fedspine.metrics.records import DeviceStats, RoundRecord, RunRecorder
from fedspine.runtime.state import RunState
from fedspine.runtime.tasks import TaskOutcome
from fedspine.types import TaskStatus


class Ledger:
    """Writes a run's task events and step records into its recorder, and keeps the per-device totals
    and personal-model costs in its :class:`~fedspine.runtime.state.RunState`."""

    def __init__(self, recorder: RunRecorder, state: RunState) -> None:
        self.recorder = recorder
        self.state = state

    def task(self, round_no: int, start: float, o: TaskOutcome, **extra: object) -> None:
        """Record a task that ended (``start``: when it started on the run's clock)."""
        prepared = o.prepared
        workload = prepared.workload if prepared else None
        event = TaskEvent(
            detail={**o.extra, **extra},
            round=round_no,
            device_id=o.device.device_id,
            device_class=o.device.device_class.name,
            network=o.device.network.name,
            status=o.status,
            virtual_start=start,
            virtual_end=start + o.end_seconds,
            downlink_seconds=o.downlink_seconds,
            compute_seconds=o.compute_seconds,
            uplink_seconds=o.uplink_seconds,
            downlink_bytes=o.downlink_bytes,
            uplink_bytes=o.uplink_bytes,
            tokens=workload.tokens if workload else 0,
            num_samples=prepared.num_samples if prepared else 0,
            local_steps=len(prepared.batches) if prepared else 0,
            lora_rank=prepared.lora.rank if prepared else 0,
            pruning_ratio=o.task.pruning_ratio if o.task else 0.0,
            train_loss=o.update.train_loss if o.update else None,
            peak_memory_bytes=workload.peak_memory_bytes if workload else 0,
        )
        self.recorder.event(event)
        self._device_stats(o)

    def _device_stats(self, o: TaskOutcome) -> None:
        device, state = o.device, self.state
        stats = state.device_stats.setdefault(
            device.device_id, DeviceStats(device.device_id, device.device_class.name, device.network.name)
        )
        communication = o.downlink_seconds + o.uplink_seconds
        stats.add_task(o.status, o.compute_seconds, communication, o.uplink_bytes, o.downlink_bytes)
        if "personal_seconds" in o.extra and o.compute_seconds > 0:
            seconds = state.personal_seconds
            seconds[device.device_id] = seconds.get(device.device_id, 0.0) + o.extra["personal_seconds"]
        for direction in ("downlink", "uplink"):
            state.personal_bytes[direction] += o.extra.get(f"cluster_{direction}_bytes", 0)

    @staticmethod
    def round_record(
        round_no: int,
        start: float,
        end: float,
        outcomes: list[TaskOutcome],
        accepted: list[TaskOutcome],
        agg_seconds: float,
    ) -> RoundRecord:
        """A synchronous round's record: every selected task in ``outcomes``, ``accepted`` aggregated."""
        closer = max(accepted, key=lambda o: o.arrival_seconds) if accepted else None
        return _record(
            round_no,
            start,
            end,
            agg_seconds,
            closer,
            accepted,
            selected=len(outcomes),
            late=sum(o.status == TaskStatus.LATE for o in outcomes),
            oom=sum(o.status == TaskStatus.OOM for o in outcomes),
            dropped=sum(o.status == TaskStatus.DROPPED for o in outcomes),
            uplink_bytes=sum(o.uplink_bytes for o in outcomes),
            downlink_bytes=sum(o.downlink_bytes for o in outcomes),
        )

    @staticmethod
    def step_record(
        version: int,
        start: float,
        end: float,
        accepted: list[TaskOutcome],
        agg_seconds: float,
        staleness: list[int],
        since: dict[str, float],
    ) -> RoundRecord:
        """An asynchronous server step's record; ``since``: the task counts since the previous step."""
        return _record(
            version,
            start,
            end,
            agg_seconds,
            accepted[-1] if accepted else None,
            accepted,
            selected=int(since.get("selected", 0)),
            late=0,
            oom=int(since.get("oom", 0)),
            uplink_bytes=int(since.get("uplink_bytes", 0)),
            downlink_bytes=int(since.get("downlink_bytes", 0)),
            dropped=int(since.get("dropped", 0)),
            mean_staleness=statistics.fmean(staleness) if staleness else None,
            max_staleness=max(staleness) if staleness else None,
        )


def _record(
    round_no: int,
    start: float,
    end: float,
    agg_seconds: float,
    closer: TaskOutcome | None,
    accepted: list[TaskOutcome],
    *,
    selected: int,
    late: int,
    oom: int,
    dropped: int,
    uplink_bytes: int,
    downlink_bytes: int,
    mean_staleness: float | None = None,
    max_staleness: int | None = None,
) -> RoundRecord:
    """A round's (or server step's) record ending at ``end``; ``closer`` is the update that closed it."""
    losses = [o.update.train_loss for o in accepted if o.update is not None]
    return RoundRecord(
        round=round_no,
        virtual_start=start,
        virtual_end=end,
        round_seconds=end - start,
        aggregation_seconds=agg_seconds,
        downlink_seconds=closer.downlink_seconds if closer else 0.0,
        training_seconds=closer.compute_seconds if closer else 0.0,
        uplink_seconds=closer.uplink_seconds if closer else 0.0,
        aggregated=len(accepted),
        train_loss=sum(losses) / len(losses) if losses else None,
        selected=selected,
        late=late,
        oom=oom,
        dropped=dropped,
        uplink_bytes=uplink_bytes,
        downlink_bytes=downlink_bytes,
        mean_staleness=mean_staleness,
        max_staleness=max_staleness,
    )
