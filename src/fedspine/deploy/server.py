"""The server side of a Flower deployment: fedspine's engine with Flower carrying the tasks.

The engine, strategy, policy, scheduler, codec and records are the simulator's own objects; only
the engine's transport differs (:class:`FlowerTransport` over a :class:`FlowerLink` instead of the
simulated fleet). Instead of training in-process and charging virtual time from the cost model, the
tasks travel to the devices' SuperNodes as Flower messages and the clock is the wall clock. Each
task's time is split from four stamps:

* ``downlink_seconds``: server send -> device receive (serialisation, transfer, ClientApp start);
* ``compute_seconds``: device receive -> device reply (model and data setup, training, encoding;
  the setup share is recorded as ``setup_seconds``, the training loop as ``train_seconds``);
* ``uplink_seconds``: device reply -> the server has pulled the reply;
* the round's ``aggregation_seconds``: the server's aggregation, measured.

Device and server stamps come from different clocks: across machines they are only as good as the
machines' clock synchronisation (NTP: milliseconds). Every measured time is wall time, so records of
a deployment are not reproducible to the bit the way a simulation's are. Nor, in its last bits, is
the global model: a step sums its arrivals in the order they came in, which is the wall clock's.

The server checkpoints after every ``run.checkpoint_every`` rounds (server steps), as in simulation;
a ServerApp started with the run-config key ``resume = true`` continues the interrupted run in
``out-dir`` from its newest checkpoint. The devices keep nothing a task needs between rounds (every
task carries the global state and the base change), except error-feedback memory, so runs with
``compression.feedback`` are not resumed. An asynchronous run's tasks that were out at the checkpoint
went to the interrupted run: they end as ``dropped`` when it resumes, and their devices get new work.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedspine.api import RunResult, resume_experiment, run_experiment
from fedspine.client.evaluate import Evaluation
from fedspine.config import Config, load_config
from fedspine.deploy.records import (
    max_reply_bytes,
    read_evaluation,
    read_model_report,
    read_personal_report,
    read_update,
    reason_text,
    refusal_reason,
    task_record,
)
from fedspine.deploy.settings import (
    BIND_KEY,
    DATA_KEY,
    MODEL_ACTION,
    NODES_KEY,
    OUT_KEY,
    RESUME_KEY,
    TIMEOUT_KEY,
    config_from_run,
    data_mode,
    flag,
    node_bindings,
    number,
)
from fedspine.errors import CheckpointError, ConfigError, DeployError
from fedspine.fleet.cost import CostModel
from fedspine.metrics.events import DeploymentEvent
from fedspine.metrics.records import RunRecorder
from fedspine.runtime.engine import Engine
from fedspine.runtime.experiment import DeclaredData, Experiment
from fedspine.runtime.simulated import modelled_compute
from fedspine.runtime.tasks import Arrive, Ended, RunningTask, TaskOutcome, count_upload
from fedspine.runtime.transport import Admission, BaseDelta, DeviceEvaluations
from fedspine.types import ClientTask, Device, DeviceLora, TaskStatus

log = logging.getLogger("fedspine.deploy")

T = TypeVar("T")

POLL_SECONDS = 0.05
"""How often the server pulls replies: the resolution of the measured arrival times."""


class FlowerLink:
    """Tasks to the devices' SuperNodes as Flower messages, and their replies back, on the wall clock.

    A reply is untrusted until it has been decoded within its byte cap (here) and has passed the
    server's checks (``Server.validate``, when the engine takes the arrival); whatever goes wrong
    on the way drops that task with the reason, never the run, and changes nothing the server keeps.
    """

    def __init__(
        self, grid: Grid, nodes: dict[int, int], timeout: float, eval_limits: dict[int, int] | None = None
    ) -> None:
        self.grid = grid
        self.nodes = nodes
        """Device id -> Flower node id."""
        self.eval_limits = eval_limits or {}
        """Device id -> the most a sound evaluation of it counts (its held-out examples, or their
        tokens); a device without one is not asked to evaluate."""
        self.timeout = timeout
        """Seconds a task may wait for its reply (when the scheduler sets no deadline)."""
        self.t0 = time.time()
        """The wall time at which the run's clock reads 0."""

    def elapsed(self) -> float:
        return time.time() - self.t0

    def connected(self) -> list[int]:
        """The devices whose SuperNode is connected now."""
        connected = set(self.grid.get_node_ids())
        return [d for d, node in sorted(self.nodes.items()) if node in connected]

    def message(self, o: TaskOutcome, base_delta: BaseDelta, group: str) -> Message:
        """The message carrying ``o``'s task (and the base change so far); records its bytes in ``o``."""
        assert o.task is not None
        content = task_record(o.task, base_delta, sent_at=0.0)  # stamped when pushed
        o.downlink_bytes = sum(record.count_bytes() for record in content.array_records.values())
        return Message(content, self.nodes[o.device.device_id], MessageType.TRAIN, group_id=group)

    def push(self, messages: list[Message]) -> tuple[list[str], float]:
        """Send ``messages`` in one push, stamped with one send time; their ids and that time."""
        sent_at = time.time()
        for message in messages:
            message.content.config_records["task"]["sent_at"] = sent_at
        return list(self.grid.push_messages(messages)), sent_at

    def receive(
        self, exp: Experiment, o: TaskOutcome, reply: Message, sent_at: float, arrived_at: float
    ) -> None:
        """Decode one reply into ``o``: its update and its measured downlink / compute / uplink times."""
        task = o.task
        assert task is not None
        if reply.has_error():
            self.drop(o, f"device error: {reply.error.reason}", arrived_at - sent_at)
            return
        refusal = refusal_reason(reply.content)
        if refusal is not None:
            self.drop(o, f"device refused: {refusal}", arrived_at - sent_at)
            return
        try:
            update, timing = read_update(reply.content, task, max_reply_bytes(task, exp.trainer.shape))
            if update.wire is not None:
                if exp.uplink is None:
                    raise DeployError("compressed update received but the run has no uplink codec")
                update = exp.uplink.receive(update, task.payload)
            for name, value in vars(timing).items():
                if not math.isfinite(value):
                    raise DeployError(f"update.{name} {value!r} is not finite")
        except Exception as exc:  # the trust boundary: no reply may end the run
            self.drop(o, f"malformed update: {exc}", arrived_at - sent_at)
            return
        count_upload(o, update)
        o.update = update
        o.extra.update(predicted_seconds(o))
        o.downlink_seconds = max(0.0, timing.received_at - sent_at)
        o.compute_seconds = max(0.0, timing.replied_at - timing.received_at)
        o.uplink_seconds = max(0.0, arrived_at - sent_at - o.downlink_seconds - o.compute_seconds)
        o.extra.update(
            setup_seconds=timing.setup_seconds,
            train_seconds=update.host_train_seconds,
            message_bytes=sum(r.count_bytes() for r in reply.content.array_records.values()),
        )

    @staticmethod
    def drop(o: TaskOutcome, reason: str, seconds: float, status: TaskStatus = TaskStatus.DROPPED) -> None:
        """``o`` ends without an update after ``seconds``, for ``reason`` (logged and recorded)."""
        log.warning(
            "task of device %s (round %s): %s", o.device.device_id, o.task.round if o.task else "?", reason
        )
        o.status, o.update, o.compute_seconds = status, None, seconds
        o.extra["reason"] = reason


