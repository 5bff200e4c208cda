"""The scheduler ↔ worker messages over ZeroMQ (pyzmq).

The scheduler binds one ROUTER socket (loopback by default) and every worker connects a DEALER socket to it (a
second one for its heartbeat thread). Messages are JSON objects with a ``type``; every message a worker sends
carries the run's random token, and the scheduler drops (and logs) any message that does not, so a stray
connection can neither register nor report steps.

Worker → scheduler: ``register`` (rank, pid), ``heartbeat`` (step), ``step`` (rank 0: the trajectory-log record
and the step's measurements), ``eval`` (rank 0), ``sync`` (rank 0: every worker has written the store back at
step S; reason snapshot / stop / end), ``error`` (a problem a restart cannot fix: bad config, NaN streak).
Scheduler → worker: ``welcome`` (or ``rejected``), ``stop`` (finish the current step, sync, exit),
``continue`` (the snapshot is written; go on, or exit after a stop/end sync).
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import time
from typing import Any

import zmq

log = logging.getLogger("zo2.control")

TOKEN_ENV = "ZO2_CONTROL_TOKEN"
ENDPOINT_ENV = "ZO2_CONTROL_ENDPOINT"


def new_token() -> str:
    """A random per-run token (128 bits)."""
    return secrets.token_hex(16)


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, allow_nan=True).encode()


MAX_MESSAGE_BYTES = 1 << 20
"""The largest message a worker sends (a step record with its q seeds and measurements, an error report) is a few
KB; ZeroMQ drops the connection of a peer that sends more than this before any of it is buffered."""
WARN_FIRST = 3
"""Rejected messages logged one by one; after these, one summary line a minute (any local process can connect)."""
WARN_EVERY_S = 60.0


def _decode(data: bytes) -> dict[str, Any] | None:
    """The message, or None for anything that is not a JSON object with a string ``type`` — whatever the decoder
    raises on (bad UTF-8, bad JSON, nesting deep enough to exhaust the recursion limit, ...)."""
    try:
        message = json.loads(data)
    except Exception:  # noqa: BLE001 (any decode failure is a rejected message, never a crash)
        return None
    return message if isinstance(message, dict) and isinstance(message.get("type"), str) else None


class SchedulerChannel:
    """The scheduler's ROUTER socket: receives authenticated worker messages, replies to one worker."""

    def __init__(self, bind: str, token: str):
        self.token = token
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        port = self.socket.bind_to_random_port(f"tcp://{bind}")
        self.endpoint = f"tcp://{bind}:{port}"
        self.rejected = 0
        """Messages dropped for a missing or wrong token (or not being JSON)."""
        self._unreported = 0  # rejections not logged yet (past WARN_FIRST)
        self._last_summary = time.monotonic()

    def receive(self, timeout_ms: int) -> tuple[bytes, dict[str, Any]] | None:
        """The next authenticated message as (sender identity, message), or None after ``timeout_ms``."""
        if not self.socket.poll(timeout_ms):
            return None
        frames = self.socket.recv_multipart()
        identity, payload = frames[0], frames[-1]
        message = _decode(payload)
        token = message.get("token") if message else None
        if not isinstance(token, str) or not hmac.compare_digest(token, self.token):
            self._reject("not JSON" if message is None else f"type {str(message.get('type'))[:40]!r}")
            self._send(identity, {"type": "rejected", "reason": "wrong token"})
            return None
        return identity, message

    def _reject(self, what: str) -> None:
        """Count a rejected message; log the first few, then a summary at most once a minute."""
        self.rejected += 1
        if self.rejected <= WARN_FIRST:
            log.warning("zo2 scheduler: rejected a message from an unknown connection (%s): it does not carry this "
                        "run's token%s", what, "; further rejections are counted and summarized"
                        if self.rejected == WARN_FIRST else "")
            return
        self._unreported += 1
        if time.monotonic() - self._last_summary >= WARN_EVERY_S:
            self._summarize()

    def _summarize(self) -> None:
        if self._unreported:
            log.warning("zo2 scheduler: rejected %d more messages from unknown connections (%d in all)",
                        self._unreported, self.rejected)
        self._unreported, self._last_summary = 0, time.monotonic()

    def send(self, identity: bytes, message: dict[str, Any]) -> None:
        self._send(identity, message)

    def _send(self, identity: bytes, message: dict[str, Any]) -> None:
        try:
            self.socket.send_multipart([identity, _encode(message)], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the peer is gone; its process state tells the scheduler what happened

    def close(self) -> None:
        self._summarize()
        self.socket.close(0)
        self.context.term()


class WorkerLink:
    """A worker's DEALER socket to its scheduler (one per thread: ZeroMQ sockets are not thread-safe)."""

    def __init__(self, endpoint: str, token: str, rank: int, context: zmq.Context | None = None):
        self.token, self.rank = token, rank
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 2000)  # a last message still leaves when the worker exits
        self.socket.connect(endpoint)

    def send(self, message: dict[str, Any]) -> None:
        self.socket.send(_encode({**message, "token": self.token, "rank": self.rank}))

    def receive(self, timeout_ms: int | None) -> dict[str, Any] | None:
        """The next message from the scheduler, or None after ``timeout_ms`` (None: wait forever)."""
        if timeout_ms is not None and not self.socket.poll(timeout_ms):
            return None
        return _decode(self.socket.recv())

    def close(self) -> None:
        self.socket.close()
