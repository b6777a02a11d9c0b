"""Distance-vector routing: reachability, split horizon, bounds, link loss."""

from __future__ import annotations

from mesh.agent.routing import Route, RoutingTable


def test_direct_link_is_one_hop() -> None:
    table = RoutingTable("a")
    table.link_up("b")
    assert table.route("b") == Route("b", "b", 1)
    assert table.route("c") is None


def test_line_topology_learns_through_the_middle() -> None:
    a, b, c = RoutingTable("a"), RoutingTable("b"), RoutingTable("c")
    a.link_up("b")
    b.link_up("a")
    b.link_up("c")
    c.link_up("b")
    assert a.update("b", b.advertisement("a"))
    assert c.update("b", b.advertisement("c"))
    assert a.route("c") == Route("c", "b", 2)
    assert c.route("a") == Route("a", "b", 2)


def test_split_horizon_never_advertises_back_to_the_next_hop() -> None:
    a = RoutingTable("a")
    a.link_up("b")
    a.update("b", (("c", 1),))
    assert ("c", 2) not in a.advertisement("b")
    a.link_up("d")
    assert ("c", 2) in a.advertisement("d")


def test_advertisement_replaces_the_previous_one() -> None:
    a = RoutingTable("a")
    a.link_up("b")
    a.update("b", (("c", 1), ("d", 2)))
    assert a.route("d") is not None
    a.update("b", (("c", 1),))
    assert a.route("d") is None


def test_routes_beyond_max_hops_are_dropped_and_self_is_ignored() -> None:
    a = RoutingTable("a", max_hops=3)
    a.link_up("b")
    a.update("b", (("far", 3), ("near", 2), ("a", 1)))
    assert a.route("far") is None
    assert a.route("near") == Route("near", "b", 3)
    assert a.route("a") is None
    assert ("near", 3) not in a.advertisement("x")


def test_link_down_forgets_routes_through_it_and_best_route_wins() -> None:
    a = RoutingTable("a")
    a.link_up("b")
    a.link_up("c")
    a.update("b", (("z", 3),))
    a.update("c", (("z", 1),))
    assert a.route("z") == Route("z", "c", 2)
    a.link_down("c")
    assert a.route("z") == Route("z", "b", 4)
    a.link_down("b")
    assert a.route("z") is None


def test_updates_from_non_neighbours_are_ignored() -> None:
    a = RoutingTable("a")
    assert not a.update("mallory", (("b", 1),))
    assert a.route("b") is None
