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

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedspine.deploy import client, server
from fedspine.deploy.settings import Value


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
        server.serve(grid, configured(context))

    @client_app.train()
    def _train(message: Message, context: Context) -> Message:
        return client.train(message, configured(context))

    @client_app.evaluate()
    def _evaluate(message: Message, context: Context) -> Message:
        return client.evaluate(message, configured(context))

    @client_app.query("model")
    def _final_model(message: Message, context: Context) -> Message:
        return client.final_model(message, configured(context))

    @client_app.query()
    def _query(message: Message, context: Context) -> Message:
        return client.query(message, configured(context))

    return server_app, client_app


server_app, client_app = make_apps()
