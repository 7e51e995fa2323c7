"""A Flower SuperLink whose Control API devices cannot reach.

Flower 1.42 serves the Fleet API (SuperNodes), the Control API (``flwr run``, ``flwr supernode
register``) and the Runtime API (the ServerApp) on one HTTPS port, and the open-source distribution
has no account authentication for the Control API. Anyone who can reach that port and holds the CA
certificate (which every device has) can therefore register a node key or start an app.

:func:`serve` runs Flower's own SuperLink application (``flwr.superlink.main.create_app``, configured
from the usual ``flower-superlink`` arguments) on two listeners in one process:

* the *public* address (``--host``/``--port``), for devices: every route except the Control API,
  which answers 403;
* the *control* address (default ``127.0.0.1:9093``), for the operator's ``flwr`` CLI: every route.

Keep the control address where only the operator reaches it (loopback, or an interface behind a
firewall; a remote operator uses an SSH tunnel). Both listeners use the same TLS certificate, so it
must name the control host too (``fedspine deploy certs`` includes ``127.0.0.1`` and ``localhost``).

This uses Flower's SuperLink internals (argument parsing, the app factory and its lifespan), which is
why the ``flower`` extra pins Flower to 1.42.x.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

import uvicorn

from fedspine.errors import DeployError

log = logging.getLogger("fedspine.deploy")

CONTROL_PREFIX = "/v1/control"
"""Path prefix of Flower's Control API routes (``flwr.superlink.routers.control``)."""

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class WithoutControl:
    """An ASGI application that answers 403 to the Control API and passes everything else to ``app``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] in ("http", "websocket") and (
            path == CONTROL_PREFIX or path.startswith(CONTROL_PREFIX + "/")
        ):
            log.warning("refused a Control API request on the public address from %s", scope.get("client"))
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            body = b"the Control API is not served on this address\n"
            headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 403, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6) as a host and a port, or a DeployError naming it."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeployError(f"--control {address!r}: expected HOST:PORT with a port in 1..65535")
    return host, int(port)


async def _serve_all(servers: Sequence[uvicorn.Server]) -> None:
    """Serve until any of ``servers`` stops (a signal, or a failure to bind), then stop the others."""
    tasks = [asyncio.create_task(server.serve()) for server in servers]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for server in servers:
        server.should_exit = True
    await asyncio.gather(*tasks, return_exceptions=True)


def serve(flower_args: Sequence[str], control: str = "127.0.0.1:9093") -> None:
    """Run a SuperLink configured by ``flower_args`` (``flower-superlink``'s options), with the Control
    API only on ``control``. Blocks until interrupted."""
    control_host, control_port = parse_address(control)
    # the flower extra, imported on use (the package exports a function of the module's name)
    cli = importlib.import_module("flwr.superlink.cli.flower_superlink")
    from flwr.superlink.main import create_app

    saved, sys.argv = sys.argv, ["flower-superlink", *flower_args]  # Flower's parser reads sys.argv
    try:
        config = cli._parse_superlink_lifespan_config()
    finally:
        sys.argv = saved
    if (config.host, config.port) == (control_host, control_port):
        raise DeployError("--control must differ from the SuperLink's public --host/--port")
    app = create_app(config, cli.SuperLinkLifespan)
    tls = {"ssl_keyfile": config.ssl_keyfile, "ssl_certfile": config.ssl_certfile}
    log_config = cli.get_uvicorn_log_config(cli.console_handler.level)
    public = uvicorn.Config(
        WithoutControl(app), host=config.host, port=config.port, log_config=log_config, **tls
    )
    # The lifespan (the SuperExec that starts ServerApps, the state) runs once, with the public listener.
    operator = uvicorn.Config(
        app, host=control_host, port=control_port, lifespan="off", log_config=log_config, **tls
    )
    log.info(
        "SuperLink: devices on %s:%s (no Control API), Control API on %s:%s",
        config.host,
        config.port,
        control_host,
        control_port,
    )
    asyncio.run(_serve_all([uvicorn.Server(public), uvicorn.Server(operator)]))
