"""A scripted snrmesh agent: the control API of docs/agent.md over a real Unix socket.

The TUI is tested against this instead of the real agent (issue 5 allows it).
It speaks every op and event of the API with in-memory state: one mate in
each link state (direct, relayed via gs-1, offline, refused), a group,
history with pending, delivered and read messages, and two alerts. Tests
drive it (:meth:`FakeAgent.incoming`, :meth:`FakeAgent.receipt`, ...), read
what the TUI asked (:attr:`FakeAgent.requests`) and stop/start it to test
reconnection. Every timestamp derives from ``now`` so screenshots are stable.

By hand, with a live clock and an agent that delivers, reads and answers::

    python tests/tui/fake_agent.py /tmp/agent.sock
    snrmesh tui --control /tmp/agent.sock        # in another terminal
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["FIXED_NOW", "MAX_LINE_BYTES", "AgentThread", "FakeAgent"]

MAX_LINE_BYTES = 64 * 1024
MAX_TEXT_CHARS = 4000
FIXED_NOW = 1796118450.0  # 2026-12-01T09:47:30Z, 3h47m30s into mission op-dawn
MISSION_START = 1796104800.0  # 2026-12-01T06:00:00Z
EPOCH_SECONDS = 6 * 3600
IDENTITY = "alpha-1"

Json = dict[str, Any]
T = TypeVar("T")


class BadRequest(Exception):
    """A request the real agent would answer with an error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class FakeAgent:
    """An in-memory agent listening on ``path``; ``now`` is the moment its data describes."""

    def __init__(
        self,
        path: str | Path,
        *,
        now: float = FIXED_NOW,
        clock: Callable[[], float] | None = None,
        live: bool = False,
    ) -> None:
        self.path = Path(path)
        self.now = now
        self.clock = clock or (lambda: self.now)
        self.live = live
        self.requests: list[Json] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._serving: set[asyncio.Task[Any]] = set()
        self._subscribers: set[asyncio.StreamWriter] = set()
        self._next_message = 0x1000
        self._next_alert = 1
        self._tasks: set[asyncio.Task[None]] = set()
        self.peers: dict[str, Json] = {}
        self.groups: dict[str, list[str]] = {}
        self.messages: list[Json] = []
        self.alerts: list[Json] = []
        self.mission_start = now - (FIXED_NOW - MISSION_START)
        self.epoch_index = int((now - self.mission_start) // EPOCH_SECONDS)
        self._seed()

    # -- data -------------------------------------------------------------------------------

    def _epoch(self) -> Json:
        start = self.mission_start + self.epoch_index * EPOCH_SECONDS
        return {"index": self.epoch_index, "start": start, "end": start + EPOCH_SECONDS}

    def _seed(self) -> None:
        now = self.now
        epoch_end = self._epoch()["end"]

        def peer(identity: str, role: str, state: str, **fields: Any) -> None:
            self.peers[identity] = {
                "identity": identity,
                "role": role,
                "state": state,
                "via": None,
                "last_seen": None,
                "position": None,
                "battery": None,
                "text": None,
                "ck_expires": None,
                "refused_reason": None,
                **fields,
            }

        peer(
            "gs-1",
            "ground-station",
            "direct",
            last_seen=now - 4,
            position=[48.8566, 2.3522, 41.0],
            battery=100,
            ck_expires=epoch_end,
            text="ops desk",
        )
        peer(
            "uav-1",
            "uav",
            "relayed",
            via="gs-1",
            last_seen=now - 12,
            position=[48.8702, 2.331, 420.0],
            battery=47,
            ck_expires=now + 540,
            text="orbit B",
        )
        peer(
            "alpha-2",
            "soldier",
            "offline",
            last_seen=now - 1260,
            position=[48.8571, 2.3525, 35.0],
            battery=64,
            ck_expires=epoch_end,
        )
        peer(
            "bravo-9",
            "soldier",
            "refused",
            last_seen=now - 95,
            refused_reason="no keyset for this pair (possible man-in-the-middle or stranger)",
        )
        self.groups = {"squad": [IDENTITY, "alpha-2", "gs-1"]}

        def msg(
            minutes_ago: float,
            direction: str,
            peer_id: str,
            text: str,
            *,
            group: str | None = None,
            state: str = "delivered",
            read: bool = True,
        ) -> None:
            self._add_message(
                direction,
                peer_id,
                text,
                group=group,
                state=state,
                read=read,
                at=now - minutes_ago * 60,
            )

        msg(42, "in", "gs-1", "Rally at checkpoint C, 1000Z.")
        msg(41, "out", "gs-1", "Copy, moving.", state="read")
        msg(37.5, "in", "gs-1", "Radio check.", group="squad")
        msg(37, "out", "", "Loud and clear.", group="squad", state="delivered")
        msg(36, "in", "alpha-2", "Same here, five by five.", group="squad", read=False)
        msg(27, "out", "alpha-2", "Where are you?", state="pending")
        msg(17, "in", "uav-1", "Orbit B established, 420 m.", read=False)
        msg(16, "out", "uav-1", "Hold orbit, report movement.", state="delivered")
        msg(7, "in", "gs-1", "Bridge clear?", read=False)
        self._add_alert(
            "refused",
            "bravo-9",
            "handshake refused: bravo-9 holds no keyset for this pair "
            "(possible man-in-the-middle or stranger)",
            at=now - 150,
        )
        self._add_alert(
            "expiring",
            "uav-1",
            "keyset with uav-1 expires in 9 min; no successor issued",
            at=now - 60,
        )

    def _add_message(
        self,
        direction: str,
        peer: str,
        text: str,
        *,
        group: str | None,
        state: str,
        read: bool,
        at: float,
    ) -> Json:
        message = {
            "id": f"{self._next_message:016x}",
            "direction": direction,
            "peer": peer,
            "group": group,
            "text": text,
            "at": at,
            "state": state,
            "read": read,
        }
        self._next_message += 1
        self.messages.append(message)
        return message

    def _add_alert(self, kind: str, peer: str | None, message: str, *, at: float) -> Json:
        alert = {
            "alert_id": self._next_alert,
            "at": at,
            "kind": kind,
            "peer": peer,
            "message": message,
        }
        self._next_alert += 1
        self.alerts.append(alert)
        return alert

    def message(self, message_id: str) -> Json:
        return next(m for m in self.messages if m["id"] == message_id)

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self.path), limit=MAX_LINE_BYTES
        )
        self.path.chmod(0o600)
        if self.live:
            self._spawn(self._heartbeats())

    async def stop(self) -> None:
        """Stop like a killed agent: close every connection and remove the socket."""
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        await asyncio.gather(*self._serving, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        self._writers.clear()
        self._subscribers.clear()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def __aenter__(self) -> FakeAgent:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- what tests drive -------------------------------------------------------------------

    async def push(self, event: Json) -> None:
        """Send one event line to every subscribed connection."""
        line = (json.dumps(event) + "\n").encode()
        for writer in list(self._subscribers):
            writer.write(line)
            with contextlib.suppress(ConnectionError):
                await writer.drain()

    async def update_peer(self, identity: str, **fields: Any) -> Json:
        self.peers[identity].update(fields)
        await self.push({"event": "peer", "peer": self.peers[identity]})
        return self.peers[identity]

    async def incoming(self, peer: str, text: str, *, group: str | None = None) -> Json:
        message = self._add_message(
            "in", peer, text, group=group, state="delivered", read=False, at=self.clock()
        )
        await self.push({"event": "message", "message": message})
        return message

    async def receipt(self, message_id: str, state: str, *, peer: str | None = None) -> None:
        message = self.message(message_id)
        message["state"] = state
        await self.push(
            {
                "event": "receipt",
                "message_id": message_id,
                "peer": peer or message["peer"],
                "state": state,
            }
        )

    async def raise_alert(self, kind: str, peer: str | None, text: str) -> Json:
        alert = self._add_alert(kind, peer, text, at=self.clock())
        await self.push({"event": "alert", "alert": alert})
        return alert

    async def lag(self) -> None:
        """Tell subscribers events were dropped (the real agent's ``lagged`` event)."""
        await self.push({"event": "lagged"})

    async def next_epoch(self) -> None:
        self.epoch_index += 1
        await self.push({"event": "epoch", "epoch": self._epoch()})

    async def wait_for_request(self, op: str, timeout: float = 3.0, **match: Any) -> Json:
        """The first request with ``op`` (and the given arguments) the agent has received."""
        async with asyncio.timeout(timeout):
            while True:
                for request in self.requests:
                    if request.get("op") == op and all(
                        request.get(k) == v for k, v in match.items()
                    ):
                        return request
                await asyncio.sleep(0.01)

    # -- the protocol -----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                except asyncio.LimitOverrunError:
                    await self._write(writer, _error(None, "bad-request", "line over 64 KiB"))
                    return
                response = self._answer(line, writer)
                await self._write(writer, response)
        finally:
            self._writers.discard(writer)
            self._subscribers.discard(writer)
            writer.close()

    async def _write(self, writer: asyncio.StreamWriter, obj: Json) -> None:
        writer.write((json.dumps(obj) + "\n").encode())
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    def _answer(self, line: bytes, writer: asyncio.StreamWriter) -> Json:
        try:
            request = json.loads(line)
        except ValueError:
            return _error(None, "bad-request", "not JSON")
        if not isinstance(request, dict) or not isinstance(request.get("id"), int):
            return _error(None, "bad-request", "a request is an object with an integer id")
        self.requests.append(request)
        request_id = request["id"]
        handler = getattr(self, f"_op_{request.get('op')}", None)
        if handler is None:
            return _error(request_id, "bad-request", f"unknown op {request.get('op')!r}")
        try:
            result = handler(request, writer)
        except BadRequest as exc:
            return _error(request_id, exc.code, str(exc))
        return {"id": request_id, "ok": True, "result": result}

    def _op_hello(self, request: Json, writer: asyncio.StreamWriter) -> Json:
        links = sum(1 for p in self.peers.values() if p["state"] == "direct")
        return {
            "identity": IDENTITY,
            "role": "soldier",
            "mission": {
                "name": "op-dawn",
                "id": "6f702d6461776e21",
                "start": self.mission_start,
                "end": self.mission_start + 24 * 3600,
                "epoch_seconds": EPOCH_SECONDS,
            },
            "epoch": self._epoch(),
            "token": {"state": "ok", "message": "software token alpha-1.token"},
            "listen": "127.0.0.1:47000",
            "links": links,
            "version": "0.1.0",
        }

    def _op_peers(self, request: Json, writer: asyncio.StreamWriter) -> Json:
        return {"peers": [self.peers[k] for k in sorted(self.peers)]}

    def _op_groups(self, request: Json, writer: asyncio.StreamWriter) -> Json:
        return {"groups": self.groups}

    def _conversation(self, request: Json, *, required: bool) -> tuple[str | None, str | None]:
        peer, group = request.get("peer"), request.get("group")
        if peer is not None and group is not None:
            raise BadRequest("bad-request", "give 'peer' or 'group', not both")
        if required and peer is None and group is None:
            raise BadRequest("bad-request", "'peer' or 'group' is required")
        if peer is not None and (not isinstance(peer, str) or peer not in self.peers):
            raise BadRequest("unknown-peer", f"no dialogue mate named {peer}")
        if group is not None and (not isinstance(group, str) or group not in self.groups):
            raise BadRequest("unknown-group", f"no group named {group}")
        return peer, group

    def _in_conversation(self, message: Json, peer: str | None, group: str | None) -> bool:
        if group is not None:
            return bool(message["group"] == group)
        if peer is not None:
            return message["group"] is None and message["peer"] == peer
        return True

    def _op_history(self, request: Json, writer: asyncio.StreamWriter) -> Json:
        try:
            peer, group = self._conversation(request, required=False)
        except BadRequest as exc:  # as the real agent: a former mate's history stays readable
            peer, group = request.get("peer"), request.get("group")
            named = all(v is None or isinstance(v, str) for v in (peer, group))
            if (
                exc.code == "bad-request"
                or not named
                or not any(self._in_conversation(m, peer, group) for m in self.messages)
            ):
                raise
        limit = request.get("limit", 200)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise BadRequest("bad-request", "'limit' must be a positive integer")
        found = [m for m in self.messages if self._in_conversation(m, peer, group)]
        return {"messages": sorted(found, key=lambda m: m["at"])[-limit:]}

    def _op_send(self, request: Json, writer: asyncio.StreamWriter) -> Json:
        to, group, text = request.get("to"), request.get("group"), request.get("text")
        if not isinstance(text, str) or (to is None) == (group is None):
            raise BadRequest("bad-request", "send takes 'text' and one of 'to' or 'group'")
        if len(text) > MAX_TEXT_CHARS:
            raise BadRequest("too-large", f"text is {len(text)} characters; limit 4000")
        if to is not None and to not in self.peers:
            raise BadRequest("unknown-peer", f"no dialogue mate named {to}")
        if group is not None and group not in self.groups:
            raise BadRequest("unknown-group", f"no group named {group}")
        # Like the real agent: a message to a group has no single recipient, so "peer" is "".
        message = self._add_message(
            "out", to or "", text, group=group, state="pending", read=False, at=self.clock()
        )
        self._spawn(self.push({"event": "message", "message": message}))
        if self.live:
            self._spawn(self._deliver_later(message))
        return {"message_id": message["id"], "state": "pending"}

    def _op_mark_read(self, request: Json, writer: asyncio.StreamWriter) -> Json:
        peer, group = self._conversation(request, required=True)
        marked = 0
        for message in self.messages:
            if (
                message["direction"] == "in"
                and not message["read"]
                and self._in_conversation(message, peer, group)
            ):
                message["read"] = True
                marked += 1
        return {"marked": marked}

    def _op_alerts(self, request: Json, writer: asyncio.StreamWriter) -> Json:
        return {"alerts": list(self.alerts)}

    def _op_dismiss_alert(self, request: Json, writer: asyncio.StreamWriter) -> Json:
        alert_id = request.get("alert_id")
        if not isinstance(alert_id, int) or isinstance(alert_id, bool):
            raise BadRequest("bad-request", "'alert_id' must be an integer")
        if not any(a["alert_id"] == alert_id for a in self.alerts):
            raise BadRequest("bad-request", f"no alert {alert_id}")
        self.alerts = [a for a in self.alerts if a["alert_id"] != alert_id]
        return {}

    def _op_set_status(self, request: Json, writer: asyncio.StreamWriter) -> Json:
        text, position, battery = (
            request.get("text"),
            request.get("position"),
            request.get("battery"),
        )
        if text is not None and not isinstance(text, str):
            raise BadRequest("bad-request", "'text' must be a string")
        if position is not None and not (
            isinstance(position, list)
            and len(position) == 3
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in position)
        ):
            raise BadRequest("bad-request", "'position' must be [lat, lon, alt]")
        if battery is not None and not (
            isinstance(battery, int | float)
            and not isinstance(battery, bool)
            and 0 <= battery <= 100
        ):
            raise BadRequest("bad-request", "'battery' must be 0..100")
        return {}

    def _op_subscribe(self, request: Json, writer: asyncio.StreamWriter) -> Json:
        self._subscribers.add(writer)
        return {"subscribed": True}

    # -- live mode (by hand) ----------------------------------------------------------------

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver_later(self, message: Json) -> None:
        recipients = (
            self.groups.get(message["group"], []) if message["group"] else [message["peer"]]
        )
        reachable = [
            r for r in recipients if self.peers.get(r, {}).get("state") in ("direct", "relayed")
        ]
        if not reachable:
            return  # stays pending, as the real agent queues for an offline mate
        await asyncio.sleep(0.8)
        await self.receipt(message["id"], "delivered", peer=reachable[0])
        await asyncio.sleep(2.0)
        await self.receipt(message["id"], "read", peer=reachable[0])
        if message["group"] is None and message["peer"] == "gs-1":
            await asyncio.sleep(1.0)
            await self.incoming("gs-1", f"Copy: {message['text'][:40]}")

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(3.0)
            for identity, peer in self.peers.items():
                if peer["state"] in ("direct", "relayed"):
                    await self.update_peer(identity, last_seen=self.clock())


