"""``snrmesh tui``: attach the terminal UI to a running agent's control socket."""

from __future__ import annotations

import argparse
import sys

from mesh.agent.client import default_control_path
from mesh.errors import MeshError

__all__ = ["register"]

DESCRIPTION = """\
Attach a terminal UI to your running snrmesh agent through its control socket.

Panels: status bar (identity, mission, epoch, token, links, connection), peers
(link state, last heartbeat, battery, position, CK countdown), chats (one per
mate and per group, with unread counts), the open chat (delivery ticks:
◷ pending, ✓ sent, ✓✓ delivered, ✓✓ read) and alerts (refused handshakes,
expiring keysets, revoked nodes, token problems).

The TUI never holds a key or a token; if the agent stops, it says so, keeps the
last known state on screen and reconnects when the agent is back.
"""

EPILOG = """\
keys: F1 help, F2 peers, F3 chats, F4 alerts, F5 write, Ctrl+P command palette,
Ctrl+Q quit. See docs/tui.md.
"""


def cmd_tui(args: argparse.Namespace) -> int:
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        # without one it drew escape codes nobody saw and waited for keys that never came
        raise MeshError(
            "snrmesh tui needs a terminal; without one use 'snrmesh peers', 'history', "
            "'events' or 'send'"
        )
    from tui.app import SnrmeshApp  # Textual loads only when the TUI is wanted

    SnrmeshApp(args.control or default_control_path()).run()
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "tui",
        help="terminal UI for chat, peers, status and alerts (attaches to the agent)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--control",
        metavar="SOCKET",
        help="the agent's control socket (default: $SNRMESH_CONTROL, else "
        "$XDG_STATE_HOME/snrmesh/control.sock, else ~/.local/state/snrmesh/control.sock)",
    )
    p.set_defaults(func=cmd_tui)
