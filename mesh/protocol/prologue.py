"""The Noise prologue: what both sides must agree on before any key is mixed.

Noise hashes the prologue into ``h`` first, so every handshake tag depends on
it: a message 1 replayed into another pairing, another role, another mission
or another epoch of the keyset fails its AEAD check, without any field of it
travelling on the wire. The kind byte binds what the message 1 is for: a new
session (0) or a rekey of a live one (1), so nobody on the path (a relay) can
turn a rekey into what looks like a restarted peer's new session, or back.
Layout (``docs/protocol.md``)::

    "snrmesh-session" | version (1) | kind (1) | mission_id (16) | ck_id (16)
    | len (1) | initiator identity | len (1) | responder identity
    | CK not_after (8, signed, big-endian POSIX seconds)

Identities are at most 64 ASCII bytes (``check_identity``), so one length byte
suffices and the encoding is injective.
"""

from __future__ import annotations

import struct

from mesh.keyset.keyset import CommunicationKeyset
from mesh.protocol.frames import VERSION

__all__ = ["PROLOGUE_LABEL", "build_prologue"]

PROLOGUE_LABEL = b"snrmesh-session"
_NOT_AFTER = struct.Struct(">q")


def build_prologue(
    ck: CommunicationKeyset, *, initiator: str, responder: str, rekey: bool = False
) -> bytes:
    """The prologue of a handshake under ``ck`` from ``initiator`` to ``responder``."""
    init = initiator.encode("ascii")
    resp = responder.encode("ascii")
    return b"".join(
        (
            PROLOGUE_LABEL,
            bytes((VERSION, rekey)),
            ck.mission_id,
            ck.ck_id,
            bytes((len(init),)),
            init,
            bytes((len(resp),)),
            resp,
            _NOT_AFTER.pack(ck.not_after),
        )
    )
