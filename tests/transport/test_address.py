"""HOST:PORT is checked before any lookup: a malformed host never becomes a DNS query."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.transport.address import AddressError, parse_address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7717", ("127.0.0.1", 7717)),
        ("gs-1.local:80", ("gs-1.local", 80)),
        ("GS-1:80", ("GS-1", 80)),
        ("[::1]:7717", ("::1", 7717)),  # brackets off: the old parser kept them, a lookup
        ("[fe80::1]:1", ("fe80::1", 1)),
        ("127.0.0.1", ("127.0.0.1", 9)),  # the default port
        ("[::1]", ("::1", 9)),
    ],
)
def test_addresses_that_parse(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text, 9) == expected


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1:17796:1",  # was host "127.0.0.1:17796": a DNS query (ops review)
        "::1:7717",  # IPv6 wants brackets
        "[::1",
        "[nothost]:1",
        "[::1]x",
        "a b:1",
        ":7450",
        "-bad:1",
        "bad-:1",
        "x" * 254 + ":1",
        "é.example:1",
        "host:+1",
        "host: 1",
        "host:65536",
        "host:0",  # only a listener may ask for port 0
        "999.1.1.1:80",  # a mistyped IPv4 address, not a name (RFC 1123: no all-digit TLD)
        "1.2.3.4.5:80",
        "127.0.0.1:",  # a port left out by mistake: not the default
        "[::1]:",
        "host:\u0663",  # an Arabic-Indic digit three: isdigit() says yes
        "",
    ],
)
def test_addresses_refused_before_any_lookup(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_lookup(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a lookup for {args!r}")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    with pytest.raises(AddressError, match="expected HOST:PORT"):
        parse_address(text, 9)


@pytest.mark.parametrize(
    ("text", "listening", "needle"),
    [("host:65536", False, "the port 1..65535"), ("host:0", False, "the port 1..65535"),
     ("127.0.0.1:70000", True, "the port 0..65535")],
)  # fmt: skip
def test_a_port_out_of_range_says_its_range(text: str, listening: bool, needle: str) -> None:
    with pytest.raises(AddressError, match=needle):  # it said only "expected HOST:PORT"
        parse_address(text, 9, listening=listening)


def test_port_0_is_for_listening_only() -> None:
    assert parse_address("127.0.0.1:0", listening=True) == ("127.0.0.1", 0)
    with pytest.raises(AddressError):
        parse_address("127.0.0.1:0")
    with pytest.raises(AddressError):
        parse_address("127.0.0.1")  # no default: the port is required


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_any_text_parses_to_a_plain_host_or_raises_address_error(text: str) -> None:
    try:
        host, port = parse_address(text, 9, listening=True)
    except AddressError:
        return
    assert 0 <= port < 65536 and host.isascii() and " " not in host
    assert ":" not in host or host.count(":") >= 2  # only an IPv6 address has colons


@pytest.mark.parametrize(
    "text", ["nosuchhost.invalid:7451", "a.b.INVALID.:1", "invalid:1", "x.invalid"]
)
def test_names_under_invalid_are_refused_without_a_lookup(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 6761 6.4: such a name never resolves, and the system's resolver still sends a query
    for it (a refusals test did, against the loopback-only rule)."""

    def no_lookup(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a lookup for {args!r}")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    with pytest.raises(AddressError, match=r"a name under \.invalid never resolves"):
        parse_address(text, 9)
    assert parse_address("invalid.example:1") == ("invalid.example", 1)