def predicted_seconds(o: TaskOutcome) -> dict[str, float]:
    """What the simulator's cost model predicts for ``o`` on its device's class and link, nominal (no
    slowdown or rate draw): recorded beside the measured times, so a deployment checks the model."""
    cost = CostModel.for_device(o.device)
    predicted = {
        "predicted_downlink_seconds": cost.transfer_seconds(o.downlink_bytes, "down"),
        "predicted_uplink_seconds": cost.transfer_seconds(o.uplink_bytes, "up"),
    }
    if o.prepared is not None:
        predicted["predicted_train_seconds"] = cost.train_seconds(o.prepared.workload)
    return predicted


class FlowerTransport:
    """An engine's tasks over Flower: each task is one message to its device's SuperNode (the tasks
    launched together are pushed together); a reply is an arrival at the moment it is pulled (the
    engine polls every :data:`POLL_SECONDS`). A task without a reply by its round's deadline is
    ``late``; one without a reply within the link's timeout is lost (``dropped``). The clock is the
    wall clock, so scheduler timers fire on it; the availability trace and per-offer draws of the
    simulator do not apply (a device is offline when its node is not connected)."""

    devices_personalize = True

    def __init__(self, link: FlowerLink, exp: Experiment) -> None:
        self.link = link
        self.exp = exp
        self.unsent: list[tuple[RunningTask, Message]] = []
        """Tasks launched since the last :meth:`flush`, which pushes them together."""
        self.out: dict[str, tuple[RunningTask, float]] = {}
        """Message id -> the task it carries and when it was sent."""

    def reachable(self, round_no: int, start: float) -> list[int]:
        return self.link.connected()

    def admit(self, device: Device, offer: int, now: float) -> Admission:
        return "ok" if device.device_id in self.link.connected() else "offline"

    def fits(self, device: Device, peak_memory_bytes: int) -> bool:
        return CostModel.for_device(device).fits(peak_memory_bytes)  # the class the operator declared

    def launch(self, task: RunningTask, base_delta: BaseDelta, train_now: bool) -> list[Ended]:
        o = task.outcome
        assert o.task is not None and o.prepared is not None
        settings = self.exp.settings
        _, personal = modelled_compute(
            o.device, o.prepared, settings.seed, o.task.round, settings.jitter_scale
        )
        if personal is not None:  # what the personal adapter adds, as the cost model charges it
            o.extra["personal_seconds"] = personal
        self.unsent.append((task, self.link.message(o, base_delta, str(task.version + 1))))
        return []

    def deliver(self, task: RunningTask, mates: Sequence[RunningTask]) -> None:
        pass  # the update came with the reply

    def flush(self) -> list[Ended]:
        if self.unsent:  # the tasks launched at one instant go out together, with one send time
            ids, sent_at = self.link.push([message for _, message in self.unsent])
            self.out.update((i, (task, sent_at)) for i, (task, _) in zip(ids, self.unsent, strict=True))
            self.unsent = []
        return []  # their replies come back through poll()

    def poll(self) -> tuple[list[Ended], bool]:
        if not self.out:
            return [], False
        ended: list[Ended] = []
        for reply in self.link.grid.pull_messages(list(self.out)):
            entry = self.out.pop(reply.metadata.reply_to_message_id, None)
            if entry is not None:
                self.link.receive(self.exp, entry[0].outcome, reply, entry[1], time.time())
                ended.append((self.link.elapsed(), Arrive(entry[0])))
        for message_id, (task, sent_at) in list(self.out.items()):
            waited = time.time() - sent_at
            if task.deadline and waited > task.deadline:
                limit, status = task.deadline, TaskStatus.LATE
            elif waited > self.link.timeout:
                limit, status = self.link.timeout, TaskStatus.DROPPED
            else:
                continue
            del self.out[message_id]
            self.link.drop(task.outcome, f"no reply within {limit:g} s", limit, status)
            ended.append((self.link.elapsed(), Arrive(task)))
        return ended, bool(self.out)

    def due(self, at: float) -> bool:
        return at <= self.link.elapsed()

    def wait(self) -> None:
        time.sleep(POLL_SECONDS)

    def present(self, now: float) -> float:
        return max(now, self.link.elapsed())

    def resume_at(self, now: float) -> bool:
        self.link.t0 = time.time() - now  # the wall clock goes on from the checkpoint's time
        return False  # replies to the interrupted ServerApp's messages never reach this one

    def aggregation_seconds(self, nbytes: int, wall_seconds: float) -> float:
        return wall_seconds

    def hand_out(
        self, version: int, base_delta: BaseDelta, manifest: dict[str, Any]
    ) -> dict[int, dict[str, object]]:
        """Send every connected device its final model (the global state, the base change, and its
        deployed plan); each builds it (its personal model with ``[personalize]``), saves it on the
        node, measures it and reports. A report whose parameter count is not the model's, a refusal,
        an error or no answer is recorded as the device's ``error``; it never ends the run. A device's
        personal results (``personal``: its model and the global one on its held-out examples) are
        checked apart: a malformed one is left out with the reason (``personal_error``)."""
        expected = {m["dir"]: m["parameters"] for m in manifest["models"]}
        models = {int(d): entry["model"] for d, entry in manifest["devices"].items()}
        limits, objective = self.link.eval_limits, self.exp.trainer.objective

        def read(content: RecordDict, device: int) -> dict[str, object]:
            report: dict[str, object] = {**read_model_report(content, device)}
            model = models[device]
            if report["parameters"] != expected[model]:
                raise DeployError(
                    f"the device's model has {report['parameters']} parameters, {model} {expected[model]}"
                )
            try:
                personal = read_personal_report(content, limits.get(device, 0), objective)
            except DeployError as exc:
                report["personal_error"] = str(exc)
            else:
                if personal is not None:
                    mine, global_model = personal["evaluation"], personal["global"]
                    report["personal"] = {
                        "value": mine.metric,
                        "loss": mine.loss,
                        "count": mine.count,
                        "global_value": global_model.metric,
                        "global_loss": global_model.loss,
                        "seconds": personal["seconds"],
                    }
            return report

        reports, failed = self._ask(version, base_delta, MODEL_ACTION, models, read, clusters=True)
        for device, reason in failed.items():
            log.warning("final model of device %s: %s", device, reason)
            reports[device] = {"error": reason}
        return dict(sorted(reports.items()))

    def evaluate_devices(self, version: int, base_delta: BaseDelta) -> DeviceEvaluations:
        """Ask every connected device that holds out examples to evaluate global ``version`` (at its own
        plan) and wait for the answers, up to the link's timeout. A refusal, an error, a malformed
        answer or none leaves the device out of this evaluation, with the reason; it never ends the run."""
        limits = self.link.eval_limits
        devices = {d: "" for d, limit in limits.items() if limit >= 1}

        def read(content: RecordDict, device: int) -> Evaluation:
            return read_evaluation(content, version, device, limits[device], self.exp.trainer.objective)

        evaluations, failed = self._ask(version, base_delta, MessageType.EVALUATE, devices, read)
        for device, reason in failed.items():
            log.warning("evaluation of version %s on device %s: %s", version, device, reason)
        return DeviceEvaluations(dict(sorted(evaluations.items())), failed)

    def _ask(
        self,
        version: int,
        base_delta: BaseDelta,
        kind: str,
        devices: dict[int, str],
        read: Callable[[RecordDict, int], T],
        clusters: bool = False,
    ) -> tuple[dict[int, T], dict[int, str]]:
        """Send each connected device of ``devices`` (device -> the model it gets, "" for none) the global
        state of ``version`` at its own plan (and, with ``clusters``, the cluster adapters cut to it) as
        a ``kind`` message, and wait up to the link's timeout.
        Returns each answer ``read`` accepted, and why the others gave none (an error, a refusal,
        what ``read`` raised: the trust boundary, no answer may end the run; or no answer at all)."""
        exp = self.exp
        link, strategy = self.link, exp.strategy
        state = strategy.global_lora()
        rank = int(next(iter(state.values()))["A"].shape[0]) if state else 1
        asked: dict[int, int] = {}  # node -> device
        messages = []
        for device in link.connected():
            if device not in devices:
                continue
            plan = strategy.device_eval_plan(device)
            task = ClientTask(
                version,
                device,
                0,
                DeviceLora(rank, 1.0),
                state,
                0,
                extra={"model": devices[device]} if devices[device] else {},
                plan=plan,
                channel_means=strategy.channel_means(),
                clusters=exp.clusters.sent(plan, exp.trainer.shape)
                if clusters and exp.clusters is not None
                else None,
            )
            content = task_record(task, base_delta, sent_at=time.time())
            messages.append(Message(content, link.nodes[device], kind, group_id=f"{kind}-{version}"))
            asked[link.nodes[device]] = device
        answers: dict[int, T] = {}
        failed: dict[int, str] = {}
        for reply in link.grid.send_and_receive(messages, timeout=link.timeout) if messages else []:
            if reply.metadata.src_node_id not in asked:
                continue
            device = asked.pop(reply.metadata.src_node_id)
            try:
                if reply.has_error():
                    raise DeployError(f"device error: {reply.error.reason}")
                refusal = refusal_reason(reply.content)
                if refusal is not None:
                    raise DeployError(f"device refused: {refusal}")
                answers[device] = read(reply.content, device)
            except Exception as exc:
                failed[device] = str(exc)
        for device in asked.values():
            failed[device] = f"no answer within {link.timeout:g} s"
        return answers, dict(sorted(failed.items()))


