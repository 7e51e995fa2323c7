"""Files a Flower deployment needs: TLS certificates, SuperNode keys, the app folder, a CLI connection.

* ``write_certificates``: a test CA and a server certificate for the SuperLink's names/addresses
  (for production, use certificates from your own CA);
* ``write_node_keys``: one ECDSA P-384 key pair per SuperNode, OpenSSH format (what
  ``flower-supernode --auth-supernode-private-key`` reads and ``flwr supernode register`` takes);
* ``write_app``: a Flower app folder whose run config carries the resolved fedspine config;
* ``write_connection``: a ``[superlink.NAME]`` entry in the flwr CLI's ``config.toml``.

Every argument is checked before anything is written (:mod:`fedspine.deploy.arguments`: a
``ConfigError`` naming the flag), and every file read (an existing ``config.toml``, the root
certificates) goes through :mod:`fedspine.files` (a regular file, under a size cap). Key files are
created, never overwritten unless ``force`` is given (then the old file, or a link in its place, is
removed first; a link's target is never written). Private keys are created with ``O_EXCL |
O_NOFOLLOW`` and mode 0600 set on the open file. The test CA's private key is not kept beside
``ca.crt`` (which every device receives): it is discarded unless a separate path is named. The app's
``pyproject.toml`` and the flwr CLI's ``config.toml`` are replaced atomically (a link in their place is
replaced, not written through).
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedspine.config import MAX_DEVICES, Config, to_toml, tomllib
from fedspine.data import ClassificationTask
from fedspine.deploy.arguments import (
    check_count,
    check_file_name,
    check_host,
    check_seconds,
    parse_address,
    read_file,
)
from fedspine.deploy.settings import (
    BIND_KEY,
    CONFIG_KEY,
    DATA_KEY,
    MAX_SECONDS,
    NODES_KEY,
    OUT_KEY,
    RESUME_KEY,
    TIMEOUT_KEY,
)
from fedspine.errors import ConfigError, DeployError
from fedspine.files import CONFIG_LIMIT, InputFileError, read_text, write_text_atomic
from fedspine.runtime.experiment.data import build_task, load_examples

APP_NAME = "fedspine-app"
MAX_DAYS = 3650
"""Longest validity of the test certificates: nothing can revoke them (no CRL, no OCSP), so their
lifetime is what bounds the use of a leaked ``server.key``; ten years outlasts a device's service."""
MAX_NODE_KEYS = MAX_DEVICES
"""At most one key pair per device a fleet may have (``fedspine.config.MAX_DEVICES``)."""
NODE_ID_LIMIT = 2**64
"""Flower node ids are unsigned 64-bit integers."""
CERTIFICATE_LIMIT = 1024 * 1024
"""Cap on a root-certificates file (a PEM bundle of a few CAs is a few KiB)."""


