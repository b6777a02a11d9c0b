"""An authenticated client that misuses its link: the AS bounds the work and never raises.

A token holder can send anything a session allows, in any order and in one
write: records behind the ANSWER, a fresh message 1 on a live link, requests
faster than its rate. Each case here was found by a review and failed before
its fix (the commit says which). Both stores (the ``store`` fixture).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import cbor2

from mesh.token import Slot, TokenError
from mesh.token.software import SoftwareToken
from provisioning.authserver.errors import Refusal
from provisioning.authserver.messages import MAX_RETRY_AFTER
from provisioning.authserver.meters import meter_identity, meter_token
from provisioning.authserver.protocol import (
    Authenticated,
    ClientSession,
    Granted,
    LinkFailed,
    Refused,
    ServerSession,
    ServerState,
)
from provisioning.authserver.server import AuthServer
from provisioning.authserver.store import KeyStateStore
from tests.authserver.conftest import (
    NOW,
    PIN,
    SEED,
    Site,
    make_service,
    request,
    run,
    transfer,
)


def _meter(n: int) -> Any:
    return meter_token(SEED, meter_identity("meter", n))


def _answer_flight(client: ClientSession, server: ServerSession) -> bytes:
    """HELLO -> START, message 1 -> message 2 + CHALLENGE; the client's third flight."""
    for _ in range(2):
        server.receive_data(client.data_to_send(), NOW)
        client.receive_data(server.data_to_send(), NOW)
    return client.data_to_send()  # key confirmation + ANSWER (+ REQUESTs)


def _close_record(client: ClientSession) -> bytes:
    connection = client._link.connection  # type: ignore[union-attr]
    connection.close(NOW)
    return bytes(connection.data_to_send())


def test_a_close_record_behind_the_answer_ends_the_link_without_raising(
    site: Site, store: KeyStateStore
) -> None:
    """The records before the CLOSE are not acted on: nothing could carry their answers."""
    for n, requests in ((13, []), (14, [request("gs-1")])):
        service = make_service(store, key_lifetime=1e9)
        client = ClientSession(_meter(n), requests)
        server = service.session("127.0.0.1", NOW)
        server.receive_data(_answer_flight(client, server) + _close_record(client), NOW)
        assert server.state is ServerState.CLOSED
        assert service.counters.get("keysets", 0) == 0


def test_over_loopback_a_close_record_behind_the_answer_is_no_fatal_error(
    site: Site, store: KeyStateStore
) -> None:
    """The same through ``AuthServer`` on 127.0.0.1: the loop reports no exception."""
    errors: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        server = AuthServer(make_service(store, key_lifetime=1e9))
        host, port = await server.start("127.0.0.1", 0)
        try:
            client = ClientSession(_meter(19), [])
            reader, writer = await asyncio.open_connection(host, port)
            out = client.data_to_send()  # HELLO
            for _ in range(2):  # -> START, then message 1 -> message 2 + CHALLENGE
                writer.write(out)
                await writer.drain()
                out = b""
                while not out:
                    client.receive_data(await reader.read(65536), NOW)
                    out = client.data_to_send()
            writer.write(out + _close_record(client))  # the ANSWER, then CLOSE
            await writer.drain()
            await asyncio.wait_for(reader.read(), 5)  # the AS closes
            writer.close()
        finally:
            await server.stop()

    asyncio.run(main())
    assert not errors, [f"{e.get('message')}: {e.get('exception')!r}" for e in errors]


def test_a_second_message_1_on_a_link_ends_it(site: Site, store: KeyStateStore) -> None:
    """Each message 1 costs the AS a key pair and a Diffie-Hellman that no admission counts.

    A link runs one handshake (``single_handshake``): a rekey from an
    authenticated client, or a repeated message 1 before its ANSWER, ends it.
    """
    service = make_service(store, key_lifetime=1e9)
    client = ClientSession(_meter(15), [])
    server = service.session("127.0.0.1", NOW)
    for _ in range(4):
        server.receive_data(client.data_to_send(), NOW)
        client.receive_data(server.data_to_send(), NOW)
    assert server.state is ServerState.SERVING and client.finished
    connection = client._link.connection  # type: ignore[union-attr]
    connection._start_rekey(NOW + 1)  # a fresh message 1 on the live link
    server.receive_data(connection.data_to_send(), NOW + 1)
    assert server.closed
    assert service.counters["link_failed"] == 1

    before = ClientSession(_meter(16), [])  # the same before the ANSWER
    server = service.session("127.0.0.1", NOW)
    server.receive_data(before.data_to_send(), NOW)
    before.receive_data(server.data_to_send(), NOW)
    first = before.data_to_send()  # message 1
    server.receive_data(first, NOW)
    assert server.state is ServerState.AWAIT_ANSWER
    server.receive_data(first, NOW)
    assert server.closed


