"""Reading and writing files that arrive from outside: run directories, sweep and profile files,
manifests, model directories.

A path given on the command line, or found inside a run directory, is untrusted: it may be a FIFO
(reading blocks forever), a device (``/dev/zero`` never ends), a file far larger than what it claims
to be, or a symbolic link that leads out of the directory it belongs to (a run's ``models/dense``
pointing at a system folder). Every reader here checks before it reads:

* the path opens as a **regular file** (opened non-blocking, then checked with ``fstat``: a FIFO or
  device is refused without a read);
* its size is at most a **cap** given by the caller, checked before the bytes are read;
* with ``within``, the path, **links resolved**, lies inside that directory.

Writers replace their target atomically (a temporary file in the same directory, then
``os.replace``), so a link placed where the output goes is replaced, never written through, and a
crash leaves the old file or the new one, never half of one.

Every refusal is an :class:`InputFileError` naming the path and the reason.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeAlias

from fedspine.errors import FedspineError

KIB = 1024
MIB = 1024 * KIB

TEXT_LIMIT = 64 * MIB
"""Default cap on a record or manifest read whole (``summary.json``, ``rounds.csv``, ``events.jsonl``
of a long run are a few MiB)."""
CONFIG_LIMIT = 4 * MIB
"""Cap on a config, sweep or profile file: hand-written TOML is a few KiB."""

JSON: TypeAlias = "dict[str, JSON] | list[JSON] | str | int | float | bool | None"
"""A JSON document: dict (str keys), list, str, int, float, bool and None. A value read from outside
is one of these, but of no known shape: narrow it (``isinstance``) before use."""


class InputFileError(FedspineError):
    """A file or directory given as input is not what it claims to be (not a regular file, too large,
    outside the directory it belongs to)."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def is_inside(path: Path | str, root: Path | str) -> bool:
    """Whether ``path``, every link resolved, is ``root`` or lies below it (``root`` resolved too)."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, real_root]) == real_root


def check_inside(path: Path | str, root: Path | str) -> None:
    """Refuse ``path`` if, its links resolved, it leaves ``root``."""
    if not is_inside(path, root):
        raise InputFileError(path, f"leads outside {root} (a symbolic link?); nothing is read through it")


def read_bytes(path: Path | str, limit: int = TEXT_LIMIT, within: Path | str | None = None) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them.

    Raises:
        InputFileError: missing, not a regular file, over ``limit`` bytes, unreadable, or (with
            ``within``) outside that directory.
    """
    if within is not None:
        check_inside(path, within)
    fd = _open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise InputFileError(path, f"is {size} bytes, over the {_size(limit)} allowed for its kind")
        chunks, total = [], 0
        while chunk := os.read(fd, min(MIB, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:  # it grew while being read
                raise InputFileError(path, f"grew past {_size(limit)} while being read")
        return b"".join(chunks)
    except OSError as error:
        raise InputFileError(path, f"cannot be read ({error.strerror or error})") from error
    finally:
        os.close(fd)


def read_text(path: Path | str, limit: int = TEXT_LIMIT, within: Path | str | None = None) -> str:
    """:func:`read_bytes` decoded as UTF-8 (a leading byte-order mark dropped).

    Raises:
        InputFileError: as :func:`read_bytes`, or the bytes are not UTF-8 text.
    """
    data = read_bytes(path, limit, within)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputFileError(path, f"is not UTF-8 text (byte {error.start})") from error


def parse_json(text: str) -> JSON:
    """``text`` parsed as strict JSON: no ``NaN`` or ``Infinity``, no number beyond a float's range
    (``1e400``), no nesting too deep to parse. fedspine never writes any of these.

    Raises:
        ValueError: saying what is wrong (a :class:`json.JSONDecodeError` gives the line and column).
    """
    try:
        value: JSON = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
        return value
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):
        raise ValueError(f"the number {text[:40]} is beyond a float's range")
    return value


def _open_regular(path: Path | str) -> int:
    """A read-only descriptor of ``path``, which must be a regular file. Opened non-blocking, so a
    FIFO with no writer opens at once (and is then refused) instead of blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as error:
        raise InputFileError(path, "file not found") from error
    except IsADirectoryError as error:
        raise InputFileError(path, "is a directory, not a file") from error
    except OSError as error:
        raise InputFileError(path, f"cannot be opened ({error.strerror or error})") from error
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO, device or socket"
        raise InputFileError(path, f"is {kind}, not a regular file")
    os.set_blocking(fd, True)
    return fd


def check_tree(source: Path | str, within: Path | str) -> None:
    """Refuse a directory tree to be copied out of ``within`` if it, or anything in it, is a link that
    leaves ``within``, or is neither a regular file, a directory nor a link to one inside.

    Raises:
        InputFileError: naming the first offending entry.
    """
    check_inside(source, within)
    if not os.path.isdir(source):
        raise InputFileError(source, "is not a directory")
    for top, dirs, files in os.walk(source, followlinks=False):
        for name in [*dirs, *files]:
            entry = os.path.join(top, name)
            check_inside(entry, within)
            mode = os.stat(entry).st_mode  # the link's target: inside ``within``, checked above
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise InputFileError(entry, "is a FIFO, device or socket, not a regular file")
            if os.path.islink(entry) and stat.S_ISDIR(mode):
                check_tree(entry, within)  # os.walk does not descend into linked directories


def copy_tree(source: Path | str, target: Path | str, within: Path | str) -> None:
    """Copy the directory ``source`` (which must lie in ``within``, see :func:`check_tree`) to
    ``target``, links inside ``within`` copied as the files they point to. Everything is checked
    before anything is written."""
    check_tree(source, within)
    shutil.copytree(source, target, symlinks=False, dirs_exist_ok=True)


def check_own_directory(directory: Path | str, root: Path | str) -> None:
    """Refuse ``directory`` (under ``root``) if it is a symbolic link or not a directory: output written
    into it would land elsewhere. A missing one is fine (the writer creates it)."""
    path = Path(directory)
    if path.is_symlink():
        raise InputFileError(path, f"is a symbolic link; files of {root} are written only inside it")
    if path.exists() and not path.is_dir():
        raise InputFileError(path, "exists and is not a directory")


def write_atomic(path: Path | str, write: Callable[[Path], object]) -> None:
    """Write ``path`` through ``write(temporary_path)``, then rename it over ``path``: a link at
    ``path`` is replaced, never followed, and a reader sees the old file or the whole new one. The
    temporary file is created exclusively (never through a planted link) with the mode a plain write
    would give (the umask's)."""
    target = Path(path)
    tmp = target.with_name(f".{target.stem}.{secrets.token_hex(6)}.partial{target.suffix}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666))
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path | str, text: str) -> None:
    """:func:`write_atomic` for UTF-8 text."""
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _size(limit: int) -> str:
    return f"{limit // MIB} MiB" if limit >= MIB else f"{limit} bytes"


__all__ = [
    "CONFIG_LIMIT",
    "JSON",
    "TEXT_LIMIT",
    "InputFileError",
    "check_inside",
    "check_own_directory",
    "check_tree",
    "copy_tree",
    "is_inside",
    "parse_json",
    "read_bytes",
    "read_text",
    "write_atomic",
    "write_text_atomic",
]
