"""A NATS client (or route) that speaks the protocol without TLS, to check a server refuses it."""

import json
import socket


def plain_exchange(host: str, port: int) -> tuple[dict, bytes]:
    """The server's INFO, and all it answers a plain CONNECT + PING with before it closes the
    connection (a server that requires TLS answers nothing: it expected a TLS handshake)."""
    with socket.create_connection((host, port), timeout=5) as s:
        info = json.loads(s.makefile("rb").readline().split(b" ", 1)[1])
        s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
        answer = b""
        try:
            while chunk := s.recv(4096):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return info, answer


async def round_trip(nc) -> None:
    """Return once the server has processed everything `nc` sent before the call (a SUB just made,
    a PUB). nats-py's `flush()` alone is not that barrier: it writes its PING straight to the
    socket, ahead of commands still queued for its flusher task, so the PONG can come back before
    the server has seen a SUB made just before — and a message published right after is lost to
    it. The first flush lets the flusher write what was queued (it runs while the PING is out);
    the second PING follows it on the socket, so its PONG means the server has the rest."""
    await nc.flush()
    await nc.flush()
