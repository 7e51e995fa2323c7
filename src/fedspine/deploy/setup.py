"""Files a Flower deployment needs: TLS certificates, SuperNode keys, the app folder, a CLI connection.

* ``write_certificates``: a test CA and a server certificate for the SuperLink's names/addresses
  (for production, use certificates from your own CA);
* ``write_node_keys``: one ECDSA P-384 key pair per SuperNode, OpenSSH format (what
  ``flower-supernode --auth-supernode-private-key`` reads and ``flwr supernode register`` takes);
* ``write_app``: a Flower app folder whose run config carries the resolved fedspine config;
* ``write_connection``: a ``[superlink.NAME]`` entry in the flwr CLI's ``config.toml``.

Every file is created, never overwritten unless ``force`` is given (then the old file, or a link in
its place, is removed first; a link's target is never written). Private keys are created with
``O_EXCL | O_NOFOLLOW`` and mode 0600 set on the open file. The test CA's private key is not kept
beside ``ca.crt`` (which every device receives): it is discarded unless a separate path is named.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedspine.config import Config, to_toml, tomllib
from fedspine.data import ClassificationTask
from fedspine.deploy.settings import (
    BIND_KEY,
    CONFIG_KEY,
    DATA_KEY,
    NODES_KEY,
    OUT_KEY,
    RESUME_KEY,
    TIMEOUT_KEY,
    node_bindings,
)
from fedspine.errors import DeployError
from fedspine.runtime.build.data import build_task, load_examples

APP_NAME = "fedspine-app"


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


def write_certificates(
    out: Path,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 365,
    *,
    ca_key: Path | None = None,
    force: bool = False,
) -> dict[str, Path]:
    """A CA (``ca.crt``) and a server certificate (``server.pem``, ``server.key``) valid for ``hosts``.

    The CA's private key is written to ``ca_key`` when given (it must not be inside ``out``, whose
    ``ca.crt`` goes to every device), otherwise discarded: a test CA then signs only this server.
    """
    if ca_key is not None and out.resolve() in ca_key.resolve().parents:
        raise DeployError(f"keep the CA key out of {out} (its ca.crt goes to every device): {ca_key}")
    if not hosts:
        raise DeployError("the server certificate needs at least one host name or IP address")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key_pair = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedspine test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key_pair.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key_pair, hashes.SHA256())
    )
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key_pair, hashes.SHA256())
    )
    paths = {"ca": out / "ca.crt", "cert": out / "server.pem", "key": out / "server.key"}
    if ca_key is not None:
        paths["ca_key"] = ca_key
    _refuse_existing(list(paths.values()), force)
    _write_new(paths["ca"], ca.public_bytes(serialization.Encoding.PEM), force)
    _write_new(paths["cert"], server.public_bytes(serialization.Encoding.PEM), force)
    _write_private(paths["key"], _pem(server_key), force)
    if ca_key is not None:
        _write_private(ca_key, _pem(ca_key_pair), force)
    return paths


def write_node_keys(out: Path, names: Sequence[str], *, force: bool = False) -> list[tuple[Path, Path]]:
    """One key pair per name: ``NAME`` (private, OpenSSH) and ``NAME.pub`` (one-line OpenSSH)."""
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
    data source written in, so that nodes with their own data share the server's label set.
    """
    if not shared_data and config.data.task == "classification" and not config.data.labels:
        config = with_labels(config)
    bind_text = ",".join(b.strip() for b in bindings)
    bound = node_bindings({BIND_KEY: bind_text}) or {}
    devices = sum(g.count for g in config.fleet.groups)
    outside = sorted(d for d in bound.values() if d >= devices)
    if outside:
        raise DeployError(f"--bind names device {outside[0]}; the fleet has devices 0..{devices - 1}")
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
    path = out / "pyproject.toml"
    path.write_text(
        "# A Flower app running a fedspine experiment; written by `fedspine deploy app`.\n"
        + tomli_w.dumps(project),
        encoding="utf-8",
    )
    return path


def with_labels(config: Config) -> Config:
    """``config`` with ``data.labels`` set to the labels of its data source (read here, once)."""
    task = build_task(config, load_examples(config, np.random.default_rng(config.run.seed)))
    assert isinstance(task, ClassificationTask)
    return dataclasses.replace(config, data=dataclasses.replace(config.data, labels=list(task.labels)))


def write_connection(
    flwr_home: Path, name: str, address: str, root_certificates: Path | None, *, insecure: bool = False
) -> Path:
    """Add (or replace) ``[superlink.NAME]`` in ``FLWR_HOME/config.toml`` and make it the default.

    A connection trusts ``root_certificates``, or is insecure (plain HTTP: loopback experiments only)
    when ``insecure`` says so explicitly, as Flower's own CLI requires; exactly one of the two.
    """
    if (root_certificates is None) == (not insecure):
        raise DeployError("name the SuperLink's CA with --root-certificates, or pass --insecure (not both)")
    path = flwr_home / "config.toml"
    data = tomllib.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    links = data.setdefault("superlink", {})
    entry: dict[str, object] = {"address": address}
    if root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(root_certificates.resolve())  # the flwr CLI needs an absolute path
    links[name] = entry
    links["default"] = name
    flwr_home.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path
