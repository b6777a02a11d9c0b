"""``HOST:PORT`` as the command line takes it, checked before any name lookup.

A host is an IPv4 address, an IPv6 address in brackets (``[::1]:7717``) or a host name made of
letters, digits and hyphens. Anything else -- ``127.0.0.1:7717:1``, a name with a space -- is
refused here: handed to the resolver, it would become a DNS query for a name that cannot exist.
"""

from __future__ import annotations

import ipaddress
import re

from mesh.errors import MeshError

__all__ = ["AddressError", "parse_address"]

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.IGNORECASE | re.ASCII)
MAX_HOST_NAME = 253


class AddressError(MeshError):
    """Text that is not ``HOST:PORT``."""


def _is_host(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
        return True
    except ValueError:
        pass
    labels = host.removesuffix(".").split(".")
    return (
        0 < len(host) <= MAX_HOST_NAME
        and all(_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()  # RFC 1123: a name never ends in digits; '999.1.1.1' is
    )  # a mistyped IPv4 address, not a name to look up


def _split(text: str) -> tuple[str | None, str | None]:
    """(host or None if it is not one, port text: None when left out, "" when empty)."""
    if text.startswith("["):
        inside, closed, rest = text[1:].partition("]")
        try:
            ipaddress.IPv6Address(inside)
        except ValueError:
            return None, None
        if not closed or (rest and not rest.startswith(":")):
            return None, None
        return inside, (rest[1:] if rest else None)
    host, sep, after = text.rpartition(":")
    if not sep:
        return (text if _is_host(text) else None), None
    return (host if _is_host(host) else None), after


def parse_address(
    text: str, default_port: int | None = None, *, listening: bool = False
) -> tuple[str, int]:
    """``HOST:PORT`` (or ``HOST`` when there is a ``default_port``) -> (host, port).

    ``listening``: port 0 is allowed (the system picks one), as ``--listen`` says. ``HOST:``
    with nothing after the colon is refused: a port left out by mistake, not the default.
    """
    host, port = _split(text)
    if host is not None and host.lower().removesuffix(".").rsplit(".", 1)[-1] == "invalid":
        # RFC 6761 section 6.4: resolvers should answer names under .invalid at once, without a
        # query; the system's does not, so they are refused here
        raise AddressError(f"bad address {text!r}: a name under .invalid never resolves")
    if port is None and default_port is not None:
        port = str(default_port)
    lowest = 0 if listening else 1
    if host is None or not port or not (port.isascii() and port.isdigit()):
        raise AddressError(
            f"bad address {text!r}: expected HOST:PORT (a host name, an IPv4 address or [IPv6])"
        )
    if not lowest <= int(port) < 65536:
        raise AddressError(f"bad address {text!r}: expected HOST:PORT, the port {lowest}..65535")
    return host, int(port)
