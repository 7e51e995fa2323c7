"""An in-process stand-in for Flower's Grid: delivers messages to the ClientApp's handler directly.

It exercises fedspine's server and client code and the Flower records between them without
processes or sockets (a node may still hand its messages to a warm worker on a Unix socket); the
deployment tests run the real SuperLink and SuperNodes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedspine.deploy.app import handle


def _node_config(
    device: int, data_path: str | None, model_root: str | None, worker: str | None
) -> dict[str, str | int]:
    config: dict[str, str | int] = {"device-id": device}
    if data_path is not None:
        config["data-path"] = data_path
    if model_root is not None:
        config["model-dir"] = f"{model_root}/node{device}"
    if worker is not None:
        config["worker"] = worker
    return config


class FakeGrid:
    """Nodes ``1..n`` with device ids ``0..n-1``; replies are computed when pulled."""

    def __init__(
        self,
        run_config: dict[str, str | int | float],
        devices: int,
        data_paths: dict[int, str] | None = None,
        model_root: str | None = None,
        workers: dict[int, str] | None = None,
    ) -> None:
        """``data_paths``: device id -> its node's own data file (node config ``data-path``);
        ``model_root``: node ``n`` keeps its final models in ``model_root/node<n>`` (``model-dir``);
        ``workers``: device id -> the socket of its node's warm worker (``worker``)."""
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0  # the server is node 0
        paths, sockets = data_paths or {}, workers or {}
        self.contexts = {
            node: Context(
                1,
                node,
                _node_config(node - 1, paths.get(node - 1), model_root, sockets.get(node - 1)),
                RecordDict(),
                dict(run_config),
            )
            for node in range(1, devices + 1)
        }
        self.inbox: dict[str, Message] = {}
        self.tamper: Callable[[Message], Message] | None = None
        """Applied to each reply before the server sees it (to test rejection)."""

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            self.inbox[msg.object_id] = msg
            ids.append(msg.object_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for mid in list(message_ids):
            msg = self.inbox.pop(mid, None)
            if msg is None:
                continue
            TaskIdentity.node_id = msg.metadata.dst_node_id  # the reply comes from that node
            reply = handle(msg.metadata.message_type, msg, self.contexts[msg.metadata.dst_node_id])
            TaskIdentity.node_id = 0
            replies.append(self.tamper(reply) if self.tamper else reply)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