def test_a_very_low_identity_rate_still_refuses_with_a_readable_retry_after(
    site: Site, store: KeyStateStore
) -> None:
    """``--identity-rate 0.0001`` waits ~3 h: the retry-after sent is capped at MAX_RETRY_AFTER.

    Uncapped, the client's decoder refused its own server's REFUSE and the whole
    link failed, instead of one request being refused.
    """
    service = make_service(store, key_lifetime=1e9, identity_rate=0.0001, identity_burst=1)
    events = run(service, _meter(18), [request("gs-1"), request("gs-1")])
    assert not any(isinstance(e, LinkFailed) for e in events), events
    assert any(isinstance(e, Granted) for e in events)
    refused = [e for e in events if isinstance(e, Refused)]
    assert [(e.refusal, e.retry_after) for e in refused] == [
        (Refusal.RATE_LIMITED, MAX_RETRY_AFTER)
    ]


def test_a_revoked_token_resuming_its_key_change_is_refused(
    site: Site, store: KeyStateStore
) -> None:
    """The pending-key path (a HELLO at g+1 after a lost READY) checks suspension too.

    Before, it committed the key change and sent READY to a revoked node, which
    the current-key path refuses at once.
    """
    service = make_service(store)  # keys due at every authentication
    meter = _meter(17)
    ups: list[bytes] = []

    def lose_answer(direction: str, data: bytes) -> bytes | None:
        if direction == "up":
            ups.append(data)
            return None if len(ups) >= 3 else data
        return data

    server = service.session("127.0.0.1", NOW)
    transfer(ClientSession(meter, []), server, hook=lose_answer)
    server.connection_lost()
    assert meter.info().generation(Slot.AUTH) == 2  # the token took the new keys
    assert store.revoke(meter.identity, NOW)  # type: ignore[attr-defined]
    events = run(service, meter, [])
    assert not any(isinstance(e, Authenticated) for e in events), events
    assert events == [Refused(Refusal.REVOKED, None)]
    record = store.load(meter.identity)
    assert record is not None and record.generation == 1 and record.pending is not None


def test_a_node_revoked_while_it_answers_a_key_change_gets_nothing_committed(
    site: Site, store: KeyStateStore
) -> None:
    """The HELLO's record said "not revoked"; the revocation came before the ANSWER. The
    commit re-reads the row under its lock: refused, the key change left pending."""
    service = make_service(store)  # keys due at every authentication
    meter = _meter(18)
    ups: list[bytes] = []

    def revoke_before_the_answer(direction: str, data: bytes) -> bytes:
        if direction == "up":
            ups.append(data)
            if len(ups) == 3:  # key confirmation + ANSWER, the token at its new keys already
                assert store.revoke(meter.identity, NOW)  # type: ignore[attr-defined]
        return data

    events = transfer(
        ClientSession(meter, []), service.session("127.0.0.1", NOW), hook=revoke_before_the_answer
    )
    assert events == [Refused(Refusal.REVOKED, None)], events
    assert meter.info().generation(Slot.AUTH) == 2
    record = store.load(meter.identity)
    assert record is not None and record.generation == 1 and record.pending is not None


def test_two_processes_on_one_token_file_do_not_look_like_a_clone(
    site: Site, store: KeyStateStore
) -> None:
    """``as request`` and ``as bundle`` run their link under the token's ``exclusive()``.

    Two handles of one file stand for two processes. The second read the file
    before the first's link changed the keys; without the lock and the re-read
    it would prove the superseded generation, and the AS would suspend the
    honest node for good. With them, it takes the new keys (opened with the
    sealer its PIN gave) and proves the current generation.
    """
    service = make_service(store)  # keys due at every authentication
    first, second = site.token("alpha-1"), site.token("alpha-1")
    stale = second.mac(Slot.AUTH, b"x")
    with first.exclusive():
        assert isinstance(run(service, first, [request("gs-1")])[0], Authenticated)
    with second.exclusive():
        assert second.mac(Slot.AUTH, b"x") == first.mac(Slot.AUTH, b"x") != stale
        events = run(service, second, [request("gs-1")])
    assert isinstance(events[0], Authenticated), events
    record = store.load("alpha-1")
    assert record is not None and not record.suspended


