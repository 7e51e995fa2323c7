"""The one check every hostile-input case makes: the command exits 1 or 2 with one ``error:`` line
on stderr naming the problem, prints no traceback, and writes nothing (the watched folder is exactly
as it was, contents included)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner

from fedspine.cli import app as cli


@dataclass(frozen=True)
class Refusal:
    """What a refused command printed, and how it exited."""

    exit_code: int
    stderr: str
    output: str


def snapshot(root: Path) -> dict[str, tuple[str, str]]:
    """Every entry below ``root`` (links not followed): its kind and, for a file, a hash of its bytes;
    for a link, where it points."""
    entries: dict[str, tuple[str, str]] = {}
    for top, dirs, files in os.walk(root, followlinks=False):
        for name in [*dirs, *files]:
            path = os.path.join(top, name)
            relative = os.path.relpath(path, root)
            if os.path.islink(path):
                entries[relative] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                entries[relative] = ("dir", "")
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    entries[relative] = ("file", hashlib.sha256(f.read()).hexdigest())
            else:
                entries[relative] = ("special", "")
    return entries


def refuse(args: Sequence[str], watched: Path, *, names: str, input: str | None = None) -> Refusal:
    """Run the CLI with ``args``; assert the refusal (exit 1 or 2, one ``error:`` line on stderr that
    contains ``names``, no traceback, nothing under ``watched`` changed)."""
    before = snapshot(watched)
    result = CliRunner().invoke(cli, list(args), input=input)
    stderr, output = result.stderr, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{args}: raised {result.exception!r}\n{output}"
    )
    assert result.exit_code in (1, 2), f"{args}: exit {result.exit_code}\n{output}"
    assert "Traceback" not in output, output
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and stderr.count("error:") == 1, f"{args}: not one error line:\n{stderr}"
    flat = "".join(stderr.split())  # the console wraps long lines, even inside a path
    assert "".join(names.split()) in flat, f"{args}: the error does not name {names!r}:\n{stderr}"
    after = snapshot(watched)
    assert after == before, f"{args}: wrote {set(after.items()) ^ set(before.items())}"
    return Refusal(result.exit_code, stderr, output)
