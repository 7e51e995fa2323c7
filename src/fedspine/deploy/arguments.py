"""Checks of the ``fedspine deploy`` commands' arguments, made before anything is written or started.

Each check raises :class:`~fedspine.errors.ConfigError` naming the flag and what it accepts (the CLI
prints one ``error:`` line and exits 2). Nothing is resolved on the network (a host name is checked
for its form, not looked up); the one reader, :func:`read_file`, reads a file argument through
:mod:`fedspine.files` and names the flag in its refusal (exit 1).
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from pathlib import Path

from fedspine.errors import ConfigError
from fedspine.files import InputFileError, read_bytes

MAX_PORT = 65535
_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
"""One label of a DNS name (RFC 1123): letters, digits and inner hyphens, 1..63 characters."""
WILDCARDS = ("0.0.0.0", "::", "")
"""Addresses a server binds to listen on every interface."""


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def check_host(host: str, flag: str) -> str:
    """``host`` if it is an IP address or a DNS name (RFC 1123 labels, at most 253 characters)."""
    if is_ip(host):
        return host
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise ConfigError(
            flag,
            f"{host!r} is neither an IP address nor a DNS name (letters, digits and hyphens in "
            "dot-separated labels of 1..63 characters; an international name in its xn-- form)",
        )
    return host


def parse_address(address: str, flag: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6) as a checked host and a port in 1..65535."""
    host, sep, port = address.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:  # an IPv6 address without brackets: its last group would read as the port
        sep = ""
    if not sep or not port.isascii() or not port.isdigit() or not 0 < int(port) <= MAX_PORT:
        raise ConfigError(flag, f"{address!r}: expected HOST:PORT ([V6]:PORT) with a port in 1..{MAX_PORT}")
    return check_host(host, flag), int(port)


def same_listener(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Whether two listening addresses would take the same port on some interface."""
    (host_a, port_a), (host_b, port_b) = a, b
    if port_a != port_b:
        return False
    loopback = {h for h in (host_a, host_b) if h == "localhost" or (is_ip(h) and _is_loopback(h))}
    return host_a == host_b or host_a in WILDCARDS or host_b in WILDCARDS or len(loopback) == 2


def _is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


def check_count(value: int, flag: str, maximum: int) -> int:
    """``value`` if it lies in 1..``maximum``."""
    if not 1 <= value <= maximum:
        raise ConfigError(flag, f"must be in 1..{maximum}, got {value}")
    return value


def check_seconds(value: float, flag: str, maximum: float) -> float:
    """``value`` if it is a finite number of seconds above 0 and at most ``maximum``."""
    if not math.isfinite(value) or not 0 < value <= maximum:
        raise ConfigError(flag, f"must be a number of seconds above 0 and at most {maximum:g}, got {value}")
    return float(value)


def check_file_name(name: str, flag: str) -> str:
    """``name`` if it is one plain file name: not empty, no path separator, no NUL, not ``.``/``..``."""
    if not name or "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
        raise ConfigError(flag, f"gives the file name {name!r}; a name must stay inside the output folder")
    return name


def read_file(path: Path | str, flag: str, limit: int) -> bytes:
    """The bytes of the file argument ``path`` (``~`` expanded), at most ``limit`` of them.

    Raises:
        InputFileError: as :func:`fedspine.files.read_bytes`, its reason followed by the flag.
    """
    try:
        return read_bytes(os.path.expanduser(path), limit)
    except InputFileError as exc:
        raise InputFileError(exc.path, f"{exc.reason} (given as {flag})") from None


__all__ = [
    "MAX_PORT",
    "check_count",
    "check_file_name",
    "check_host",
    "check_seconds",
    "is_ip",
    "parse_address",
    "read_file",
    "same_listener",
]