def test_a_pin_check_elsewhere_does_not_write_back_over_a_key_change(
    site: Site, store: KeyStateStore
) -> None:
    """A wrong PIN in another process (``snrmesh agent`` mistyped) writes the tries counter
    back: under the lock too, or it could undo a key change made while its scrypt ran."""
    path = site.root / "gs-1.token"
    service = make_service(store)  # keys due at every authentication
    linker, other = SoftwareToken(path), SoftwareToken(path)
    loaded = threading.Event()
    real_load = other._load

    def load() -> Any:
        image = real_load()
        loaded.set()
        return image

    other._load = load  # type: ignore[method-assign]

    def mistyped() -> None:
        with contextlib.suppress(TokenError):
            other.verify_pin("9999")

    with linker.exclusive():  # what 'as request' and 'as bundle' hold
        linker.verify_pin(PIN)
        thread = threading.Thread(target=mistyped)
        thread.start()
        loaded.wait(1)  # without the lock it has read the file by now, and runs scrypt
        events = run(service, linker, [])
        assert isinstance(events[0], Authenticated) and events[0].key_changed
    thread.join(10)
    record = store.load("gs-1")
    assert record is not None
    assert SoftwareToken(path).info().generation(Slot.AUTH) == record.generation


def test_a_clear_refuse_with_a_bignum_retry_after_is_malformed_on_both_sides(
    store: KeyStateStore,
) -> None:
    """Unauthenticated: anyone may send it to an AS, or as an AS. It used to raise
    OverflowError out of ``receive_data`` on both (a traceback per connection in the AS log)."""
    body = cbor2.dumps({"t": 4, "why": "busy", "ra": 2**1024})
    frame = len(body).to_bytes(2, "big") + body
    service = make_service(store)
    server = service.session("127.0.0.1", NOW)
    server.receive_data(frame, NOW)
    assert server.closed and service.counters["refused_malformed"] == 1
    client = ClientSession(_meter(17), [])
    client.data_to_send()  # HELLO
    client.receive_data(frame, NOW)
    assert client.finished
    (event,) = [e for e in iter(client.next_event, None)]
    assert isinstance(event, LinkFailed) and "retry-after" in event.reason


def test_a_client_answered_by_something_else_than_an_as_says_so() -> None:
    """A web server or any other service on the port: the reason named the parser's state."""
    for garbage in (b"\xff" * 10_000, b"HTTP/1.1 400 Bad Request\r\n\r\n" * 200):
        client = ClientSession(_meter(17), [])
        client.data_to_send()  # HELLO
        client.receive_data(garbage, NOW)
        assert client.finished
        (event,) = [e for e in iter(client.next_event, None)]
        assert isinstance(event, LinkFailed)
        assert "not an Authentication Server's answer" in event.reason, event.reason


def test_a_grant_for_another_mate_than_asked_is_refused_by_the_client(
    site: Site, store: KeyStateStore
) -> None:
    """A hostile (or confused) AS answering the request id with another pair's CK: the client
    would hand a ticket for the wrong mate to its caller (secure-phase fuzz review)."""
    import pytest

    from provisioning.authserver.errors import MessageError
    from provisioning.authserver.messages import KeysetGrant, Ready
    from provisioning.authserver.protocol import ClientState

    service = make_service(store, key_lifetime=1e9)
    asked = request("gs-1")
    client = ClientSession(site.token("alpha-1"), [asked])
    downs: list[bytes] = []

    def hold_the_grant(direction: str, data: bytes) -> bytes | None:
        if direction == "down":
            downs.append(data)
            return None if len(downs) >= 3 else data  # the flight after READY: the grant
        return data

    transfer(client, service.session("127.0.0.1", NOW), hook=hold_the_grant)
    client._on_message(Ready(1), NOW)  # READY came with the grant: let it through alone
    assert client.state is ClientState.REQUESTING  # waiting for its keyset
    forged = KeysetGrant(asked.request_id, b"k" * 16, "uav-1", 1, 2, "a.b.c.d.e", "f.g.h.i.j")
    with pytest.raises(MessageError, match="asked for gs-1"):
        client._on_message(forged, NOW)
    assert not any(isinstance(e, Granted) for e in iter(client.next_event, None))
