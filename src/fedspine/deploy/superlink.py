"""A Flower SuperLink whose devices' port serves the devices' API and nothing else.

Flower 1.42 serves three APIs from one application on one HTTPS port: the Fleet API (SuperNodes), the
Control API (``flwr run``, ``flwr supernode register``) and the Runtime API (the SuperExec and the
ServerApp processes it starts: they claim a run's server task, receive the app and its run config,
list the nodes and exchange the run's messages). Its open-source distribution authenticates neither
the Control API nor, in the default subprocess isolation, the Runtime API. Anyone who reaches that
port and holds the CA certificate (which every device has) could therefore register a node key,
start an app, or claim a run's server task before the SuperExec does: the caller received the app
(config and records path) and the devices' node ids, and the real ServerApp never started.

:func:`serve` runs Flower's own SuperLink application (``flwr.superlink.main.create_app``, configured
from the usual ``flower-superlink`` arguments) on two listeners in one process, each behind an
allow-list of path prefixes; any other path answers 403 and is logged:

* the *public* address (``--host``/``--port``), for devices: the Fleet API (the prefix of Flower's
  fleet router, ``/v1/fleet``) and ``/health``;
* the *control* address (default ``127.0.0.1:9093``), for the operator's ``flwr`` CLI and for the
  SuperExec: the Control API, the Runtime API and ``/health``. Flower points the SuperExec it starts
  (and so every ServerApp process) at ``--host``/``--port``; here it is pointed at this address.

Keep the control address where only the operator reaches it (loopback, or an interface behind a
firewall; a remote operator uses an SSH tunnel). Whoever reaches it can start any app, and so run
code on the server; serving the Runtime API there too gives them nothing they did not have. Both
listeners use the same TLS certificate, so it must name the control host too (``fedspine deploy
certs`` includes ``127.0.0.1`` and ``localhost``). With ``--isolation process``, start
``flower-superexec --runtime-api-address`` at the control address. ``FLWR_INTERNAL_GRPC_CONTROL_API=1``
is refused: Flower would then also serve the Control API over gRPC on its own address, outside these
listeners.

What is not covered: a process on the server machine reaches the loopback control address (Flower
has no account authentication to stop it); the ClientApp API of each SuperNode is the device's to
keep on loopback.

This uses Flower's SuperLink internals (argument parsing, the app factory, its lifespan and the
SuperExec address it derives from the configured host and port), which is why the ``flower`` extra
pins Flower to 1.42.x.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any, NoReturn

import uvicorn

from fedspine.deploy.arguments import check_host, parse_address, read_file, same_listener
from fedspine.errors import ConfigError, DeployError

log = logging.getLogger("fedspine.deploy")

HEALTH_PATH = "/health"
"""Flower's health check (``flwr.supercore.routers.health``), served on both listeners."""
CERTIFICATE_LIMIT = 1024 * 1024
"""Cap on a TLS certificate or key file (a PEM chain is a few KiB)."""
CERTIFICATE_FLAGS = ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile")
GRPC_CONTROL_ENV = "FLWR_INTERNAL_GRPC_CONTROL_API"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def route_prefixes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The path prefixes of the public listener (Fleet API) and of the control listener (Control and
    Runtime APIs), read from Flower's routers."""
    from flwr.supercore.routers.runtime.router import router as runtime_router
    from flwr.superlink.routers.control.router import router as control_router
    from flwr.superlink.routers.fleet.router import router as fleet_router

    return (fleet_router.prefix, HEALTH_PATH), (control_router.prefix, runtime_router.prefix, HEALTH_PATH)


def is_allowed(path: str, prefixes: Sequence[str]) -> bool:
    """Whether ``path`` is one of ``prefixes`` or lies below one, with no empty, ``.`` or ``..``
    segment (the router matches paths literally; such a path is refused rather than reasoned about)."""
    if not path.startswith("/") or any(s in ("", ".", "..") for s in path[1:].split("/")):
        return False
    return any(path == prefix or path.startswith(prefix + "/") for prefix in prefixes)


class OnlyPaths:
    """An ASGI application that passes the lifespan, and HTTP requests whose path ``is_allowed`` under
    ``prefixes``, to ``app``; every other request gets 403 (a WebSocket is closed) and a log line."""

    def __init__(self, app: ASGIApp, prefixes: Sequence[str], listener: str) -> None:
        self.app = app
        self.prefixes = tuple(prefixes)
        self.listener = listener

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" or (
            scope["type"] == "http" and is_allowed(scope.get("path", ""), self.prefixes)
        ):
            await self.app(scope, receive, send)
            return
        log.warning(
            "refused %s %r on the %s address from %s (it serves only %s)",
            scope.get("method", scope["type"]),
            scope.get("path", ""),
            self.listener,
            scope.get("client"),
            ", ".join(self.prefixes),
        )
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        elif scope["type"] == "http":
            body = f"not served on the {self.listener} address\n".encode()
            headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 403, "headers": headers})
            await send({"type": "http.response.body", "body": body})


