"""How values read on screen: symbols, durations, countdowns, times — pure functions.

Every state has a symbol as well as a colour (colours live in ``snrmesh.tcss``),
so the UI reads on a monochrome terminal. Times are UTC, as in the rest of
snrmesh, so two operators in different time zones quote the same clock.
"""

from __future__ import annotations

from datetime import UTC, datetime

from tui.state import AlertKind, Delivery, LinkState, Peer

__all__ = [
    "ALERT_LABEL",
    "DELIVERY_MARK",
    "LINK_SYMBOL",
    "battery",
    "clock_time",
    "countdown",
    "duration",
    "link_label",
    "position",
    "since",
]

LINK_SYMBOL: dict[LinkState, str] = {
    LinkState.DIRECT: "●",
    LinkState.RELAYED: "◐",
    LinkState.OFFLINE: "○",
    LinkState.REFUSED: "✖",
}

DELIVERY_MARK: dict[Delivery, str] = {
    Delivery.PENDING: "◷ pending",
    Delivery.SENT: "✓",
    Delivery.UNDELIVERABLE: "✗ undeliverable",
    Delivery.DELIVERED: "✓✓",
    Delivery.READ: "✓✓ read",
}

ALERT_LABEL: dict[AlertKind, str] = {
    AlertKind.REFUSED: "✖ REFUSED",
    AlertKind.EXPIRING: "⚠ EXPIRING",
    AlertKind.REVOKED: "⊘ REVOKED",
    AlertKind.TOKEN: "⚠ TOKEN",
    AlertKind.UPLINK: "⚠ UPLINK",
}

UNKNOWN = "—"


def link_label(peer: Peer) -> str:
    if peer.state is LinkState.RELAYED:
        return f"via {peer.via}" if peer.via else "relayed"
    return peer.state.value


def duration(seconds: float) -> str:
    """A compact, non-negative duration: ``45s``, ``12m``, ``3h05m``, ``2d04h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if s < 600 else f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def since(now: float, moment: float | None) -> str:
    """Time since a heartbeat: ``4s``, ``21m``; ``never`` when the mate was never heard."""
    return "never" if moment is None else duration(now - moment)


def countdown(now: float, deadline: float | None) -> str:
    """Time left until ``deadline``: ``2h12m``; ``expired`` once past; ``—`` when unknown."""
    if deadline is None:
        return UNKNOWN
    return "expired" if deadline <= now else duration(deadline - now)


def clock_time(moment: float, now: float) -> str:
    """``09:05`` for today (UTC), ``11-30 09:05`` for another day; ``—`` past the calendar.

    A chat's time is its sender's clock: a mate that sends milliseconds (year 58,000) must not
    take the screen down.
    """
    try:
        at = datetime.fromtimestamp(moment, UTC)
    except (OverflowError, ValueError, OSError):
        return UNKNOWN
    today = datetime.fromtimestamp(now, UTC).date()
    return at.strftime("%H:%M") if at.date() == today else at.strftime("%m-%d %H:%M")


def position(value: tuple[float, float, float] | None) -> str:
    if value is None:
        return UNKNOWN
    lat, lon, alt = value
    return f"{lat:.4f},{lon:.4f} {alt:.0f}m"


def battery(value: float | None) -> str:
    return UNKNOWN if value is None else f"{value:.0f}%"
