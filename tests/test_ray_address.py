"""``check_reachable``: a Ray address is tried with one TCP connection before ``ray.init`` is asked to
join it (which would retry for minutes)."""

from __future__ import annotations

import socket

import pytest

from albert_scale.ray_address import check_cluster_address, check_reachable

pytestmark = pytest.mark.unit


def test_a_listening_address_passes_in_every_form():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}", f"localhost:{port}"):
            check_reachable(address, "--ray-address")


@pytest.mark.parametrize("address", [None, "", "auto", "local", "10.0.0.1", "http://127.0.0.1:1/x"])
def test_what_ray_resolves_itself_is_left_to_it(address):
    check_reachable(address, "--ray-address")


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("127.0.0.1:1", "--ray-address='127.0.0.1:1': cannot reach the Ray cluster (connection refused)"),
        ("ray://127.0.0.1:1", "cannot reach the Ray cluster (connection refused)"),
        ("127.0.0.1:http", "--ray-address='127.0.0.1:http': expected HOST:PORT"),
        ("127.0.0.1:70000", "expected HOST:PORT"),
        (":6379", "expected HOST:PORT"),
    ],
)
def test_a_wrong_address_is_one_line_naming_it(address, message):
    with pytest.raises(ValueError) as raised:
        check_reachable(address, "--ray-address")
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_ray_address_from_the_environment_is_named_as_such(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(ValueError, match=r"^RAY_ADDRESS='127.0.0.1:1': cannot reach"):
        check_cluster_address(None, "cluster.address")
    with pytest.raises(ValueError, match=r"^cluster.address='127.0.0.1:2': cannot reach"):
        check_cluster_address("127.0.0.1:2", "cluster.address")