class _ArgumentError(Exception):
    pass


def _raise(message: str) -> NoReturn:
    raise _ArgumentError(message)


def check_flower_args(parser: argparse.ArgumentParser, flower_args: Sequence[str]) -> argparse.Namespace:
    """``flower_args`` parsed by ``flower-superlink``'s own parser, a refusal as one ConfigError naming
    the flag (instead of argparse's usage text and exit). The public ``--host`` is checked, and the TLS
    files are read through :mod:`fedspine.files` (a FIFO or an oversized file is refused before Flower
    reads it)."""
    parser.error = _raise  # type: ignore[method-assign]
    try:
        args = parser.parse_args(list(flower_args))
    except _ArgumentError as exc:
        named = re.search(r"argument (--[\w-]+)", str(exc))
        raise ConfigError(named.group(1) if named else "flower-superlink arguments", str(exc)) from None
    check_host(args.host, "--host")
    paths = {flag: getattr(args, flag[2:].replace("-", "_"), None) for flag in CERTIFICATE_FLAGS}
    if not args.insecure and not all(paths.values()):
        missing = next(flag for flag, path in paths.items() if not path)
        raise ConfigError(missing, f"TLS needs all of {', '.join(CERTIFICATE_FLAGS)} (or --insecure)")
    for flag, path in paths.items():
        if path:
            read_file(path, flag, CERTIFICATE_LIMIT)
    return args


def _flower_config(cli: Any, flower_args: Sequence[str]) -> Any:
    """Flower's SuperLink configuration from ``flower_args``; Flower's own refusals (``sys.exit``) as
    a DeployError."""
    saved, sys.argv = sys.argv, ["flower-superlink", *flower_args]  # Flower's parser reads sys.argv
    try:
        return cli._parse_superlink_lifespan_config()
    except SystemExit as exc:
        reason = exc.code if isinstance(exc.code, str) else "see its log line above"
        raise DeployError(f"flower-superlink refused its arguments: {reason}") from None
    finally:
        sys.argv = saved


async def _serve_all(servers: Sequence[uvicorn.Server]) -> None:
    """Serve until any of ``servers`` stops (a signal, or a failure to bind), then stop the others."""
    tasks = [asyncio.create_task(server.serve()) for server in servers]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for server in servers:
        server.should_exit = True
    await asyncio.gather(*tasks, return_exceptions=True)


def serve(flower_args: Sequence[str], control: str = "127.0.0.1:9093") -> None:
    """Run a SuperLink configured by ``flower_args`` (``flower-superlink``'s options): the Fleet API
    on its ``--host``/``--port``, the Control and Runtime APIs only on ``control``. Blocks until
    interrupted.

    Raises:
        ConfigError: a malformed argument, or ``control`` takes the public listener's port.
        InputFileError: a TLS file that is not a regular file of sound size.
        DeployError: Flower refused its arguments, or the environment would serve the Control API
            elsewhere.
    """
    control_host, control_port = parse_address(control, "--control")
    # the flower extra, imported on use (the package exports a function of the module's name)
    cli = importlib.import_module("flwr.superlink.cli.flower_superlink")
    from flwr.superlink.main import create_app

    args = check_flower_args(cli._parse_args_run_superlink(), flower_args)
    if same_listener((args.host, args.port), (control_host, control_port)):
        raise ConfigError("--control", f"{control} takes the public --host/--port {args.host}:{args.port}")
    if os.environ.get(GRPC_CONTROL_ENV) == "1":
        raise DeployError(f"unset {GRPC_CONTROL_ENV}: Flower would serve the Control API over gRPC too")
    config = _flower_config(cli, flower_args)
    # The SuperExec (started by the lifespan) reaches the Runtime API at the configured host and port.
    runtime = dataclasses.replace(config, host=control_host, port=control_port)
    app = create_app(runtime, cli.SuperLinkLifespan)
    public_paths, control_paths = route_prefixes()
    tls = {"ssl_keyfile": config.ssl_keyfile, "ssl_certfile": config.ssl_certfile}
    log_config = cli.get_uvicorn_log_config(cli.console_handler.level)
    public = uvicorn.Config(
        OnlyPaths(app, public_paths, "devices'"),
        host=config.host,
        port=config.port,
        log_config=log_config,
        **tls,
    )
    # The lifespan (the SuperExec that starts ServerApps, the state) runs once, with the public listener.
    operator = uvicorn.Config(
        OnlyPaths(app, control_paths, "control"),
        host=control_host,
        port=control_port,
        lifespan="off",
        log_config=log_config,
        **tls,
    )
    log.info(
        "SuperLink: devices on %s:%s (Fleet API only); Control and Runtime APIs on %s:%s",
        config.host,
        config.port,
        control_host,
        control_port,
    )
    asyncio.run(_serve_all([uvicorn.Server(public), uvicorn.Server(operator)]))