def discover_nodes(
    grid: Grid,
    devices: int,
    wait_seconds: float,
    bound: dict[int, int] | None = None,
    answers: dict[int, ConfigRecord] | None = None,
) -> dict[int, int]:
    """Ask every connected SuperNode which device it is; wait up to ``wait_seconds`` for all ``devices``.

    With ``bound`` (Flower node id -> device id, from the operator who registered the nodes' keys), a
    node's own claim no longer decides: a node that is not bound, or claims another device than its
    binding, is left out.

    ``answers``, when given, receives each found device's answer (what it says about its data).

    Returns device id -> node id. A device without a node is never sampled. A node whose answer is
    an error, malformed, a device id outside the fleet, or a device another node claimed first is
    logged and left out; it does not stop the run.
    """
    found: dict[int, int] = {}
    asked: set[int] = set()
    deadline = time.time() + wait_seconds
    while len(found) < devices and time.time() < deadline:
        new = [n for n in grid.get_node_ids() if n not in asked]
        if new:
            asked.update(new)
            queries = [Message(RecordDict(), node, MessageType.QUERY) for node in new]
            for reply in grid.send_and_receive(queries, timeout=max(1.0, deadline - time.time())):
                node = reply.metadata.src_node_id
                device, problem = _claimed_device(reply, devices)
                if bound is not None and device is not None and bound.get(node) != device:
                    problem = (
                        f"it is not bound to a device ({BIND_KEY})"
                        if node not in bound
                        else f"it says it is device {device}, but it is bound to device {bound[node]}"
                    )
                if device is not None and device in found:
                    problem = f"device {device} is node {found[device]} already"
                if device is None or problem:
                    log.warning("node %s is not used: %s", node, problem)
                    continue
                found[device] = node
                if answers is not None:
                    answers[device] = reply.content.config_records["node"]
        else:
            time.sleep(0.5)
    if not found:
        raise DeployError(f"no SuperNode connected within {wait_seconds:g} s")
    missing = sorted(set(range(devices)) - set(found))
    if missing:
        log.warning("devices without a SuperNode (never sampled): %s", missing)
    return found


