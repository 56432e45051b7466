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
