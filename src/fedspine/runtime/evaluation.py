"""Evaluating the global model during a run: on the server's test set, on the devices' held-out data
through the transport (federated evaluation), or both, as ``eval.mode`` says."""

from __future__ import annotations

import logging
import time

from fedspine.algorithms.strategies.base import GlobalModel
from fedspine.client.evaluate import Evaluation, pooled
from fedspine.metrics.events import EvaluationEvent, FederatedEvaluationEvent
from fedspine.metrics.records import RunRecorder
from fedspine.runtime.experiment import Experiment
from fedspine.runtime.state import RunState
from fedspine.runtime.transport import BaseDelta, DeviceEvaluations, Transport

log = logging.getLogger("fedspine.engine")


class Evaluator:
    """Evaluates global versions of a run and records the results (events, and the state's list)."""

    def __init__(self, exp: Experiment, transport: Transport, recorder: RunRecorder, state: RunState) -> None:
        self.exp = exp
        self.transport = transport
        self.recorder = recorder
        self.state = state
        self._answers: tuple[int, DeviceEvaluations] | None = None
        """The newest federated evaluation's answers, with the global version they evaluated."""

    def evaluate(self, version: int, now: float, base_delta: BaseDelta) -> Evaluation | None:
        """Evaluate global ``version`` as ``eval.mode`` says: on the server's test set, on the devices'
        held-out data (the example-weighted pool is the run's metric when there is no central one), or
        both (central is the run's metric, the devices' are recorded beside it). None when the run's
        metric is the devices' and no device answered."""
        wall = time.perf_counter()
        exp = self.exp
        model: GlobalModel = exp.strategy
        mode = exp.settings.eval_mode
        exp.trainer.executor.load_global(model.global_lora())
        central = None
        if mode != "federated":
            central = exp.trainer.executor.evaluate(exp.test_set, model.eval_plan(), model.channel_means())
        answers = self.devices(version, base_delta) if mode != "central" else None
        federated = (
            pooled(exp.trainer.objective, answers.evaluations.values())
            if answers and answers.evaluations
            else None
        )
        evaluation = central or federated
        self.state.eval_wall_seconds += time.perf_counter() - wall
        if evaluation is not None:
            event = EvaluationEvent(version, now, evaluation.metric_name, evaluation.metric, evaluation.loss)
            record = event.record()
            if answers is not None:
                record["federated"] = (
                    {"value": federated.metric, "loss": federated.loss, "count": federated.count}
                    if federated
                    else None
                )
                record["devices"] = {str(d): e.metric for d, e in answers.evaluations.items()}
            self.state.evaluations.append(record)
            self.recorder.event(event)
        if answers is not None:
            self.recorder.event(self._federated_event(version, now, federated, answers))
        return evaluation

    def devices(self, version: int, base_delta: BaseDelta) -> DeviceEvaluations:
        """The devices' evaluations of global ``version`` (loaded in the executor) on their held-out
        data: asked of the transport once per version."""
        if self._answers is None or self._answers[0] != version:
            self._answers = (version, self.transport.evaluate_devices(version, base_delta))
        return self._answers[1]

    def _federated_event(
        self, version: int, now: float, pooled_result: Evaluation | None, answers: DeviceEvaluations
    ) -> FederatedEvaluationEvent:
        if not answers.evaluations:
            log.warning("round %s: no device answered the federated evaluation", version)
        evaluations: dict[str, dict[str, float]] = {
            str(d): {"value": e.metric, "loss": e.loss, "count": e.count}
            for d, e in answers.evaluations.items()
        }
        return FederatedEvaluationEvent(
            version,
            now,
            self.exp.trainer.objective.metric_name,
            pooled_result.metric if pooled_result else None,
            pooled_result.loss if pooled_result else None,
            pooled_result.count if pooled_result else 0,
            evaluations,
            {str(d): reason for d, reason in answers.failed.items()},
        )
