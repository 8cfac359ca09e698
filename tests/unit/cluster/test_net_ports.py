"""``port_is_free``: a listener holds a port; a server that just stopped (TIME_WAIT) does not."""

from __future__ import annotations

import socket

from cluster.net import port_is_free


def test_listening_port_is_taken_and_time_wait_is_not():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    assert not port_is_free(port)
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.close()  # the server side closes first: its end of the connection enters TIME_WAIT on `port`
    cli.recv(1)
    cli.close()
    srv.close()
    assert port_is_free(port)  # `retort up` right after `retort down` must not be refused