def _write_new(path: Path, data: bytes, force: bool, mode: int = 0o644) -> None:
    """Create ``path`` with ``data`` and ``mode``; an existing file (or link) only with ``force``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        if not force:
            raise DeployError(f"{path} exists; pass --force to replace it")
        if path.is_dir() and not path.is_symlink():
            raise DeployError(f"{path} is a directory")
        path.unlink()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except OSError as exc:
        raise DeployError(f"cannot create {path}: {exc.strerror}") from exc
    with open(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # the umask may have narrowed or a race widened it
        f.write(data)


def _refuse_existing(paths: Sequence[Path], force: bool) -> None:
    """Refuse before writing anything (never half a set) when a path exists and ``force`` is off."""
    for path in paths:
        if not force and (path.is_symlink() or path.exists()):
            raise DeployError(f"{path} exists; pass --force to replace it")


def _write_private(path: Path, data: bytes, force: bool = False) -> None:
    _write_new(path, data, force, 0o600)


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _check_folder(path: Path, flag: str) -> None:
    """Refuse a folder argument that exists as something else, or lies under a file."""
    for existing in (path, *path.parents):
        if existing.is_symlink() or existing.exists():
            if not existing.is_dir():
                raise ConfigError(flag, f"{path}: {existing} exists and is not a folder")
            return


def _check_file_target(path: Path, flag: str) -> None:
    """Refuse a file argument that is a folder, or lies under a file."""
    if path.is_dir() and not path.is_symlink():
        raise ConfigError(flag, f"{path} is a folder; name a file")
    _check_folder(path.parent, flag)


def certificate_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """The subject alternative names for ``hosts``: each an IP address or a DNS name (checked)."""
    if not hosts:
        raise ConfigError("--host", "the server certificate needs at least one host name or IP address")
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(check_host(h.strip(), "--host") for h in hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host.rstrip(".")))
    return names


def write_certificates(
    out: Path,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 365,
    *,
    ca_key: Path | None = None,
    force: bool = False,
) -> dict[str, Path]:
    """A CA (``ca.crt``) and a server certificate (``server.pem``, ``server.key``) valid for ``hosts``
    (IP addresses or DNS names) for ``days`` (1..:data:`MAX_DAYS`).

    The CA's private key is written to ``ca_key`` when given (it must not be inside ``out``, whose
    ``ca.crt`` goes to every device), otherwise discarded: a test CA then signs only this server.
    """
    check_count(days, "--days", MAX_DAYS)
    names = certificate_names(hosts)
    _check_folder(out, "OUT")
    if ca_key is not None:
        _check_file_target(ca_key, "--ca-key")
        if out.resolve() in ca_key.resolve().parents:
            raise DeployError(f"keep the CA key out of {out} (its ca.crt goes to every device): {ca_key}")
    paths = {"ca": out / "ca.crt", "cert": out / "server.pem", "key": out / "server.key"}
    if ca_key is not None:
        paths["ca_key"] = ca_key
    _refuse_existing(list(paths.values()), force)
    common_name = hosts[0].strip()
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days))
    ca_key_pair = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedspine test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key_pair.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key_pair, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    # the subject's common name holds at most 64 characters; clients check the alternative names
    subject = common_name if len(common_name) <= 64 else "fedspine SuperLink"
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key_pair, hashes.SHA256())
    )
    _write_new(paths["ca"], ca.public_bytes(serialization.Encoding.PEM), force)
    _write_new(paths["cert"], server.public_bytes(serialization.Encoding.PEM), force)
    _write_private(paths["key"], _pem(server_key), force)
    if ca_key is not None:
        _write_private(ca_key, _pem(ca_key_pair), force)
    return paths


def node_key_names(prefix: str, nodes: int) -> list[str]:
    """``PREFIX0`` .. ``PREFIX{nodes-1}``, after checking ``nodes`` (1..:data:`MAX_NODE_KEYS`) and that
    each name is a plain file name."""
    check_count(nodes, "--nodes", MAX_NODE_KEYS)
    return [check_file_name(f"{prefix}{i}", "--prefix") for i in range(nodes)]


def write_node_keys(out: Path, names: Sequence[str], *, force: bool = False) -> list[tuple[Path, Path]]:
    """One key pair per name: ``NAME`` (private, OpenSSH) and ``NAME.pub`` (one-line OpenSSH).

    ``names`` are plain file names inside ``out`` (1..:data:`MAX_NODE_KEYS` of them, none twice).
    """
    if not names:
        raise ConfigError("--nodes", f"must be in 1..{MAX_NODE_KEYS}: no key pair to write")
    check_count(len(names), "--nodes", MAX_NODE_KEYS)
    for name in names:
        check_file_name(name, "--prefix")
    if len(set(names)) != len(names):
        raise ConfigError("--prefix", "names a key file twice")
    _check_folder(out, "OUT")
    _refuse_existing([p for name in names for p in (out / name, out / f"{name}.pub")], force)
    pairs = []
    for name in names:
        key = ec.generate_private_key(ec.SECP384R1())
        private = out / name
        public = out / f"{name}.pub"
        _write_private(
            private,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
            force,
        )
        _write_new(
            public,
            key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            + b"\n",
            force,
        )
        pairs.append((private, public))
    return pairs


def check_bindings(bindings: Sequence[str], devices: int) -> str:
    """``bindings`` (``"NODE=DEVICE"`` each, or several joined by commas) as the run-config text, after
    checking each: a Flower node id (1..2^64-1) and a device of the fleet (0..``devices``-1), none
    bound twice."""
    bound: dict[int, int] = {}
    for item in (item.strip() for b in bindings for item in b.split(",")):
        node, sep, device = (part.strip() for part in item.partition("="))
        digits = sep and all(part.isascii() and part.isdigit() and len(part) <= 20 for part in (node, device))
        if not digits or not 0 < int(node) < NODE_ID_LIMIT:
            raise ConfigError(
                "--bind", f"{item!r} is not NODE=DEVICE (a Flower node id in 1..2^64-1 = a device number)"
            )
        if int(device) >= devices:
            raise ConfigError(
                "--bind", f"{item!r} names device {device}; the fleet has devices 0..{devices - 1}"
            )
        if int(node) in bound or int(device) in bound.values():
            raise ConfigError("--bind", f"{item!r}: node {node} or device {device} is bound twice")
        bound[int(node)] = int(device)
    return ",".join(f"{node}={device}" for node, device in bound.items())


def write_app(
    out: Path,
    config: Config,
    records: Path,
    round_timeout: float = 3600.0,
    wait_for_nodes: float = 120.0,
    bindings: Sequence[str] = (),
    shared_data: bool = False,
) -> Path:
    """A Flower app folder (``pyproject.toml``) running ``config``; records go to ``records``.

    ``records`` is a path on the machine that runs the ServerApp (the SuperLink's); ``flwr run
    --run-config`` may override any of the run-config keys. ``bindings`` (``"NODE=DEVICE"``, Flower
    node ids as ``flwr supernode register`` prints them) fix which node is which device. The nodes
    train on their own data files unless ``shared_data`` (a testbed: each derives its partition of
    the config's data source); a classification config without ``data.labels`` gets the labels of its
    data source written in, so that nodes with their own data share the server's label set. The two
    durations are seconds above 0, at most :data:`~fedspine.deploy.settings.MAX_SECONDS`.
    """
    check_seconds(round_timeout, "--round-timeout", MAX_SECONDS)
    check_seconds(wait_for_nodes, "--wait-for-nodes", MAX_SECONDS)
    bind_text = check_bindings(bindings, sum(g.count for g in config.fleet.groups))
    _check_folder(out, "OUT")
    path = out / "pyproject.toml"
    _check_file_target(path, "OUT")
    if not shared_data and config.data.task == "classification" and not config.data.labels:
        config = with_labels(config)
    project = {
        "project": {
            "name": APP_NAME,
            "version": "1.0.0",
            "description": f"fedspine experiment '{config.run.name}' on Flower",
            "license": "Apache-2.0",
            "dependencies": ["fedspine[flower]"],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedspine",
                    "components": {
                        "serverapp": "fedspine.deploy.app:server_app",
                        "clientapp": "fedspine.deploy.app:client_app",
                    },
                    "config": {
                        CONFIG_KEY: to_toml(config),
                        OUT_KEY: str(records.resolve()),
                        TIMEOUT_KEY: float(round_timeout),
                        NODES_KEY: float(wait_for_nodes),
                        BIND_KEY: bind_text,
                        RESUME_KEY: False,
                        DATA_KEY: "shared" if shared_data else "local",
                    },
                }
            }
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        path,
        "# A Flower app running a fedspine experiment; written by `fedspine deploy app`.\n"
        + tomli_w.dumps(project),
    )
    return path


def with_labels(config: Config) -> Config:
    """``config`` with ``data.labels`` set to the labels of its data source (read here, once)."""
    task = build_task(config, load_examples(config, np.random.default_rng(config.run.seed)))
    assert isinstance(task, ClassificationTask)
    return dataclasses.replace(config, data=dataclasses.replace(config.data, labels=list(task.labels)))


def read_flwr_config(path: Path) -> dict[str, Any]:
    """The flwr CLI's ``config.toml`` at ``path`` (empty when there is none), read through
    :mod:`fedspine.files`; its ``superlink`` entry, when present, must be a table."""
    if not (path.exists() or path.is_symlink()):
        return {}
    try:
        data = tomllib.loads(read_text(path, CONFIG_LIMIT))
    except tomllib.TOMLDecodeError as exc:
        raise InputFileError(path, f"is not valid TOML ({exc}); fix or move it") from None
    if not isinstance(data.get("superlink", {}), dict):
        raise InputFileError(path, "has a 'superlink' entry that is not a table; fix or move it")
    return data


def check_root_certificates(path: Path) -> Path:
    """``path`` if it is a regular file holding PEM certificates (read through :mod:`fedspine.files`)."""
    data = read_file(path, "--root-certificates", CERTIFICATE_LIMIT)
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise InputFileError(
            path, "holds no PEM certificate (given as --root-certificates: the SuperLink's ca.crt)"
        ) from None
    return path


def write_connection(
    flwr_home: Path, name: str, address: str, root_certificates: Path | None, *, insecure: bool = False
) -> Path:
    """Add (or replace) ``[superlink.NAME]`` in ``FLWR_HOME/config.toml`` and make it the default.

    A connection trusts ``root_certificates`` (a file of PEM certificates), or is insecure (plain
    HTTP: loopback experiments only) when ``insecure`` says so explicitly, as Flower's own CLI
    requires; exactly one of the two. ``address`` is ``HOST:PORT``.
    """
    if (root_certificates is None) == (not insecure):
        raise DeployError("name the SuperLink's CA with --root-certificates, or pass --insecure (not both)")
    parse_address(address, "--address")
    if not name.strip() or name == "default":
        raise ConfigError(
            "--name", f"{name!r}: a connection needs a name other than 'default' (the flwr CLI's key)"
        )
    if root_certificates is not None:
        check_root_certificates(root_certificates)
    _check_folder(flwr_home, "FLWR_HOME")
    path = flwr_home / "config.toml"
    _check_file_target(path, "FLWR_HOME")
    data = read_flwr_config(path)
    links = data.setdefault("superlink", {})
    entry: dict[str, object] = {"address": address.strip()}
    if root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(root_certificates.resolve())  # the flwr CLI needs an absolute path
    links[name] = entry
    links["default"] = name
    flwr_home.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, tomli_w.dumps(data))
    return path
