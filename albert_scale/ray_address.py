"""The address of a Ray cluster, checked before Ray is asked to join it.

``ray.init(address=HOST:PORT)`` with nothing listening there does not fail: it retries for minutes and
prints a warning every few seconds. ``check_reachable`` opens one TCP connection to the address first,
so that a wrong or unreachable address is one line, in seconds. Imports no Ray.
"""

from __future__ import annotations

import os
import socket

TIMEOUT_SECONDS = 5.0
# Values of the address that ray.init resolves itself, with nothing to connect to here.
_RESOLVED_BY_RAY = ("", "auto", "local")


def check_cluster_address(given: str | None, name: str) -> None:
    """``check_reachable`` on the address given by ``name`` or, when none is, on RAY_ADDRESS (which
    ``ray.init`` reads then)."""
    if given:
        check_reachable(given, name)
    else:
        check_reachable(os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS")


def check_reachable(address: str | None, name: str, *, timeout: float = TIMEOUT_SECONDS) -> None:
    """Raises ValueError naming ``name`` (the option or key that gave the address) when ``HOST:PORT``
    (or ``ray://HOST:PORT``, a Ray Client server) does not accept a TCP connection within ``timeout``
    seconds. ``auto``, ``local``, no address and an address without a port are left to Ray."""
    target = (address or "").strip().removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if target in _RESOLVED_BY_RAY or not sep or "/" in target:
        return
    if not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError(f"{name}={address!r}: expected HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        if isinstance(err, TimeoutError):
            reason = f"no answer within {timeout:g} s"
        raise ValueError(f"{name}={address!r}: cannot reach the Ray cluster ({reason.lower()})") from None
