"""The Flower app: a ServerApp and a ClientApp wrapping fedspine's engine and local training.

Referenced from a Flower app's ``pyproject.toml`` (``fedspine deploy app`` writes one)::

    [tool.flwr.app.components]
    serverapp = "fedspine.deploy.app:server_app"
    clientapp = "fedspine.deploy.app:client_app"

The same objects run on a SuperLink with SuperNodes and in Flower's simulation engine;
:func:`make_apps` builds a pair with run-config defaults, for engines that pass no run config.
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedspine.deploy import worker
from fedspine.deploy.settings import MODEL_ACTION, WORKER_KEY, Value


def make_apps(defaults: Mapping[str, Value] | None = None) -> tuple[ServerApp, ClientApp]:
    """A (ServerApp, ClientApp) pair; ``defaults`` fill run-config keys the run does not set."""
    server_app = ServerApp()
    client_app = ClientApp()

    def configured(context: Context) -> Context:
        if not defaults:
            return context
        # a new Context (Flower's may not be modified) sharing the node's persistent state
        run_config = {**defaults, **context.run_config}
        return Context(context.run_id, context.node_id, context.node_config, context.state, run_config)

    @server_app.main()
    def _serve(grid: Grid, context: Context) -> None:
        from fedspine.deploy import server

        server.serve(grid, configured(context))

    @client_app.train()
    def _train(message: Message, context: Context) -> Message:
        return handle(MessageType.TRAIN, message, configured(context))

    @client_app.evaluate()
    def _evaluate(message: Message, context: Context) -> Message:
        return handle(MessageType.EVALUATE, message, configured(context))

    @client_app.query("model")
    def _final_model(message: Message, context: Context) -> Message:
        return handle(MODEL_ACTION, message, configured(context))

    @client_app.query()
    def _query(message: Message, context: Context) -> Message:
        return handle(MessageType.QUERY, message, configured(context))

    return server_app, client_app


def handle(kind: str, message: Message, context: Context) -> Message:
    """Answer a ``kind`` message: through the node's warm worker when its node config names one
    (``worker``), else in this process (which then imports torch and builds the model)."""
    socket = context.node_config.get(WORKER_KEY)
    if isinstance(socket, str) and socket.strip():
        return Message(worker.call(socket, kind, message.content, context), reply_to=message)
    from fedspine.deploy import client

    return Message(client.answer(kind, message.content, context), reply_to=message)


server_app, client_app = make_apps()
