"""A Flower deployment on loopback for tests: SuperLink, SuperNodes and the flwr CLI as real processes.

Every process started is remembered by its PID and stopped, with its descendants (the SuperLink and
SuperNodes start ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` in sessions of
their own), when the deployment is closed, whatever happened in between.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient

from fedspine.data import load_bible, with_label
from fedspine.deploy.setup import write_certificates, write_connection, write_node_keys

BIN = Path(sys.executable).parent
CONNECTION = "loopback"
"""The operator's connection: the SuperLink's Control API address."""
DEVICE_CONNECTION = "device"
"""What a device can reach: the SuperLink's public address (Fleet API), with the CA certificate."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Loopback:
    """A TLS SuperLink with node authentication on 127.0.0.1 and SuperNodes registered with it, started
    as docs/deploy.md says: ``fedspine deploy superlink``, with the Control API on a port of its own."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.control_port = free_port()
        self.certs = write_certificates(root / "certs", ["localhost", "127.0.0.1"])
        self.flwr_home = root / "flwr_home"
        write_connection(self.flwr_home, DEVICE_CONNECTION, f"127.0.0.1:{self.port}", self.certs["ca"])
        write_connection(self.flwr_home, CONNECTION, f"127.0.0.1:{self.control_port}", self.certs["ca"])
        self.env = {
            **os.environ,
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_HOME": str(self.flwr_home),
            # the SuperLink and SuperNodes find flower-superexec on PATH
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    # --- processes ----------------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def start_superlink(self, *extra: str, timeout: float = 60.0) -> None:
        """``fedspine deploy superlink`` with docs/deploy.md's options (and ``extra``), once it answers."""
        c = self.certs
        self._spawn(
            "superlink",
            [
                str(BIN / "fedspine"), "deploy", "superlink",
                "--control", f"127.0.0.1:{self.control_port}",
                "--ssl-ca-certfile", str(c["ca"]),
                "--ssl-certfile", str(c["cert"]),
                "--ssl-keyfile", str(c["key"]),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1",
                "--port", str(self.port),
                *extra,
            ],
        )  # fmt: skip
        context = ssl.create_default_context(cafile=str(c["ca"]))
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.procs["superlink"].poll() is not None:
                raise RuntimeError(f"the SuperLink exited:\n{self.log('superlink')}")
            try:
                with urllib.request.urlopen(
                    f"https://127.0.0.1:{self.port}/health", context=context, timeout=2
                ):
                    return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"the SuperLink did not answer within {timeout} s:\n{self.log('superlink')}")

    def https(self, port: int, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """One HTTPS request to 127.0.0.1:``port`` trusting only ``ca.crt``, with no credentials; the path
        is sent as written (no normalization). Its status and body."""
        context = ssl.create_default_context(cafile=str(self.certs["ca"]))
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        try:
            conn.request(method, path, body=body, headers={"content-type": "application/protobuf"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def runtime_client(self, port: int, token: str | None = None) -> RuntimeHttpClient:
        """Flower's own Runtime API client (what the SuperExec uses) for 127.0.0.1:``port``, trusting
        ``ca.crt``: no key, no secret; a task's ``token`` only where given."""
        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="flower-superexec")]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(
            f"127.0.0.1:{port}",
            insecure=False,
            root_certificates=self.certs["ca"].read_bytes(),
            interceptors=interceptors,
        )

    def keys(self, names: list[str]) -> list[tuple[Path, Path]]:
        return write_node_keys(self.root / "keys", names)

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def register(self, public_key: Path) -> int:
        done = self.flwr("supernode", "register", str(public_key), CONNECTION, "--format", "json")
        if done.returncode != 0:
            raise RuntimeError(f"register failed: {done.stdout}{done.stderr}")
        return int(json.loads(done.stdout)["node-id"])

    def start_supernode(
        self,
        name: str,
        private_key: Path,
        device_id: int,
        data_path: str = "",
        worker: str = "",
        **extra: Any,
    ) -> subprocess.Popen[bytes]:
        node_config = f'device-id={device_id} model-dir="{self.root / "models" / name}"'
        node_config += f' data-path="{data_path}"' if data_path else ""
        node_config += f' worker="{worker}"' if worker else ""
        args = [
            str(BIN / "flower-supernode"),
            "--root-certificates", str(self.certs["ca"]),
            "--superlink", f"127.0.0.1:{self.port}",
            "--auth-supernode-private-key", str(private_key),
            "--node-config", node_config,
            "--host", "127.0.0.1",
            "--port", str(free_port()),
        ]  # fmt: skip
        for key, value in extra.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        return self._spawn(name, args)

    def start_worker(self, name: str, socket: Path, timeout: float = 120.0) -> subprocess.Popen[bytes]:
        """``fedspine deploy worker --socket SOCKET``, once its socket exists."""
        proc = self._spawn(name, [str(BIN / "fedspine"), "deploy", "worker", "--socket", str(socket)])
        deadline = time.time() + timeout
        while not socket.exists():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the worker {name} did not start:\n{self.log(name)}")
            time.sleep(0.2)
        return proc

    def wait_connected(self, names: list[str], timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if all("SuperNode ID" in self.log(n) for n in names):
                return
            for n in names:
                if self.procs[n].poll() is not None:
                    raise RuntimeError(f"SuperNode {n} exited:\n{self.log(n)}")
            time.sleep(0.2)
        raise TimeoutError(f"SuperNodes {names} did not connect within {timeout} s")

    def run_app(
        self, app_dir: Path, *run_config: str, timeout: float = 600.0
    ) -> subprocess.CompletedProcess[str]:
        """``flwr run APP CONNECTION --stream [--run-config K=V]``; note its exit code is 0 even when the
        ServerApp fails."""
        overrides = [arg for kv in run_config for arg in ("--run-config", kv)]
        return self.flwr("run", str(app_dir), CONNECTION, "--stream", *overrides, timeout=timeout)

    def start_app(self, app_dir: Path, name: str) -> subprocess.Popen[bytes]:
        """``flwr run APP CONNECTION --stream`` in the background (its output in the log ``name``)."""
        return self._spawn(name, [str(BIN / "flwr"), "run", str(app_dir), CONNECTION, "--stream"])

    def processes(self, command: str) -> list[int]:
        """PIDs of the live processes started here, or by them, whose command line contains ``command``."""
        found = []
        for proc in self.procs.values():
            for pid in [proc.pid, *descendants(proc.pid)]:
                with contextlib.suppress(OSError):
                    if command in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode():
                        found.append(pid)
        return found

    def close(self) -> None:
        """Stop every process started here, and their descendants, by PID: TERM, then KILL."""
        pids: list[int] = []
        for proc in self.procs.values():
            if proc.poll() is None:
                pids += [proc.pid, *descendants(proc.pid)]
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.time() + 5
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.time()))
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        for proc in self.procs.values():
            proc.wait(timeout=10)

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


MIXES = {0: ("law", "history", "wisdom"), 1: ("gospels", "epistles", "prophets")}
"""Devices 0 and 1 see different halves of the label set."""


def write_node_files(root: Path, per_device: int = 40) -> dict[int, str]:
    """Device 0 and 1: JSONL files of Bible verses from their own genres; device 2: a broken file."""
    verses = with_label(load_bible(), "genre")
    paths = {}
    for device, genres in MIXES.items():
        rows = [ex for ex in verses if ex.label in genres][device::97][:per_device]
        path = root / f"device{device}.jsonl"
        path.write_text("".join(json.dumps({"text": ex.text, "label": ex.label}) + "\n" for ex in rows))
        paths[device] = str(path)
    broken = root / "device2.jsonl"
    broken.write_text('{"text": "In the beginning", "label": "law"}\n{"text": "And God said", "label"\n')
    paths[2] = str(broken)
    return paths
