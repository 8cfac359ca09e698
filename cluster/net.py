"""Pick free TCP ports on the loopback interface.

Several Ray heads, Prometheus and Redis instances may run side by side on one machine (tests,
several users), so nothing here hard-codes a port: every port is asked from the kernel.
A port is free when we ask; another process may still take it before we bind it, so callers
start their servers soon after picking.
"""

from __future__ import annotations

import contextlib
import random
import socket

LOOPBACK = "127.0.0.1"


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """True if ``host:port`` can be bound right now (TCP) by a server that sets ``SO_REUSEADDR``, as
    Ray's gRPC servers, Prometheus and Redis do: a listener holds the port, connections of a server
    that just stopped (TIME_WAIT, ~60 s after ``retort down``) do not."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    # also require the wildcard address to be free: Ray binds several servers to 0.0.0.0
    if host != "0.0.0.0":
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                return False
    return True


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on every interface (sockets held open until all are picked).

    Binding the wildcard address makes sure the port is free for servers that bind 0.0.0.0
    (Ray's) as well as for those bound to 127.0.0.1.
    """
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("0.0.0.0", 0))
            ports.append(s.getsockname()[1])
        return ports


def free_port() -> int:
    """One free TCP port (free on 127.0.0.1 and on the wildcard address)."""
    return free_ports(1)[0]


def free_port_range(size: int, low: int = 20000, high: int = 32000, tries: int = 200) -> tuple[int, int]:
    """A block ``[start, start + size - 1]`` of ports that are all free now (for Ray's worker ports).

    The kernel hands out single ephemeral ports, so a contiguous block is found by sampling
    random starts below Linux's ephemeral range (32768-60999) and checking every port of the block.
    """
    rng = random.Random()
    for _ in range(tries):
        start = rng.randrange(low, high - size)
        if all(port_is_free(p) for p in range(start, start + size)):
            return start, start + size - 1
    raise OSError(f"no block of {size} free ports found in [{low}, {high})")