class AgentThread:
    """Runs a :class:`FakeAgent` on its own loop in a thread, for tests whose app owns the loop.

    Snapshot tests call ``App.run()``, which starts its own event loop; the fake agent lives
    beside it here and is stopped (and the thread joined) on exit.
    """

    def __init__(self, agent: FakeAgent) -> None:
        self.agent = agent
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fake-agent", daemon=True
        )

    def __enter__(self) -> AgentThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.agent.start(), self._loop).result(timeout=5)
        return self

    async def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the agent's loop and wait for it from another loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self._loop))

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self.agent.stop(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


def _error(request_id: int | None, code: str, message: str) -> Json:
    return {"id": request_id, "ok": False, "error": {"code": code, "message": message}}


@contextlib.contextmanager
def _socket_removed(path: Path) -> Iterator[None]:
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the scripted agent for the TUI by hand.")
    parser.add_argument("socket", type=Path, help="Unix socket path to listen on")
    parser.add_argument(
        "--fixed",
        action="store_true",
        help="freeze time at the tests' fixed moment instead of a live clock",
    )
    args = parser.parse_args()

    async def run() -> None:
        if args.fixed:
            agent = FakeAgent(args.socket)
        else:
            agent = FakeAgent(args.socket, now=time.time(), clock=time.time, live=True)
        async with agent:
            print(f"fake agent listening on {args.socket} (Ctrl-C to stop)", flush=True)
            await asyncio.Event().wait()

    with _socket_removed(args.socket), contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
