"""The pure layers: JSON-lines framing, defensive parsing of the agent's objects, formatting."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tui.errors import AgentProtocolError, LocalRequestError
from tui.format import clock_time, countdown, duration, link_label, position, since
from tui.state import (
    AlertKind,
    AlertUpdate,
    BundleReplaced,
    Conversation,
    Delivery,
    Lagged,
    LinkState,
    ReceiptUpdate,
    parse_agent_info,
    parse_event,
    parse_groups,
    parse_list,
    parse_message,
    parse_peer,
)
from tui.wire import MAX_LINE_BYTES, Event, Response, decode_line, encode_request

PEER: dict[str, Any] = {
    "identity": "uav-1",
    "role": "uav",
    "state": "relayed",
    "via": "gs-1",
    "last_seen": 100,
    "position": [48.8, 2.3, 420],
    "battery": 47,
    "text": "orbit B",
    "ck_expires": 700.5,
    "refused_reason": None,
}


def test_request_line_is_one_json_object_with_id_and_op() -> None:
    line = encode_request(7, "send", {"to": "gs-1", "text": "é"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"id": 7, "op": "send", "to": "gs-1", "text": "é"}


def test_request_over_the_line_limit_is_refused_before_sending() -> None:
    with pytest.raises(LocalRequestError):
        encode_request(1, "send", {"to": "gs-1", "text": "x" * MAX_LINE_BYTES})
    with pytest.raises(LocalRequestError):
        encode_request(1, "send", {"id": 3})


def test_responses_and_events_decode() -> None:
    assert decode_line(b'{"id": 7, "ok": true, "result": {"a": 1}}\n') == Response(
        7, True, {"a": 1}
    )
    refused = decode_line(
        b'{"id": 8, "ok": false, "error": {"code": "unknown-peer", "message": "no"}}'
    )
    assert refused == Response(8, False, {}, "unknown-peer", "no")
    assert decode_line(b'{"event": "receipt", "message_id": "ab"}') == Event(
        "receipt", {"message_id": "ab"}
    )


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"[1, 2]",
        b'{"id": true, "ok": true}',
        b'{"id": null, "ok": false, "error": {"code": "bad-request", "message": "x"}}',
        b'{"id": 1, "ok": true, "result": []}',
        b'{"id": 1, "ok": false}',
        b'{"event": 5}',
        b"\xff\xfe",
        b" " * (MAX_LINE_BYTES + 1),
        b"[" * 60_000,  # deep nesting: RecursionError, which used to end the client's reader
    ],
)
def test_lines_the_api_does_not_allow_are_the_agents_fault(line: bytes) -> None:
    with pytest.raises(AgentProtocolError):
        decode_line(line)


@given(st.binary(max_size=256))
def test_any_bytes_decode_or_raise_only_agent_protocol_error(data: bytes) -> None:
    try:
        item = decode_line(data)
    except AgentProtocolError:
        return
    assert isinstance(item, Response | Event)


def test_peer_parses_and_bad_optional_fields_read_as_unknown() -> None:
    peer = parse_peer(PEER)
    assert (peer.state, peer.via, peer.position, peer.battery) == (
        LinkState.RELAYED,
        "gs-1",
        (48.8, 2.3, 420.0),
        47.0,
    )
    odd = parse_peer({**PEER, "position": [1, "x", 3], "battery": True, "last_seen": "yesterday"})
    assert (odd.position, odd.battery, odd.last_seen) == (None, None, None)
    huge = 10**400  # an int past float's range (JSON allows it): unknown, not OverflowError
    far = parse_peer({**PEER, "position": [huge, 0, 0], "battery": huge, "last_seen": huge})
    assert (far.position, far.battery, far.last_seen) == (None, None, None)
    nan = parse_peer({**PEER, "battery": float("nan"), "last_seen": float("inf")})
    assert (nan.battery, nan.last_seen) == (None, None)


@pytest.mark.parametrize(
    "change", [{"identity": None}, {"identity": ""}, {"state": "sideways"}, {"state": None}]
)
def test_peer_without_identity_or_known_state_is_refused(change: dict[str, Any]) -> None:
    with pytest.raises(AgentProtocolError):
        parse_peer({**PEER, **change})


def test_message_we_sent_to_a_group_has_no_peer() -> None:
    message = parse_message(
        {
            "id": "ab",
            "direction": "out",
            "peer": "",
            "group": "squad",
            "text": "hi",
            "at": 5,
            "state": "delivered",
            "read": False,
        }
    )
    assert message.conversation == Conversation("group", "squad")
    assert not message.unread
    with pytest.raises(AgentProtocolError):
        parse_message(
            {
                "id": "ab",
                "direction": "in",
                "peer": "",
                "group": None,
                "text": "",
                "at": 5,
                "state": "delivered",
                "read": False,
            }
        )


def test_a_bad_item_is_dropped_and_reported_not_the_whole_list() -> None:
    peers, problems = parse_list(
        [PEER, {"identity": 3}, {**PEER, "identity": "gs-1"}], parse_peer, "peers"
    )
    assert [p.identity for p in peers] == ["uav-1", "gs-1"]
    assert len(problems) == 1 and "identity" in problems[0]
    with pytest.raises(AgentProtocolError):
        parse_list({"not": "a list"}, parse_peer, "peers")


def test_events_parse_by_name_and_unknown_names_are_ignored() -> None:
    assert parse_event("receipt", {"message_id": "ab", "peer": "gs-1", "state": "read"}) == (
        ReceiptUpdate("ab", "gs-1", Delivery.READ)
    )
    alert = parse_event(
        "alert",
        {"alert": {"alert_id": 3, "at": 1, "kind": "token", "peer": None, "message": "PIN locked"}},
    )
    assert isinstance(alert, AlertUpdate) and alert.alert.kind is AlertKind.TOKEN
    assert parse_event("lagged", {}) == Lagged()
    assert parse_event("bundle", {"keysets": 4, "mates": 2, "at": 1}) == BundleReplaced()
    uplink = parse_event(
        "alert",
        {"alert": {"alert_id": 4, "at": 1, "kind": "uplink", "peer": None, "message": "no AS"}},
    )
    assert isinstance(uplink, AlertUpdate) and uplink.alert.kind is AlertKind.UPLINK
    assert parse_event("something-new", {"x": 1}) is None
    with pytest.raises(AgentProtocolError):
        parse_event("receipt", {"message_id": "ab", "peer": "gs-1", "state": "lost"})


def test_hello_tolerates_missing_optional_parts() -> None:
    info = parse_agent_info({"identity": "alpha-1", "epoch": None, "token": {"state": "weird"}})
    assert (info.identity, info.epoch, info.token.state, info.links) == (
        "alpha-1",
        None,
        "error",
        None,
    )
    assert parse_groups({"b": ["x", 3], "a": []})[0].name == "a"


def test_durations_and_countdowns_read_compactly() -> None:
    assert [duration(s) for s in (-3, 4, 59, 60, 540, 599, 600, 3599, 7950, 180000)] == [
        "0s",
        "4s",
        "59s",
        "1m00s",
        "9m00s",
        "9m59s",
        "10m",
        "59m",
        "2h12m",
        "2d02h",
    ]
    assert (countdown(10, None), countdown(10, 10), countdown(10, 70)) == ("—", "expired", "1m00s")
    assert since(100, None) == "never" and since(100, 96) == "4s"


def test_times_are_utc_with_a_date_only_for_other_days() -> None:
    now = 1796118450.0  # 2026-12-01T09:47:30Z
    assert clock_time(now - 60, now) == "09:46"
    assert clock_time(now - 86400, now) == "11-30 09:47"


def test_link_and_position_labels() -> None:
    assert link_label(parse_peer(PEER)) == "via gs-1"
    assert link_label(parse_peer({**PEER, "via": None})) == "relayed"
    assert position((48.85661, 2.35222, 41.4)) == "48.8566,2.3522 41m"
    assert position(None) == "—"


def test_every_delivery_state_has_a_mark_and_a_meaning_in_help() -> None:
    """A state the agent reports (``undeliverable`` among them) never leaves a blank or a crash."""
    from tui.format import DELIVERY_MARK
    from tui.screens.help import DELIVERY_MEANING
    from tui.state import Delivery

    assert set(DELIVERY_MARK) == set(DELIVERY_MEANING) == set(Delivery)
    assert DELIVERY_MARK[Delivery.UNDELIVERABLE] == "✗ undeliverable"
    assert [d.rank for d in Delivery] == sorted(d.rank for d in Delivery)
    assert Delivery.SENT.rank < Delivery.UNDELIVERABLE.rank < Delivery.DELIVERED.rank
