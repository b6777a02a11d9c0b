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
    return 0 < len(host) <= MAX_HOST_NAME and all(_LABEL.fullmatch(label) for label in labels)


def parse_address(
    text: str, default_port: int | None = None, *, listening: bool = False
) -> tuple[str, int]:
    """``HOST:PORT`` (or ``HOST`` when there is a ``default_port``) -> (host, port).

    ``listening``: port 0 is allowed (the system picks one), as ``--listen`` says.
    """
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else (None if rest else "")
        try:
            valid = bool(closed) and port is not None and bool(ipaddress.IPv6Address(host))
        except ValueError:
            valid = False
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = text, ""
        valid = _is_host(host)
    if valid and port == "" and default_port is not None:
        port = str(default_port)
    lowest = 0 if listening else 1
    if not (valid and port and port.isdigit() and lowest <= int(port) < 65536):
        raise AddressError(
            f"bad address {text!r}: expected HOST:PORT (a host name, an IPv4 address or [IPv6])"
        )
    return host, int(port)