MAX_NODE_EXAMPLES = 10_000_000
"""The most examples a node may declare (a larger claim is read as a malformed answer)."""


def declared_data(answers: dict[int, ConfigRecord]) -> dict[int, DeclaredData]:
    """What each discovered node said about its own data, checked.

    A node that states a data error keeps its device (its tasks will be refused, with that reason,
    and recorded); one whose counts are not integers in 0..:data:`MAX_NODE_EXAMPLES` is read as
    having no usable data. The declared counts weigh and bound the device's updates for the whole run.
    """
    declared: dict[int, DeclaredData] = {}
    for device, answer in sorted(answers.items()):
        error = answer.get("data_error")
        counts = [answer.get("examples"), answer.get("eval_examples")]
        if error is not None:
            declared[device] = DeclaredData(0, 0, reason_text(error))
        elif all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= MAX_NODE_EXAMPLES for c in counts
        ):
            declared[device] = DeclaredData(int(counts[0]), int(counts[1]))  # type: ignore[arg-type]
        else:
            declared[device] = DeclaredData(0, 0, f"malformed data counts {counts!r}")
        if declared[device].error:
            log.warning("device %s cannot use its data: %s", device, declared[device].error)
    return declared


def _claimed_device(reply: Message, devices: int) -> tuple[int | None, str]:
    """The device id a node's query reply claims, or None and why it cannot be used."""
    if reply.has_error():
        return None, f"it failed to answer ({reply.error.reason})"
    record = reply.content.config_records.get("node")
    device = None if record is None else record.get("device_id")
    if not isinstance(device, int) or isinstance(device, bool):
        return None, f"its answer names no integer device_id ({device!r})"
    if not 0 <= device < devices:
        return None, f"it says it is device {device}; the fleet has devices 0..{devices - 1}"
    return device, ""


