"""What an agent knows about keys: its bundle's CKs, opened through its token, and the policy.

At start the agent opens (unwraps through the token) its own copy of every CK
of the bundle that has not expired -- a few hundred token operations at most,
done once -- and each epoch's discovery key; again for each bundle it takes
from an AS (``--as``). The session protocol then asks
this key ring, through :class:`mesh.protocol.KeysetLookup`, for CKs by
``ck_id``; high-water marks go to the agent's store as they advance, so a
restarted agent still refuses a replayed handshake.

Policy lives here too: a ticket (a CK copy a peer hands us) is accepted only
if it is for our mission, names us and a dialogue mate of ours that is not
revoked.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.agent.store import AgentStore
from mesh.keyset import CommunicationKeyset, KeysetError, open_copy
from mesh.keyset.bundle import Bundle, BundleKeyset, Mate
from mesh.keyset.copies import open_discovery_key
from mesh.protocol import MemoryKeyStore
from mesh.protocol.config import Role
from mesh.token import SecureElement

__all__ = ["KeyRing", "RingContents"]

MAX_STRANGERS = 64
MAX_SETTLED = 4096


@dataclass(frozen=True, slots=True)
class PeerKeyset:
    """A CK with one mate, as the dialer needs it."""

    ck: CommunicationKeyset
    ticket: str


@dataclass(frozen=True, slots=True)
class RingContents:
    """A bundle's CKs and discovery keys, opened through the token: what a key ring holds."""

    bundle: Bundle
    mates: dict[str, Mate]
    by_peer: dict[str, list[PeerKeyset]]
    keysets: list[CommunicationKeyset]
    discovery: dict[int, bytes]

    @classmethod
    def open(cls, bundle: Bundle, token: SecureElement, *, now: float) -> RingContents:
        """Open every CK of ``bundle`` not yet expired, and its discovery keys.

        Token operations only (no store, no event loop), so the agent runs it in
        a thread for a bundle fetched from the AS: thousands of unwraps, on a card
        one command each, would stall every link.
        """
        mates = {m.identity: m for m in bundle.mates if m.identity not in bundle.revoked}
        by_peer: dict[str, list[PeerKeyset]] = {}
        keysets: list[CommunicationKeyset] = []
        for entry in bundle.keysets:
            if entry.not_after <= now or entry.peer not in mates:
                continue
            ck = _open(token, entry, bundle)
            keysets.append(ck)
            by_peer.setdefault(entry.peer, []).append(PeerKeyset(ck, entry.ticket))
        for entries in by_peer.values():
            entries.sort(key=lambda k: k.ck.not_before)
        discovery = {
            d.epoch: open_discovery_key(token, d.wrapped).key
            for d in bundle.discovery
            if d.not_after > now
        }
        return cls(bundle, mates, by_peer, keysets, discovery)


def _open(token: SecureElement, entry: BundleKeyset, bundle: Bundle) -> CommunicationKeyset:
    ck = open_copy(token, entry.own)
    if ck.ck_id != entry.ck_id or ck.mission_id != bundle.mission.mission_id:
        raise KeysetError("bundle lists a CK copy that does not match its entry")
    return ck


class KeyRing:
    """A :class:`mesh.protocol.KeysetLookup` backed by a bundle, a token and the agent store."""

    def __init__(
        self, bundle: Bundle, token: SecureElement, store: AgentStore, *, now: float
    ) -> None:
        self._token = token
        self._store = store
        self.strangers: set[str] = set()  # named by tickets that opened, not in the bundle
        self._settled: set[str] = set()  # strangers or former mates a fetch left out
        self.mates: dict[str, Mate] = {}
        self.install(RingContents.open(bundle, token, now=now))

    def install(self, contents: RingContents) -> None:
        """Hold ``contents`` from now on (a bundle fetched from the AS, ``--as``).

        The same object stays in the agent's listeners, so the next handshake
        uses it. High-water marks come back from the store, where every mark is
        written as it advances.
        """
        marks = [(c, Role(r), t) for c, r, t in self._store.high_water_marks()]
        left_out = (self.strangers | set(self.mates)) - set(contents.mates)
        if len(self._settled) + len(left_out) <= MAX_SETTLED:
            self._settled |= left_out
        self.strangers = set()
        bundle = contents.bundle
        self.bundle, self.identity, self.mission = bundle, bundle.identity, bundle.mission
        self.mates, self._by_peer = contents.mates, contents.by_peer
        self._discovery = contents.discovery
        self._keys = MemoryKeyStore(contents.keysets, ticket_opener=self._open_ticket, marks=marks)

    def _open_ticket(self, ticket: str) -> CommunicationKeyset:
        ck = open_copy(self._token, ticket)
        if ck.mission_id != self.mission.mission_id:
            raise KeysetError("ticket is for another mission")
        peer = ck.peer_of(self.identity)
        if peer in self.bundle.revoked:
            raise KeysetError(f"ticket names {peer}, who is revoked")
        if peer not in self.mates:
            # a CK for us that our token opens, so the desk or the AS made it: a mate newer
            # than our bundle (an agent with --as fetches again), unless a fetch already
            # left it out (a suspended mate that keeps dialling, a replayed ticket)
            if peer not in self._settled and len(self.strangers) < MAX_STRANGERS:
                self.strangers.add(peer)
            raise KeysetError(f"ticket names {peer}, who is not a dialogue mate in our bundle")
        return ck

    # -- for the agent -----------------------------------------------------------------------

    def keyset_for(self, peer: str, now: float, *, skew: float = 0.0) -> PeerKeyset | None:
        """The CK to dial ``peer`` with at ``now``: the newest one already valid (with skew)."""
        best: PeerKeyset | None = None
        for entry in self._by_peer.get(peer, ()):
            if entry.ck.not_before - skew <= now < entry.ck.not_after:
                best = entry
        return best

    def expiry(self, peer: str, now: float) -> float | None:
        """When the CK in use with ``peer`` expires (its last one, if epochs chain)."""
        entry = self.keyset_for(peer, now)
        return None if entry is None else float(entry.ck.not_after)

    @property
    def discovery_keys(self) -> dict[int, bytes]:
        """Each epoch's discovery key (what a new bundle may change)."""
        return self._discovery

    def discovery_key(self, now: float) -> bytes | None:
        epoch = self.mission.epoch_at(now)
        return None if epoch is None else self._discovery.get(epoch.index)

    # -- KeysetLookup --------------------------------------------------------------------------

    def lookup(self, ck_id: bytes) -> CommunicationKeyset | None:
        return self._keys.lookup(ck_id)

    def is_revoked(self, ck_id: bytes) -> bool:
        ck = self._keys.lookup(ck_id)
        return ck is not None and any(p in self.bundle.revoked for p in (ck.party_a, ck.party_b))

    def high_water(self, ck_id: bytes, role: Role) -> int:
        return self._keys.high_water(ck_id, role)

    def set_high_water(self, ck_id: bytes, role: Role, timestamp: int) -> None:
        self._keys.set_high_water(ck_id, role, timestamp)
        self._store.set_high_water([(ck_id, role.value, timestamp)])

    def open_ticket(self, ticket: str) -> CommunicationKeyset:
        return self._keys.open_ticket(ticket)

    def cache(self, ck: CommunicationKeyset) -> None:
        self._keys.cache(ck)
