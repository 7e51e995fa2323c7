"""A node's warm worker: one long-lived process that keeps the run's model built across messages.

Flower starts a fresh ClientApp process for every message; importing torch, transformers and peft
and building the model there costs seconds per task. A node can instead run ``fedspine deploy worker
--socket PATH`` beside its SuperNode and name the socket in its node config (``worker="PATH"``): the
ClientApp process then imports only Flower and this module, hands the message's content and context
to the worker over the Unix socket, and returns its reply. The worker answers with the same code
(:func:`fedspine.deploy.client.answer`), so replies are those of an in-process ClientApp; the node's
persistent ``context.state`` travels with each request and back.

The socket is created with mode 0600, and a connection must prove it knows the worker's key (an
HMAC challenge, :mod:`multiprocessing.connection`), read from ``PATH.key`` (0600, written by the
worker at start) before any request is unpickled. The worker serves one request at a time, as a
node runs one task at a time.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import threading
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener
from pathlib import Path

from flwr.app import Context, RecordDict
from flwr.common.serde import context_from_proto, context_to_proto, recorddict_from_proto, recorddict_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedspine.errors import ConfigError, DeployError

log = logging.getLogger("fedspine.deploy")

KEY_SUFFIX = ".key"
KEY_BYTES = 32
SOCKET_PATH_LIMIT = 107
"""The longest path a Unix socket may have (``sun_path`` holds 108 bytes with the closing NUL)."""


def key_path(socket: Path) -> Path:
    """The file holding the worker's key, beside its socket."""
    return socket.with_name(socket.name + KEY_SUFFIX)


def check_socket_path(socket: Path) -> None:
    """Refuse a ``--socket`` the worker cannot listen on, or whose files would replace something else:
    its folder must exist; nothing may be at the path (a socket left by a worker that did not stop
    cleanly is named as such); a file at ``PATH.key`` must be a key a worker wrote (a regular file of
    :data:`KEY_BYTES` bytes), which is then replaced."""
    if len(os.fsencode(socket)) > SOCKET_PATH_LIMIT or not socket.name:
        raise ConfigError("--socket", f"{socket}: a Unix socket path has 1..{SOCKET_PATH_LIMIT} bytes")
    if not socket.parent.is_dir():
        raise ConfigError("--socket", f"{socket}: its folder {socket.parent} does not exist")
    if socket.is_symlink() or socket.exists():
        if stat.S_ISSOCK(socket.lstat().st_mode):
            raise DeployError(
                f"{socket} exists: a worker that did not stop cleanly? remove it, or choose another"
            )
        raise ConfigError("--socket", f"{socket} exists and is not a socket; choose another path")
    keyfile = key_path(socket)
    if keyfile.is_symlink() or keyfile.exists():
        info = keyfile.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_size != KEY_BYTES:
            raise ConfigError("--socket", f"{keyfile} exists and is not a worker's key; choose another path")


def call(socket: str, kind: str, content: RecordDict, context: Context) -> RecordDict:
    """The worker's reply to a ``kind`` message; ``context.state`` takes the worker's updated state.

    Raises:
        DeployError: the worker cannot be reached, or its handling failed (the message says why).
    """
    path = Path(socket)
    try:
        key = key_path(path).read_bytes()
        with Client(str(path), family="AF_UNIX", authkey=key) as conn:
            conn.send_bytes(kind.encode())
            conn.send_bytes(recorddict_to_proto(content).SerializeToString())
            conn.send_bytes(context_to_proto(context).SerializeToString())
            status = conn.recv_bytes().decode()
            if status != "ok":
                raise DeployError(f"the node's worker failed: {conn.recv_bytes().decode(errors='replace')}")
            reply = recorddict_from_proto(ProtoRecordDict.FromString(conn.recv_bytes()))
            state = recorddict_from_proto(ProtoRecordDict.FromString(conn.recv_bytes()))
    except (OSError, EOFError) as exc:
        raise DeployError(f"the node's worker at {path} cannot be reached: {exc}") from None
    for name in list(context.state.keys()):
        del context.state[name]
    for name, record in state.items():
        context.state[name] = record
    return reply


class Worker:
    """Serves requests on a Unix socket until :meth:`stop`; see the module docstring."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.handled = 0
        """Requests answered so far."""
        self._stopping = threading.Event()
        check_socket_path(socket)
        key = secrets.token_bytes(KEY_BYTES)
        keyfile = key_path(socket)
        keyfile.unlink(missing_ok=True)  # a stale key of this worker's kind (check_socket_path)
        old, written = os.umask(0o177), False  # the socket file: this user only
        try:
            fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            written = True
            with open(fd, "wb") as f:
                f.write(key)
            self.listener = Listener(str(socket), family="AF_UNIX", authkey=key)
        except OSError as exc:  # an unwritable folder, a race with another worker
            if written:
                keyfile.unlink(missing_ok=True)
            raise DeployError(f"cannot listen on {socket}: {exc.strerror or exc}") from None
        finally:
            os.umask(old)

    def serve(self) -> None:
        """Answer requests until :meth:`stop` is called."""
        from fedspine.deploy.client import answer  # the heavy imports, once, in this process

        try:
            while not self._stopping.is_set():
                try:
                    conn = self.listener.accept()
                except (OSError, EOFError, AuthenticationError) as exc:  # a client without the key
                    if not self._stopping.is_set():
                        log.warning("worker: refused a connection (%s)", exc)
                    continue
                if self._stopping.is_set():
                    conn.close()
                    break
                with conn:
                    try:
                        kind = conn.recv_bytes().decode()
                        content = recorddict_from_proto(ProtoRecordDict.FromString(conn.recv_bytes()))
                        context = context_from_proto(ProtoContext.FromString(conn.recv_bytes()))
                        reply = answer(kind, content, context)
                        parts = [
                            b"ok",
                            *(recorddict_to_proto(r).SerializeToString() for r in (reply, context.state)),
                        ]
                    except Exception as exc:  # reported to the ClientApp, which fails its message
                        log.exception("worker: request failed")
                        parts = [b"error", f"{type(exc).__name__}: {exc}".encode()]
                    try:
                        for part in parts:
                            conn.send_bytes(part)
                    except OSError as exc:
                        log.warning("worker: the ClientApp left before its reply (%s)", exc)
                    self.handled += 1
        finally:
            self.close()

    def stop(self) -> None:
        """Stop serving (from another thread): the listener is closed and the socket removed."""
        self._stopping.set()
        try:  # wake the blocking accept()
            with Client(str(self.socket), family="AF_UNIX", authkey=key_path(self.socket).read_bytes()):
                pass
        except (OSError, EOFError):
            pass

    def close(self) -> None:
        self.listener.close()
        self.socket.unlink(missing_ok=True)
        key_path(self.socket).unlink(missing_ok=True)


__all__ = ["Worker", "call", "check_socket_path", "key_path"]
