"""Cards in PC/SC readers, through pcscd and pyscard: ``--token pcsc:READER``.

:class:`PcscChannel` is the only code that calls PC/SC (``smartcard.scard``,
imported lazily so snrmesh works without pyscard until a card is used). It
holds one PC/SC transaction per operation, so another program can share the
card between operations but never interleave with one, and it turns every
PC/SC failure into a typed error:

* ``ReaderUnavailable``: pyscard missing, pcscd not running, no reader, no
  reader of that name, the card held exclusively by another program;
* ``TokenAbsent``: the reader is empty, or the card was pulled out;
* ``CardError``: anything else the reader or card reports.

A reader is named by its PC/SC name, or any part of it that matches one
reader only (case-insensitive); with no name, the only reader present.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from mesh.token.card import CardToken
from mesh.token.errors import CardError, ReaderUnavailable, TokenAbsent

__all__ = ["PcscChannel", "PcscToken", "list_readers"]

_INSTALL_HINT = (
    "pyscard is not installed: pip install 'snrmesh[card]' (needs libpcsclite-dev, swig)"
)


def _scard() -> Any:
    try:
        from smartcard import scard
    except ImportError:
        raise ReaderUnavailable(_INSTALL_HINT) from None
    return scard


def _code(hr: int) -> int:
    return hr & 0xFFFFFFFF


class _Codes:
    """PC/SC result codes, grouped by what they mean to us."""

    def __init__(self, scard: Any) -> None:
        def codes(*names: str) -> frozenset[int]:
            return frozenset(_code(getattr(scard, name)) for name in names)

        self.service = codes(
            "SCARD_E_NO_SERVICE", "SCARD_E_SERVICE_STOPPED", "SCARD_E_INVALID_HANDLE"
        )
        self.no_readers = codes("SCARD_E_NO_READERS_AVAILABLE")
        self.reader_gone = codes("SCARD_E_UNKNOWN_READER", "SCARD_E_READER_UNAVAILABLE")
        self.absent = codes(
            "SCARD_E_NO_SMARTCARD", "SCARD_W_REMOVED_CARD", "SCARD_W_UNPOWERED_CARD"
        )
        # What a transmit reports when the card went away in the middle of it (vpcd, USB).
        self.lost = codes(
            "SCARD_E_NOT_TRANSACTED", "SCARD_F_COMM_ERROR", "SCARD_W_UNRESPONSIVE_CARD"
        )
        self.reset = codes("SCARD_W_RESET_CARD")
        self.busy = codes("SCARD_E_SHARING_VIOLATION")


class PcscChannel:
    """One reader, spoken to through pcscd (a :class:`~mesh.token.card.CardChannel`)."""

    def __init__(self, reader: str | None = None) -> None:
        self._sc = _scard()
        self._codes = _Codes(self._sc)
        self._context: Any = None
        self._card: Any = None
        self._protocol: Any = None
        self._name = self._choose(reader)

    @property
    def name(self) -> str:
        return self._name

    # -- context and reader ---------------------------------------------------------------------

    def _message(self, hr: int) -> str:
        return str(self._sc.SCardGetErrorMessage(hr)).strip().rstrip(".")

    def _service_error(self, hr: int) -> ReaderUnavailable:
        self._context = self._card = None
        return ReaderUnavailable(
            f"the PC/SC service is not running (start pcscd): {self._message(hr)}"
        )

    def _ctx(self) -> Any:
        if self._context is None:
            hr, context = self._sc.SCardEstablishContext(self._sc.SCARD_SCOPE_USER)
            if hr != self._sc.SCARD_S_SUCCESS:
                raise self._service_error(hr)
            self._context = context
        return self._context

    def readers(self) -> list[str]:
        hr, readers = self._sc.SCardListReaders(self._ctx(), [])
        if _code(hr) in self._codes.no_readers:
            return []
        if _code(hr) in self._codes.service:
            raise self._service_error(hr)
        if hr != self._sc.SCARD_S_SUCCESS:
            raise ReaderUnavailable(f"cannot list smartcard readers: {self._message(hr)}")
        return [str(r) for r in readers]

    def _choose(self, wanted: str | None) -> str:
        readers = self.readers()
        if not readers:
            raise ReaderUnavailable("no smartcard reader found (pcscd sees none)")
        if not wanted:
            if len(readers) == 1:
                return readers[0]
            raise ReaderUnavailable(
                f"{len(readers)} readers present; name one with --token 'pcsc:NAME' "
                f"({'; '.join(readers)})"
            )
        if wanted in readers:
            return wanted
        matches = [r for r in readers if wanted.lower() in r.lower()]
        if len(matches) == 1:
            return matches[0]
        what = "several readers match" if matches else "no reader matches"
        raise ReaderUnavailable(f"{what} {wanted!r}; readers: {'; '.join(readers)}")

    # -- card ---------------------------------------------------------------------------------

    def _connect(self) -> None:
        sc = self._sc
        hr, card, protocol = sc.SCardConnect(
            self._ctx(),
            self._name,
            sc.SCARD_SHARE_SHARED,
            sc.SCARD_PROTOCOL_T0 | sc.SCARD_PROTOCOL_T1,
        )
        code = _code(hr)
        if hr == sc.SCARD_S_SUCCESS:
            self._card, self._protocol = card, protocol
            return
        if code in self._codes.absent:
            raise TokenAbsent(f"no card in reader {self._name}")
        if code in self._codes.reader_gone:
            raise ReaderUnavailable(f"reader {self._name} is gone")
        if code in self._codes.busy:
            raise ReaderUnavailable(
                f"the card in {self._name} is held exclusively by another program"
            )
        if code in self._codes.service:
            raise self._service_error(hr)
        raise CardError(f"cannot connect to the card in {self._name}: {self._message(hr)}")

    def _drop(self) -> None:
        if self._card is not None:
            with contextlib.suppress(Exception):  # the handle may be dead already
                self._sc.SCardDisconnect(self._card, self._sc.SCARD_LEAVE_CARD)
        self._card = None

    def _begin(self) -> int:
        return _code(self._sc.SCardBeginTransaction(self._card))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[bool]:
        fresh = False
        if self._card is None:
            self._connect()
            fresh = True
        code = self._begin()
        if code in self._codes.reset:  # another program reset the card: our session is gone
            hr, self._protocol = self._sc.SCardReconnect(
                self._card,
                self._sc.SCARD_SHARE_SHARED,
                self._sc.SCARD_PROTOCOL_T0 | self._sc.SCARD_PROTOCOL_T1,
                self._sc.SCARD_LEAVE_CARD,
            )
            fresh = True
            code = self._begin() if hr == self._sc.SCARD_S_SUCCESS else _code(hr)
        if code != self._sc.SCARD_S_SUCCESS and code not in self._codes.service:
            self._drop()  # removed (and perhaps back): start over with a new handle
            self._connect()
            fresh = True
            code = self._begin()
        if code in self._codes.absent:
            self._drop()
            raise TokenAbsent(f"no card in reader {self._name}")
        if code in self._codes.service:
            raise self._service_error(code)
        if code != self._sc.SCARD_S_SUCCESS:
            self._drop()
            raise CardError(f"cannot reserve the card in {self._name}: {self._message(code)}")
        try:
            yield fresh
        finally:
            if self._card is not None:
                self._sc.SCardEndTransaction(self._card, self._sc.SCARD_LEAVE_CARD)

    def transmit(self, apdu: bytes) -> bytes:
        if self._card is None:
            raise TokenAbsent(f"no card in reader {self._name}")
        hr, response = self._sc.SCardTransmit(self._card, self._protocol, list(apdu))
        if hr == self._sc.SCARD_S_SUCCESS:
            return bytes(response)
        code = _code(hr)
        self._drop()
        if code in self._codes.absent:
            raise TokenAbsent(f"the card was removed from {self._name}")
        if code in self._codes.lost:
            raise TokenAbsent(f"the card in {self._name} stopped answering (pulled out?)")
        if code in self._codes.service:
            raise self._service_error(hr)
        if code in self._codes.reset:
            raise CardError(f"the card in {self._name} was reset during an operation; try again")
        raise CardError(f"the card in {self._name} did not answer: {self._message(hr)}")

    def close(self) -> None:
        self._drop()
        if self._context is not None:
            with contextlib.suppress(Exception):
                self._sc.SCardReleaseContext(self._context)
        self._context = None


class PcscToken(CardToken):
    """A snrmesh card in a PC/SC reader; ``reader`` as for ``--token pcsc:READER``."""

    def __init__(self, reader: str | None = None) -> None:
        channel = PcscChannel(reader)
        try:
            super().__init__(channel)
        except BaseException:
            channel.close()
            raise


def list_readers() -> list[str]:
    """The PC/SC readers pcscd knows (empty when there are none)."""
    sc = _scard()
    hr, context = sc.SCardEstablishContext(sc.SCARD_SCOPE_USER)
    if hr != sc.SCARD_S_SUCCESS:
        raise ReaderUnavailable(
            "the PC/SC service is not running (start pcscd): "
            + str(sc.SCardGetErrorMessage(hr)).strip().rstrip(".")
        )
    try:
        hr, readers = sc.SCardListReaders(context, [])
        return [str(r) for r in readers] if hr == sc.SCARD_S_SUCCESS else []
    finally:
        sc.SCardReleaseContext(context)
