"""Pushed task updates between worker processes (`serve --transport http --workers N`).

PiAPI delivers a task's webhook to whichever worker the kernel hands the connection, while the
call waiting for that task may be in another one. `push.TaskEvents` wakes waiters of its own
process only; a `Relay` carries each published record to the other workers sharing the ledger,
where it is published again (without relaying it further), so the waiting call wakes at once
and takes the record from its `Subscription` without a GET. Nothing polls: each worker binds a
unix datagram socket and sleeps until the kernel says one is readable.

- **Where.** One socket per worker, named `<pid>-<random>`, in `relay/` beside the ledger (mode
  0700; the sockets 0600): only this user's processes can send here, the same boundary as the
  ledger the record would otherwise be read from. A path too long for `AF_UNIX` (107 bytes on
  Linux, 103 elsewhere) moves the directory under the temp dir, named by a hash of the ledger's
  directory; a directory we do not own, or one open to others, disables the relay with a warning.
- **Sending** starts in the publishing call (a listener of `TaskEvents`), on a non-blocking socket
  connected to each peer, so it never blocks. A peer's queue holds only a few datagrams (Linux:
  `net.unix.max_dgram_qlen`, 10 by default), so what it has no room for waits in a per-peer
  backlog (at most `MAX_BACKLOG_BYTES`) that a task sends as soon as the kernel reports room; a
  peer that takes nothing for `DRAIN_SECONDS` loses its backlog. A peer whose socket refuses
  (its process is gone) has its file removed.
- **Receiving** takes datagrams of at most `MAX_DATAGRAM` bytes that parse as a `TaskRecord`
  with a valid task id, and publishes only records some call in this process waits for (a waiter
  exists only for a task in our ledger); anything else is dropped with a log line.
- **Off** where unix datagram sockets do not exist (Windows): waiting calls then finish at their
  safety-net poll, as before.

A dropped update is never lost work: the waiting call's safety-net poll still finishes it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import socket
import stat
import sys
import tempfile
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from pydantic import ValidationError

from flux_mcp.push import TaskEvents
from flux_mcp.record import TaskRecord, is_valid_task_id

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

log = logging.getLogger(__name__)

MAX_DATAGRAM = 64 * 1024  # a record is ~1 KB; room for a batch of long signed URLs
MAX_SOCKET_PATH = 107 if sys.platform.startswith("linux") else 103  # sun_path, less its NUL
RELAY_DIR = "relay"
MAX_BACKLOG_BYTES = 1024 * 1024  # per peer: updates waiting for room in its queue
DRAIN_SECONDS = 5.0  # a peer that takes nothing for this long is stuck: its backlog is dropped
_SOCKET_NAME = re.compile(r"[0-9]{1,10}-[0-9a-f]{8}")
_BATCH = 64  # datagrams read per wake-up before giving others a turn


def relay_directory(state_dir: Path) -> Path | None:
    """`relay/` beside the ledger, or a short one under the temp dir when socket paths there would
    be too long for AF_UNIX; None when even that is too long."""
    longest_name = len(f"{2**22}-{'0' * 8}")
    for directory in (state_dir / RELAY_DIR, _short_directory(state_dir)):
        if len(os.fsencode(directory)) + 1 + longest_name <= MAX_SOCKET_PATH:
            return directory
    return None


def _short_directory(state_dir: Path) -> Path:
    key = hashlib.sha256(os.fsencode(state_dir.resolve())).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"piapi-flux-mcp-{key}"


def _private_directory(directory: Path) -> bool:
    """Make `directory` (0700) or check that an existing one is ours and closed to others."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(directory)
    except OSError as exc:
        log.warning("worker relay off: cannot make %s (%s)", directory, exc.strerror or exc)
        return False
    if not stat.S_ISDIR(info.st_mode) or (hasattr(os, "getuid") and info.st_uid != os.getuid()):
        log.warning("worker relay off: %s is not a directory of this user", directory)
        return False
    if info.st_mode & 0o077:  # whoever could write there could have planted a socket of theirs
        log.warning("worker relay off: %s is open to other users (want mode 0700)", directory)
        return False
    return True


def _remove_dead(peer: Path) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(peer).st_mode):  # a socket nobody listens on: its worker is gone
            peer.unlink()
            log.info("worker relay: removed %s (its process is gone)", peer.name)
    except OSError:
        pass


