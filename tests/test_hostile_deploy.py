"""Hostile arguments and input files for every ``fedspine deploy`` command: each is refused with exit 1
or 2 and one ``error:`` line naming the flag or file, no traceback, no hang, and nothing written
(:func:`tests.hostile.refuse`). A valid call of each command is in ``test_deploy.py``."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedspine.deploy.arguments import parse_address, same_listener
from fedspine.deploy.settings import TIMEOUT_KEY, number
from fedspine.deploy.setup import check_bindings, write_connection
from fedspine.errors import ConfigError, DeployError
from tests.hostile import refuse

TINY = str(Path(__file__).parents[1] / "configs" / "tiny.toml")


def _file(name: str, text: str) -> Callable[[Path], None]:
    return lambda tmp: (tmp / name).parent.mkdir(parents=True, exist_ok=True) or (tmp / name).write_text(text)


def _fifo(name: str) -> Callable[[Path], None]:
    return lambda tmp: os.mkfifo(tmp / name)


def _folder(name: str) -> Callable[[Path], None]:
    return lambda tmp: (tmp / name).mkdir(parents=True)


def _socket(name: str) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        with socket.socket(socket.AF_UNIX) as s:  # a worker killed with SIGKILL leaves its socket
            s.bind(str(tmp / name))

    return make


@dataclass(frozen=True)
class Case:
    """``fedspine deploy`` + ``args`` (``{tmp}`` is the watched folder), refused naming ``names``."""

    id: str
    args: list[str]
    names: str
    prepare: list[Callable[[Path], None]] = field(default_factory=list)


APP = ["app", "{tmp}/app", "--records", "{tmp}/records", "-c", TINY]
CONNECTION = ["connection", "{tmp}/home", "--address", "127.0.0.1:9093"]
SUPERLINK = ["superlink", "--insecure", "--disable-runtime-dependency-installation"]

CASES = [
    # certs: validity, host names, where the files go
    Case("certs-days-negative", ["certs", "{tmp}/certs", "--days", "-1"], "--days"),
    Case("certs-days-zero", ["certs", "{tmp}/certs", "--days", "0"], "--days"),
    Case("certs-days-absurd", ["certs", "{tmp}/certs", "--days", "1000000000"], "--days"),
    Case("certs-host-empty", ["certs", "{tmp}/certs", "--host", ""], "--host"),
    Case("certs-host-spaces", ["certs", "{tmp}/certs", "--host", "not a host"], "--host"),
    Case("certs-host-url", ["certs", "{tmp}/certs", "--host", "https://server:9092"], "--host"),
    Case("certs-host-hyphen", ["certs", "{tmp}/certs", "--host", "-bad-.example.org"], "--host"),
    Case("certs-host-too-long", ["certs", "{tmp}/certs", "--host", "a" * 64 + ".org"], "--host"),
    Case("certs-out-is-a-file", ["certs", "{tmp}/taken"], "OUT", [_file("taken", "mine")]),
    Case(
        "certs-ca-key-is-a-folder",
        ["certs", "{tmp}/certs", "--ca-key", "{tmp}/private"],
        "--ca-key",
        [_folder("private")],
    ),
    # keys: how many, and names that leave OUT
    Case("keys-nodes-negative", ["keys", "{tmp}/keys", "--nodes", "-1"], "--nodes"),
    Case("keys-nodes-zero", ["keys", "{tmp}/keys", "--nodes", "0"], "--nodes"),
    Case("keys-nodes-absurd", ["keys", "{tmp}/keys", "--nodes", "100001"], "--nodes"),
    Case("keys-nodes-billions", ["keys", "{tmp}/keys", "--nodes", "4000000000"], "--nodes"),
    Case("keys-prefix-parent", ["keys", "{tmp}/keys", "--prefix", "../escaped"], "--prefix"),
    Case("keys-prefix-folder", ["keys", "{tmp}/keys", "--prefix", "sub/node"], "--prefix"),
    # app: durations and bindings
    Case("app-timeout-nan", [*APP, "--round-timeout", "nan"], "--round-timeout"),
    Case("app-timeout-inf", [*APP, "--round-timeout", "inf"], "--round-timeout"),
    Case("app-timeout-zero", [*APP, "--round-timeout", "0"], "--round-timeout"),
    Case("app-timeout-over-a-week", [*APP, "--round-timeout", "1e9"], "--round-timeout"),
    Case("app-wait-negative", [*APP, "--wait-for-nodes", "-5"], "--wait-for-nodes"),
    Case("app-wait-nan", [*APP, "--wait-for-nodes", "nan"], "--wait-for-nodes"),
    Case("app-bind-not-a-pair", [*APP, "--bind", "node7"], "--bind"),
    Case("app-bind-node-zero", [*APP, "--bind", "0=1"], "--bind"),
    Case("app-bind-node-over-64-bits", [*APP, "--bind", f"{2**64}=1"], "--bind"),
    Case("app-bind-5000-digits", [*APP, "--bind", "9" * 5000 + "=1"], "--bind"),
    Case("app-bind-twice", [*APP, "--bind", "11=0", "--bind", "11=1"], "--bind"),
    Case("app-out-is-a-file", ["app", "{tmp}/taken", *APP[2:]], "OUT", [_file("taken", "mine")]),
    # connection: the address, the CA file, an existing config.toml
    Case(
        "connection-address-words",
        ["connection", "{tmp}/home", "--address", "not an address", "--insecure"],
        "--address",
    ),
    Case(
        "connection-address-port-0",
        ["connection", "{tmp}/home", "--address", "h:0", "--insecure"],
        "--address",
    ),
    Case(
        "connection-address-port-65536",
        ["connection", "{tmp}/home", "--address", "h:65536", "--insecure"],
        "--address",
    ),
    Case(
        "connection-address-no-port",
        ["connection", "{tmp}/home", "--address", "server", "--insecure"],
        "--address",
    ),
    Case("connection-name-default", [*CONNECTION, "--insecure", "--name", "default"], "--name"),
    Case("connection-ca-missing", [*CONNECTION, "--root-certificates", "{tmp}/missing.crt"], "missing.crt"),
    Case(
        "connection-ca-folder",
        [*CONNECTION, "--root-certificates", "{tmp}/cafolder"],
        "cafolder",
        [_folder("cafolder")],
    ),
    Case(
        "connection-ca-fifo",
        [*CONNECTION, "--root-certificates", "{tmp}/ca.fifo"],
        "ca.fifo",
        [_fifo("ca.fifo")],
    ),
    Case(
        "connection-ca-not-pem",
        [*CONNECTION, "--root-certificates", "{tmp}/notes.txt"],
        "PEM",
        [_file("notes.txt", "not a certificate\n")],
    ),
    Case(
        "connection-config-bad-toml",
        [*CONNECTION, "--insecure"],
        "config.toml",
        [_file("home/config.toml", "[superlink\naddress =")],
    ),
    Case(
        "connection-config-not-a-table",
        [*CONNECTION, "--insecure"],
        "config.toml",
        [_file("home/config.toml", "superlink = 5\n")],
    ),
    Case(
        "connection-config-fifo",
        [*CONNECTION, "--insecure"],
        "config.toml",
        [_folder("home"), _fifo("home/config.toml")],
    ),
    # superlink: both listeners' addresses and its TLS files, refused before anything starts
    Case("superlink-control-garbage", [*SUPERLINK, "--control", "garbage"], "--control"),
    Case("superlink-control-no-port", [*SUPERLINK, "--control", "[::1]"], "--control"),
    Case(
        "superlink-control-equals-public",
        [*SUPERLINK, "--host", "127.0.0.1", "--port", "9500", "--control", "127.0.0.1:9500"],
        "--control",
    ),
    Case(
        "superlink-control-under-wildcard",
        [*SUPERLINK, "--host", "0.0.0.0", "--port", "9500", "--control", "127.0.0.1:9500"],
        "--control",
    ),
    Case("superlink-public-host", [*SUPERLINK, "--host", "bad host!"], "--host"),
    Case("superlink-public-port", [*SUPERLINK, "--port", "0"], "--port"),
    Case("superlink-no-tls", ["superlink", "--ssl-certfile", "{tmp}/s.pem"], "--ssl-ca-certfile"),
    Case("superlink-unknown-flag", [*SUPERLINK, "--portx", "9500"], "--portx"),
    Case(
        "superlink-tls-fifo",
        [
            "superlink",
            "--ssl-ca-certfile",
            "{tmp}/ca.fifo",
            "--ssl-certfile",
            "{tmp}/s.pem",
            "--ssl-keyfile",
            "{tmp}/s.key",
        ],
        "ca.fifo",
        [_fifo("ca.fifo")],
    ),
    # worker: where its socket and key go
    Case("worker-socket-no-folder", ["worker", "--socket", "{tmp}/missing/node.sock"], "--socket"),
    Case(
        "worker-socket-is-a-file",
        ["worker", "--socket", "{tmp}/notes.txt"],
        "--socket",
        [_file("notes.txt", "mine")],
    ),
    Case("worker-socket-too-long", ["worker", "--socket", "{tmp}/" + "s" * 120], "--socket"),
    Case(
        "worker-key-is-someones-file",
        ["worker", "--socket", "{tmp}/node.sock"],
        "--socket",
        [_file("node.sock.key", "my notes, not a key\n")],
    ),
    Case(
        "worker-stale-socket",
        ["worker", "--socket", "{tmp}/node.sock"],
        "did not stop cleanly",
        [_socket("node.sock")],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_deploy_arguments_are_refused_in_one_line_and_write_nothing(
    case: Case, tmp_path: Path
) -> None:
    for prepare in case.prepare:
        prepare(tmp_path)
    args = ["deploy", *(arg.replace("{tmp}", str(tmp_path)) for arg in case.args)]
    refuse(args, tmp_path, names=case.names)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:9093", ("127.0.0.1", 9093)),
        ("[::1]:1", ("::1", 1)),
        ("server.example.org:65535", ("server.example.org", 65535)),
    ],
)
def test_sound_addresses_parse(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address, "--address") == expected


def test_listeners_collide_on_one_port_only_through_a_shared_interface() -> None:
    assert same_listener(("0.0.0.0", 9092), ("127.0.0.1", 9092))
    assert same_listener(("localhost", 9092), ("127.0.0.1", 9092))
    assert not same_listener(("10.0.0.5", 9092), ("127.0.0.1", 9092))  # two interfaces, one port each
    assert not same_listener(("0.0.0.0", 9092), ("127.0.0.1", 9093))


def test_sound_bindings_are_written_as_the_server_reads_them() -> None:
    assert check_bindings(["12=0", " 34 = 1,56=2"], 3) == "12=0,34=1,56=2"
    assert check_bindings([], 3) == ""
    with pytest.raises(ConfigError, match=r"the fleet has devices 0\.\.2"):
        check_bindings(["12=3"], 3)


def test_an_existing_flwr_config_keeps_its_other_connections(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink.other]\naddress = "10.0.0.1:9093"\ninsecure = true\n')
    write_connection(home, "fedspine", "127.0.0.1:9093", None, insecure=True)
    text = (home / "config.toml").read_text()
    assert "10.0.0.1:9093" in text and 'default = "fedspine"' in text


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1.0, 1e9, True, "60"])
def test_a_run_config_duration_overridden_at_flwr_run_is_checked_by_the_server(value: object) -> None:
    """``flwr run APP --run-config round-timeout=nan`` bypasses ``fedspine deploy app``'s checks: the
    ServerApp refuses it naming the key (a NaN timeout never expires: every comparison is false)."""
    with pytest.raises(DeployError, match=TIMEOUT_KEY):
        number({TIMEOUT_KEY: value}, TIMEOUT_KEY, 3600.0)  # type: ignore[dict-item]
    assert number({}, TIMEOUT_KEY, 3600.0) == 3600.0
