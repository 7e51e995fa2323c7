"""Writing the report's and the comparison's files into a directory that may hold planted links.

Each file is replaced atomically (:func:`fedspine.files.write_atomic`): a link at its path is replaced,
never written through, and a reader sees the old file or the whole new one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from fedspine.errors import FedspineError
from fedspine.files import write_atomic


def write_output(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` (its directory created) through ``write(file)`` atomically; returns ``path``.

    Raises:
        FedspineError: the file cannot be written (naming it and why: a directory in its place, no
            permission, a full disk).
    """

    def fill(temporary: Path) -> None:
        with open(temporary, "wb") as file:
            write(file)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, fill)
    except OSError as error:
        raise FedspineError(f"{path}: cannot be written ({error.strerror or error})") from error
    return path


def write_output_text(path: Path, text: str) -> Path:
    """:func:`write_output` for UTF-8 text."""
    return write_output(path, lambda file: file.write(text.encode("utf-8")))


__all__ = ["write_output", "write_output_text"]