def _widen_buffer(sock: socket.socket, option: int) -> None:
    try:  # macOS caps datagrams at 2 KB by default
        sock.setsockopt(socket.SOL_SOCKET, option, 4 * MAX_DATAGRAM)
    except OSError:
        pass


@dataclass(eq=False)
class _Peer:
    """Another worker's socket, as we send to it: connected, so the kernel can tell us when it has
    room again, and the updates it had no room for yet (bounded)."""

    path: Path
    sock: socket.socket
    backlog: deque[bytes] = field(default_factory=deque)
    queued: int = 0  # bytes in the backlog
    draining: bool = False
    closed: bool = False


class Relay:
    """Forward `events`' published records to the other workers' relays, and publish theirs here.
    `running()` binds, serves and cleans up; while it is not running, nothing is sent."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path: Path | None = None  # our socket, while running
        self.drain_seconds = DRAIN_SECONDS
        self._sock: socket.socket | None = None
        self._events: TaskEvents | None = None
        self._peers: dict[str, _Peer] = {}
        self._tg: TaskGroup | None = None

    @classmethod
    def beside(cls, state_dir: Path) -> Relay | None:
        """The relay for the workers sharing the ledger in `state_dir`, or None (with a warning)
        when this platform or path cannot have one."""
        if not hasattr(socket, "AF_UNIX"):
            log.warning("worker relay off: no unix sockets here; waiting calls finish at their safety-net poll")
            return None
        directory = relay_directory(state_dir)
        if directory is None:
            log.warning("worker relay off: no socket path short enough for %s", state_dir)
            return None
        return cls(directory)

    @asynccontextmanager
    async def running(self, events: TaskEvents) -> AsyncIterator[None]:
        if not self._open():
            yield
            return
        self._events = events
        events.add_listener(self.send)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._receive)
                try:
                    yield
                finally:
                    tg.cancel_scope.cancel()
        finally:
            self._tg = None
            self._close()

    def _open(self) -> bool:
        if not _private_directory(self.directory):
            return False
        path = self.directory / f"{os.getpid()}-{secrets.token_hex(4)}"
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        except OSError as exc:  # AF_UNIX without datagrams (Windows)
            log.warning("worker relay off: no unix datagram sockets here (%s)", exc.strerror or exc)
            return False
        try:
            sock.setblocking(False)
            _widen_buffer(sock, socket.SO_RCVBUF)
            sock.bind(os.fspath(path))
            os.chmod(path, 0o600)
        except OSError as exc:
            sock.close()
            log.warning("worker relay off: cannot bind %s (%s)", path, exc.strerror or exc)
            return False
        self._sock, self.path = sock, path
        self._sweep()
        log.info("worker relay listening at %s", path)
        return True

    def _sweep(self) -> None:
        """Remove the sockets of workers killed without cleaning up (nobody answers on them)."""
        for name in os.listdir(self.directory):
            if _SOCKET_NAME.fullmatch(name) and self.path is not None and name != self.path.name:
                peer = self._connect(name)  # a dead one is removed on the way
                if peer is not None:
                    self._forget(peer)

    def _close(self) -> None:
        sock, path = self._sock, self.path
        self._sock = self.path = None
        for peer in list(self._peers.values()):
            self._forget(peer)
        if sock is not None:
            sock.close()
        if path is not None:
            try:
                path.unlink()
            except OSError:
                pass

    # --- out ---------------------------------------------------------------------------------------

    def send(self, record: TaskRecord) -> None:
        """Queue `record` for every other worker's socket and send what fits now; never blocks
        (a `TaskEvents` listener). What a peer has no room for waits in its backlog."""
        if self._sock is None or self.path is None:
            return
        data = record.model_dump_json(exclude_defaults=True).encode()
        if len(data) > MAX_DATAGRAM:
            log.warning("worker relay: task %s's update is too large to relay (%d bytes)", record.task_id, len(data))
            return
        try:
            names = {name for name in os.listdir(self.directory) if _SOCKET_NAME.fullmatch(name)}
        except OSError as exc:
            log.warning("worker relay: cannot list %s (%s)", self.directory, exc.strerror or exc)
            return
        names.discard(self.path.name)
        for name in set(self._peers) - names:  # its worker shut down and removed its socket
            self._forget(self._peers[name])
        for name in names:
            peer = self._peers.get(name) or self._connect(name)
            if peer is None:
                continue
            if peer.queued + len(data) > MAX_BACKLOG_BYTES:
                log.warning("worker relay: %s is far behind; task %s's update dropped", name, record.task_id)
                continue
            peer.backlog.append(data)
            peer.queued += len(data)
            if not peer.draining:
                self._flush(peer)
                if peer.backlog and not peer.closed and self._tg is not None:
                    peer.draining = True
                    self._tg.start_soon(self._drain, peer)

    def _connect(self, name: str) -> _Peer | None:
        path = self.directory / name
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            _widen_buffer(sock, socket.SO_SNDBUF)
            sock.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            _remove_dead(path)
            return None
        except OSError as exc:
            sock.close()
            log.warning("worker relay: cannot reach %s (%s)", name, exc.strerror or exc)
            return None
        peer = self._peers[name] = _Peer(path, sock)
        return peer

    def _flush(self, peer: _Peer) -> None:
        """Send the peer's backlog until it has no room (EAGAIN) or the backlog is empty."""
        while peer.backlog and not peer.closed:
            data = peer.backlog[0]
            try:
                peer.sock.send(data)
            except BlockingIOError:
                return
            except ConnectionRefusedError:  # its worker is gone
                self._forget(peer, dead=True)
                return
            except OSError as exc:
                log.warning("worker relay: sending to %s failed (%s)", peer.path.name, exc.strerror or exc)
            peer.backlog.popleft()
            peer.queued -= len(data)

    async def _drain(self, peer: _Peer) -> None:
        """Wait (without polling: the kernel wakes us) until the peer has room, and send again."""
        try:
            while peer.backlog and not peer.closed:
                with anyio.move_on_after(self.drain_seconds) as waited:
                    await anyio.wait_writable(peer.sock)
                if waited.cancelled_caught:
                    log.warning(
                        "worker relay: %s took nothing for %.0f s; %d updates dropped",
                        peer.path.name,
                        self.drain_seconds,
                        len(peer.backlog),
                    )
                    peer.backlog.clear()
                    peer.queued = 0
                    return
                self._flush(peer)
        except anyio.ClosedResourceError:
            pass
        finally:
            peer.draining = False
            if peer.closed:
                peer.sock.close()

    def _forget(self, peer: _Peer, *, dead: bool = False) -> None:
        self._peers.pop(peer.path.name, None)
        peer.closed = True
        peer.backlog.clear()
        if peer.draining:  # its drain task closes the socket on its way out
            anyio.notify_closing(peer.sock)
        else:
            peer.sock.close()
        if dead:
            _remove_dead(peer.path)

    # --- in ----------------------------------------------------------------------------------------

    async def _receive(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            await anyio.wait_readable(sock)
            for _ in range(_BATCH):
                try:
                    data = sock.recv(MAX_DATAGRAM + 1)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    log.warning("worker relay: receive failed (%s)", exc.strerror or exc)
                    break
                try:
                    self.deliver(data)
                except Exception:  # a bad datagram must never take the worker down
                    log.exception("worker relay: could not deliver a received update")

    def deliver(self, data: bytes) -> bool:
        """Publish one received datagram here (never relayed further); False when dropped."""
        if len(data) > MAX_DATAGRAM:
            log.warning("worker relay: dropped an oversized datagram (more than %d bytes)", MAX_DATAGRAM)
            return False
        try:
            record = TaskRecord.model_validate_json(data)
        except ValidationError:
            log.warning("worker relay: dropped a datagram that is not a task record (%d bytes)", len(data))
            return False
        times = (record.created_at, record.started_at, record.ended_at)
        if not is_valid_task_id(record.task_id) or any(t is not None and t.tzinfo is None for t in times):
            log.warning("worker relay: dropped an update with an invalid task id or time")
            return False
        events = self._events
        if events is None or not events.waiting(record.task_id):
            return False  # nobody here waits for it (its call is elsewhere, or already returned)
        events.publish(record, relay=False)
        log.info("worker relay: task %s woke a call waiting here", record.task_id)
        return True
