"""Pilot tests: every panel and action of the TUI against the scripted agent over its socket."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import App
from textual.command import CommandPalette
from textual.widgets import Static

from tests.tui.conftest import FAST_RETRY, loaded, make_app, wait_until
from tests.tui.fake_agent import FIXED_NOW, FakeAgent
from tui.app import SnrmeshApp
from tui.messages import ConversationSelected
from tui.model import Connection
from tui.screens import HelpScreen, MainScreen
from tui.state import Conversation, Delivery
from tui.widgets import (
    AlertsPanel,
    ChatInput,
    ChatLog,
    ConversationList,
    PeersPanel,
    StatusBar,
)

GS1 = Conversation("peer", "gs-1")
UAV1 = Conversation("peer", "uav-1")
SQUAD = Conversation("group", "squad")


def status_text(app: App[None]) -> str:
    rendered = app.screen.query_one(StatusBar).render()
    assert isinstance(rendered, Text)
    return rendered.plain


def log_text(app: App[None]) -> str:
    """What the chat log shows, as plain text at its current width."""
    log = app.screen.query_one(ChatLog)
    console = app.console
    static = log.query_one("#chat-text", Static)
    lines = console.render_lines(static.content, console.options.update_width(log.size.width))
    return "\n".join("".join(s.text for s in line) for line in lines)


def option_texts(widget: ConversationList | AlertsPanel) -> list[str]:
    return [str(option.prompt) for option in widget.options]


def notifications(app: App[None]) -> list[str]:
    """The toasts raised so far (Textual keeps them in a private attribute)."""
    return [n.message for n in app._notifications]


async def test_first_load_fills_every_panel(socket_path: Path) -> None:
    async with FakeAgent(socket_path), make_app(socket_path).run_test(size=(120, 40)) as pilot:
        await loaded(pilot)
        app = pilot.app
        status = status_text(app)
        for part in (
            "● connected",
            "alpha-1 (soldier)",
            "op-dawn",
            "epoch 0, next in 2h12m",
            "token ✓ ok",
            "links 1",
        ):
            assert part in status
        peers = app.screen.query_one(PeersPanel)
        assert peers.row_count == 4
        rows = {str(peers.get_row_at(i)[0]) for i in range(4)}
        assert rows == {"○ alpha-2", "✖ bravo-9", "● gs-1", "◐ uav-1"}
        uav = peers.get_row("uav-1")
        assert [str(c) for c in uav[2:6]] == ["via gs-1", "12s", "47%", "9m00s"]
        assert str(peers.get_row("bravo-9")[5]) == "—"
        chats = option_texts(app.screen.query_one(ConversationList))
        assert chats == [" ○ alpha-2", " ✖ bravo-9", " ● gs-1 (1)", " ◐ uav-1 (1)", " # squad (1)"]
        alerts = option_texts(app.screen.query_one(AlertsPanel))
        assert "⚠ EXPIRING uav-1" in alerts[0] and "✖ REFUSED bravo-9" in alerts[1]
        assert "No conversation open" in log_text(app)


async def test_enter_on_a_peer_opens_its_chat(socket_path: Path) -> None:
    async with FakeAgent(socket_path), make_app(socket_path).run_test(size=(120, 40)) as pilot:
        await loaded(pilot)
        app = pilot.app
        await pilot.press("f2", "down", "down", "enter")  # alpha-2, bravo-9, gs-1
        await wait_until(pilot, lambda: app.state.active == GS1, "gs-1 to open")
        assert isinstance(app.focused, ChatInput)
        assert app.screen.query_one(ChatLog).border_title == "gs-1 (ground-station) ● direct"
        text = log_text(app)
        assert "Rally at checkpoint C, 1000Z." in text and "Bridge clear?" in text
        assert "✓✓ read" in text


async def test_enter_on_a_group_opens_the_group_chat(socket_path: Path) -> None:
    async with FakeAgent(socket_path), make_app(socket_path).run_test(size=(120, 40)) as pilot:
        await loaded(pilot)
        app = pilot.app
        await pilot.press("f3", "end", "enter")
        await wait_until(pilot, lambda: app.state.active == SQUAD, "squad to open")
        assert app.screen.query_one(ChatLog).border_title == "# squad: alpha-1, alpha-2, gs-1"
        text = log_text(app)
        assert "Radio check." in text and "Same here, five by five." in text
        assert option_texts(app.screen.query_one(ConversationList))[-1] == "▸# squad"


async def test_sent_message_is_pending_then_delivered_then_read(socket_path: Path) -> None:
    async with FakeAgent(socket_path) as agent, make_app(socket_path).run_test() as pilot:
        await loaded(pilot)
        app = pilot.app
        app.post_message(ConversationSelected(GS1))
        await wait_until(pilot, lambda: app.state.active == GS1, "gs-1 to open")
        await pilot.press(*"Bridge is clear", "enter")
        request = await agent.wait_for_request("send", to="gs-1", text="Bridge is clear")
        assert "group" not in request

        def sent() -> Delivery | None:
            return next(
                (m.state for m in app.state.history(GS1) if m.text == "Bridge is clear"), None
            )

        await wait_until(pilot, lambda: sent() is Delivery.PENDING, "the pending message")
        assert "Bridge is clear" in log_text(app) and "◷ pending" in log_text(app)
        message_id = agent.messages[-1]["id"]
        await agent.receipt(message_id, "delivered")
        await wait_until(pilot, lambda: sent() is Delivery.DELIVERED, "the delivered tick")
        last_line = next(line for line in log_text(app).splitlines() if "Bridge is clear" in line)
        assert last_line.rstrip().endswith("✓✓")
        await agent.receipt(message_id, "read")
        await wait_until(pilot, lambda: sent() is Delivery.READ, "the read tick")
        await agent.receipt(message_id, "delivered")  # late and out of order: ignored
        await pilot.pause(0.05)
        assert sent() is Delivery.READ


async def test_message_for_an_offline_mate_shows_pending(socket_path: Path) -> None:
    async with FakeAgent(socket_path), make_app(socket_path).run_test() as pilot:
        await loaded(pilot)
        await pilot.press("f3", "enter")  # alpha-2 is first and offline
        app = pilot.app
        await wait_until(pilot, lambda: app.state.active == Conversation("peer", "alpha-2"), "open")
        line = next(s for s in log_text(app).splitlines() if "Where are you?" in s)
        assert "◷ pending" in line
        assert "○ offline" in app.screen.query_one(ChatLog).border_title


async def test_unread_counts_rise_and_reset_with_mark_read(socket_path: Path) -> None:
    async with FakeAgent(socket_path) as agent, make_app(socket_path).run_test() as pilot:
        await loaded(pilot)
        app = pilot.app
        chats = app.screen.query_one(ConversationList)
        assert app.state.unread(UAV1) == 1
        await agent.incoming("uav-1", "Vehicle moving north.")
        await wait_until(pilot, lambda: app.state.unread(UAV1) == 2, "a second unread")
        assert " ◐ uav-1 (2)" in option_texts(chats)
        assert chats.border_title == "Chats (4 unread)"
        assert not any(r["op"] == "mark_read" for r in agent.requests)
        await pilot.press("f3", "down", "down", "down", "enter")
        await wait_until(pilot, lambda: app.state.active == UAV1, "uav-1 to open")
        assert app.state.unread(UAV1) == 0
        await agent.wait_for_request("mark_read", peer="uav-1")
        await wait_until(pilot, lambda: "▸◐ uav-1" in option_texts(chats)[3], "badge gone")
        assert option_texts(chats)[3] == "▸◐ uav-1"
        assert all(
            m["read"] for m in agent.messages if m["peer"] == "uav-1" and m["direction"] == "in"
        )


async def test_message_into_the_open_chat_is_marked_read(socket_path: Path) -> None:
    async with FakeAgent(socket_path) as agent, make_app(socket_path).run_test() as pilot:
        await loaded(pilot)
        app = pilot.app
        await pilot.press("f3", "end", "enter")
        await wait_until(pilot, lambda: app.state.active == SQUAD, "squad to open")
        await agent.wait_for_request("mark_read", group="squad")
        before = sum(1 for r in agent.requests if r["op"] == "mark_read")
        await agent.incoming("gs-1", "Move out.", group="squad")
        await wait_until(
            pilot,
            lambda: sum(1 for r in agent.requests if r["op"] == "mark_read") == before + 1,
            "a second mark_read",
        )
        assert app.state.unread(SQUAD) == 0
        assert "Move out." in log_text(app)


async def test_input_history_walks_up_and_down_and_keeps_the_draft(socket_path: Path) -> None:
    async with FakeAgent(socket_path), make_app(socket_path).run_test() as pilot:
        await loaded(pilot)
        await pilot.press("f3", "enter")
        chat_input = pilot.app.screen.query_one(ChatInput)
        await wait_until(pilot, lambda: pilot.app.focused is chat_input, "the input to focus")
        await pilot.press(*"one", "enter", *"two", "enter", *"dra")
        assert chat_input.history == ["one", "two"]
        steps = []
        for key in ("up", "up", "up", "down", "down", "down"):
            await pilot.press(key)
            steps.append(chat_input.value)
        assert steps == ["two", "one", "one", "two", "dra", "dra"]


async def test_dismissing_alerts_tells_the_agent_and_hides_the_empty_panel(
    socket_path: Path,
) -> None:
    async with FakeAgent(socket_path) as agent, make_app(socket_path).run_test() as pilot:
        await loaded(pilot)
        app = pilot.app
        panel = app.screen.query_one(AlertsPanel)
        await pilot.press("f4")
        assert app.focused is panel
        await pilot.press("d")  # the newest first: alert 2
        await agent.wait_for_request("dismiss_alert", alert_id=2)
        await wait_until(pilot, lambda: len(app.state.alerts) == 1, "one alert left")
        assert panel.option_count == 1 and panel.display
        await pilot.press("delete")
        await agent.wait_for_request("dismiss_alert", alert_id=1)
        await wait_until(pilot, lambda: not panel.display, "the panel to hide")
        assert agent.alerts == []


async def test_new_alert_appears_with_time_kind_and_peer(socket_path: Path) -> None:
    async with FakeAgent(socket_path) as agent, make_app(socket_path).run_test() as pilot:
        await loaded(pilot)
        app = pilot.app
        await agent.raise_alert("revoked", "alpha-2", "alpha-2 was revoked by the desk")
        await wait_until(pilot, lambda: len(app.state.alerts) == 3, "the new alert")
        newest = option_texts(app.screen.query_one(AlertsPanel))[0]
        assert newest.startswith("09:47 ⊘ REVOKED alpha-2  alpha-2 was revoked")
        assert any("revoked by the desk" in n for n in notifications(app))


async def test_a_repeated_alert_updates_its_line_with_a_count_and_pops_up_once(
    socket_path: Path,
) -> None:
    """The agent updates an alert whose cause came again (``repeats``, the latest ``at``):
    its line shows the count and moves to the top, and no toast pops up for a repeat."""
    async with FakeAgent(socket_path) as agent, make_app(socket_path).run_test() as pilot:
        await loaded(pilot)
        app = pilot.app
        oldest = agent.alerts[0]  # the stranger bravo-9's refusal, 150 s ago
        for repeats in (1, 2):
            again = {**oldest, "repeats": repeats, "at": agent.now - 10 + repeats}
            await agent.push({"event": "alert", "alert": again})
        await wait_until(
            pilot, lambda: app.state.alerts[-1].repeats == 2, "the alert's second repeat"
        )
        assert len(app.state.alerts) == 2
        newest = option_texts(app.screen.query_one(AlertsPanel))[0]
        assert "bravo-9" in newest and newest.endswith("  (3 times)")
        assert not any("bravo-9 holds no keyset" in n for n in notifications(app))


async def test_help_screen_opens_and_closes(socket_path: Path) -> None:
    async with FakeAgent(socket_path), make_app(socket_path).run_test() as pilot:
        await loaded(pilot)
        await pilot.press("f1")
        assert isinstance(pilot.app.screen, HelpScreen)
        await pilot.press("escape")
        assert isinstance(pilot.app.screen, MainScreen)
        await pilot.press("question_mark")  # from a list, not the input
        assert isinstance(pilot.app.screen, HelpScreen)
        await pilot.press("f1")
        assert isinstance(pilot.app.screen, MainScreen)


async def test_command_palette_opens_a_chat(socket_path: Path) -> None:
    async with FakeAgent(socket_path), make_app(socket_path).run_test() as pilot:
        await loaded(pilot)
        app = pilot.app
        await pilot.press("ctrl+p")
        await wait_until(pilot, lambda: isinstance(app.screen, CommandPalette), "the palette")
        await pilot.press(*"open chat with uav")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.state.active == UAV1, "uav-1 via the palette")


async def test_layout_stays_usable_at_80x24_and_120x40(socket_path: Path) -> None:
    async with FakeAgent(socket_path), make_app(socket_path).run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("f3", "down", "down", "enter")
        screen = pilot.app.screen
        for width, height in ((80, 24), (120, 40), (80, 24)):
            await pilot.resize_terminal(width, height)
            await pilot.pause(0.1)
            assert screen.has_class("-narrow" if width < 100 else "-wide")
            peers, log = screen.query_one(PeersPanel), screen.query_one(ChatLog)
            chat_input, alerts = screen.query_one(ChatInput), screen.query_one(AlertsPanel)
            chats = screen.query_one(ConversationList)
            assert peers.region.height >= 5  # title, header and at least three mates
            assert log.region.height >= 4
            assert chats.region.height >= 5 and chats.region.width >= 20
            assert chat_input.region.height == 3 and alerts.region.height >= 2
            bottom = max(w.region.bottom for w in (peers, log, chat_input, alerts, chats))
            assert bottom <= height - 1  # nothing under the footer or off screen
            assert log.region.right <= width


async def test_reconnects_after_the_agent_restarts_and_says_so(socket_path: Path) -> None:
    agent = FakeAgent(socket_path)
    await agent.start()
    try:
        async with make_app(socket_path).run_test() as pilot:
            await loaded(pilot)
            app = pilot.app
            await agent.stop()
            await wait_until(
                pilot, lambda: app.state.connection is Connection.DISCONNECTED, "the loss"
            )
            assert "✖ disconnected, reconnecting…" in status_text(app)
            assert len(app.state.peers) == 4  # the last known state stays on screen
            assert app.screen.has_class("-offline")
            await pilot.pause(0.3)  # several failed attempts: still no crash
            assert "retrying in" in status_text(app)
            await agent.incoming("gs-1", "Sent while you were away.")  # queued in the agent
            await agent.start()
            await wait_until(
                pilot, lambda: app.state.connection is Connection.RECONNECTED, "the reconnection"
            )
            assert "● reconnected" in status_text(app)
            assert "Reconnected to the agent." in notifications(app)
            assert app.state.unread(GS1) == 2
            await agent.incoming("uav-1", "Events flow again.")
            await wait_until(pilot, lambda: app.state.unread(UAV1) == 2, "events after reconnect")
    finally:
        await agent.stop()


async def test_unreachable_agent_at_start_is_a_message_not_a_crash(socket_path: Path) -> None:
    async with make_app(socket_path).run_test() as pilot:
        app = pilot.app
        await wait_until(pilot, lambda: "retrying in" in status_text(app), "the retry notice")
        assert "◌ connecting…" in status_text(app)
        assert f"no agent socket at {socket_path}" in status_text(app)
        async with FakeAgent(socket_path):
            await loaded(pilot)
            assert status_text(app).startswith("● connected")


async def test_peer_and_epoch_events_update_the_panels(socket_path: Path) -> None:
    async with FakeAgent(socket_path) as agent, make_app(socket_path).run_test() as pilot:
        await loaded(pilot)
        app = pilot.app
        peers = app.screen.query_one(PeersPanel)
        await agent.update_peer("alpha-2", state="direct", last_seen=FIXED_NOW - 2, battery=12)
        await wait_until(pilot, lambda: str(peers.get_row("alpha-2")[0]) == "● alpha-2", "link")
        assert [str(c) for c in peers.get_row("alpha-2")[2:5]] == ["direct", "2s", "12%"]
        await wait_until(pilot, lambda: "links 2" in status_text(app), "hello to be refetched")
        await agent.next_epoch()
        await wait_until(pilot, lambda: "epoch 1 → 8h12m" in status_text(app), "epoch 1")


async def test_lagged_event_refetches_everything(socket_path: Path) -> None:
    async with FakeAgent(socket_path) as agent, make_app(socket_path).run_test() as pilot:
        await loaded(pilot)
        app = pilot.app
        agent.peers["bravo-9"].update(state="offline", refused_reason=None)  # no event: "lost"
        await agent.lag()
        await wait_until(
            pilot,
            lambda: app.state.peer("bravo-9").state.value == "offline",  # type: ignore[union-attr]
            "the refetch",
        )


async def test_a_bundle_from_the_as_refetches_everything(socket_path: Path) -> None:
    """``agent --as`` took a new bundle: a mate may be gone, so peers come again in full."""
    async with FakeAgent(socket_path) as agent, make_app(socket_path).run_test() as pilot:
        await loaded(pilot)
        app = pilot.app
        del agent.peers["bravo-9"]  # revoked at the AS: no peer event tells
        await agent.push({"event": "bundle", "keysets": 4, "mates": 2, "at": FIXED_NOW})
        await wait_until(pilot, lambda: app.state.peer("bravo-9") is None, "the refetch")


async def test_an_open_conversation_with_a_dropped_mate_and_no_history_is_closed_once(
    socket_path: Path,
) -> None:
    """It used to warn "unknown-peer" again at every refetch."""
    bravo = Conversation("peer", "bravo-9")
    async with FakeAgent(socket_path) as agent, make_app(socket_path).run_test() as pilot:
        await loaded(pilot)
        app = pilot.app
        app.post_message(ConversationSelected(bravo))
        await wait_until(pilot, lambda: app.state.active == bravo, "bravo-9 open")
        del agent.peers["bravo-9"]
        for _ in range(3):  # a new bundle, then two lags: three refetches
            await agent.push({"event": "bundle", "keysets": 4, "mates": 2, "at": FIXED_NOW})
            await wait_until(pilot, lambda: app.state.peer("bravo-9") is None, "the refetch")
            await pilot.pause(0.2)
        assert app.state.active is None
        said = [n for n in notifications(app) if "bravo-9" in n and "history" in n]
        assert said == [
            "bravo-9 is no longer in the bundle and has no history: closed the conversation."
        ]
        # a former mate's history stays readable (the agent answers it, as the real one does)
        gs1 = agent.peers.pop("gs-1")
        assert gs1
        app.post_message(ConversationSelected(GS1))
        await wait_until(pilot, lambda: app.state.active == GS1, "gs-1 open")
        await agent.lag()
        await pilot.pause(0.3)
        assert app.state.active == GS1
        assert not [n for n in notifications(app) if "gs-1" in n and "history" in n]


async def test_malformed_event_is_reported_and_the_link_survives(socket_path: Path) -> None:
    async with FakeAgent(socket_path) as agent, make_app(socket_path).run_test() as pilot:
        await loaded(pilot)
        app = pilot.app
        await agent.push({"event": "peer", "peer": {"identity": 7, "state": "direct"}})
        await agent.push({"event": "future-thing", "x": 1})  # unknown events are ignored
        await agent.incoming("gs-1", "Still here.")
        await wait_until(pilot, lambda: app.state.unread(GS1) == 2, "the next good event")
        assert app.state.connection is Connection.CONNECTED
        assert any("malformed event" in n for n in notifications(app))


async def test_send_without_agent_keeps_the_text_and_says_why(socket_path: Path) -> None:
    agent = FakeAgent(socket_path)
    await agent.start()
    async with make_app(socket_path).run_test() as pilot:
        await loaded(pilot)
        app = pilot.app
        await pilot.press("f3", "enter")
        await wait_until(pilot, lambda: app.state.active is not None, "a chat to open")
        await agent.stop()
        await wait_until(pilot, lambda: not app.state.online, "the loss")
        await pilot.press(*"hello?", "enter")
        await wait_until(
            pilot, lambda: any("Not connected" in n for n in notifications(app)), "the error"
        )
        await pilot.press("up")
        assert app.screen.query_one(ChatInput).value == "hello?"


async def test_a_mates_time_past_the_calendar_shows_as_unknown_not_a_crash(
    socket_path: Path,
) -> None:
    """A chat's time is its sender's clock; one in milliseconds (year 58,000) crashed the app."""
    async with FakeAgent(socket_path) as agent, make_app(socket_path).run_test() as pilot:
        await loaded(pilot)
        app = pilot.app
        await pilot.press("f2", "down", "down", "enter")  # gs-1
        await wait_until(pilot, lambda: app.state.active == GS1, "gs-1 to open")
        for at in (FIXED_NOW * 1000, -FIXED_NOW * 1000):
            message = await agent.incoming("gs-1", f"sent at {at}")
            message["at"] = at
            await agent.push({"event": "message", "message": message})
        await wait_until(pilot, lambda: "sent at -" in log_text(app), "both messages")
        assert app.is_running
        assert log_text(app).count("—") >= 2


async def test_a_mate_or_alert_listed_twice_by_the_agent_is_shown_once_not_a_crash(
    socket_path: Path,
) -> None:
    """The peers table and the alerts list are keyed by identity and id: a duplicate in the
    agent's answer raised DuplicateKey while drawing and took the app down."""
    agent = FakeAgent(socket_path)
    peers, alerts = agent._op_peers, agent._op_alerts
    agent._op_peers = lambda *a: {"peers": [*peers(*a)["peers"], agent.peers["gs-1"]]}
    agent._op_alerts = lambda *a: {"alerts": alerts(*a)["alerts"] * 2}
    async with agent, make_app(socket_path).run_test() as pilot:
        await loaded(pilot)
        await pilot.pause(0.2)
        app = pilot.app
        assert app.is_running
        assert app.screen.query_one(PeersPanel).row_count == 4
        assert [a.alert_id for a in app.state.alerts] == [1, 2]
        assert app.screen.query_one(AlertsPanel).option_count == 2


async def test_past_the_missions_end_the_status_bar_says_so(socket_path: Path) -> None:
    """The agent sends no epoch event once there is none: the bar kept "epoch 0, next in
    expired" after the mission ended, until something made the app ask again."""
    async with FakeAgent(socket_path) as agent:
        end = agent.mission_start + 24 * 3600
        app = SnrmeshApp(socket_path, clock=lambda: end + 1, retry=FAST_RETRY)
        async with app.run_test(size=(120, 40)) as pilot:
            await loaded(pilot)
            status = status_text(app)
            assert "mission over" in status and "epoch" not in status, status