def serve(grid: Grid, context: Context) -> RunResult:
    """The ServerApp's main: run the configured experiment over the connected SuperNodes."""
    config, _ = config_from_run(context.run_config)
    out = context.run_config.get(OUT_KEY)
    if not isinstance(out, str) or not out:
        raise DeployError(f"the Flower run config needs '{OUT_KEY}' (the directory for the run's records)")
    wait = number(context.run_config, NODES_KEY, 120.0)
    bound = node_bindings(context.run_config)
    timeout = number(context.run_config, TIMEOUT_KEY, 3600.0)
    local_data = data_mode(context.run_config) == "local"
    if local_data and config.data.task == "classification" and not config.data.labels:
        raise ConfigError(
            "data.labels",
            "nodes that bring their own data need the run's labels in the config (fedspine deploy app "
            f'fills them in), or run with {DATA_KEY} = "shared"',
        )

    resume = flag(context.run_config, RESUME_KEY)
    if resume:
        _check_resumable(config, Path(out))

    def engine(experiment: Experiment, recorder: RunRecorder) -> Engine:
        started = time.perf_counter()
        answers: dict[int, ConfigRecord] = {}
        nodes = discover_nodes(grid, len(experiment.devices), wait, bound, answers)
        seconds = time.perf_counter() - started
        data: dict[str, dict[str, object]] = {}
        if local_data:
            experiment.declared = declared_data(answers)
            data = {str(d): vars(declared) for d, declared in sorted(experiment.declared.items())}
            held = {d: declared.eval_examples for d, declared in experiment.declared.items()}
        else:
            held = {d: eval_set.count for d, eval_set in experiment.trainer.local_tests.items()}
        per_example = 1 if config.data.task == "classification" else config.data.max_length
        limits = {d: n * per_example for d, n in held.items()}
        recorder.event(DeploymentEvent({str(d): n for d, n in sorted(nodes.items())}, seconds, data))
        link = FlowerLink(grid, nodes, timeout, limits)
        return Engine(experiment, recorder, FlowerTransport(link, experiment))

    if resume:
        return resume_experiment(Path(out), engine=engine, executor="flower")
    return run_experiment(config, Path(out), engine=engine, executor="flower")


def _check_resumable(config: Config, run_dir: Path) -> None:
    """Refuse, before anything starts, a resume the run in ``run_dir`` cannot honour."""
    if not (run_dir / "config.toml").is_file():
        raise CheckpointError(
            f"{run_dir} holds no run to resume (no config.toml); start it without '{RESUME_KEY}'"
        )
    if load_config(run_dir / "config.toml") != config:
        raise DeployError(
            f"the app's fedspine config differs from the one the run in {run_dir} started with; "
            "resume it with the same app"
        )
    if config.compression.feedback != "none":
        raise ConfigError(
            "compression.feedback",
            f"a deployment with error feedback ({config.compression.feedback!r}) cannot be resumed: "
            "each device's feedback memory belonged to the interrupted Flower run",
        )


__all__ = ["FlowerLink", "FlowerTransport", "discover_nodes", "serve"]
