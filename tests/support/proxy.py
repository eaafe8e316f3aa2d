"""A TCP proxy in front of a real server that cuts a client's connection right after forwarding a chosen
command (the server runs it, the client never sees the reply: a connection drop at the worst moment), or
freezes (forwards nothing, closes nothing: a half-open connection)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import attrs


@attrs.define
class Cutter:
    trigger: bytes = b""  # bytes of a command (as RESP) after which the connection is cut
    cuts_left: int = 1
    frozen: threading.Event = attrs.Factory(threading.Event)  # set: nothing is forwarded (a hung peer)
    cuts: int = 0
    lock: threading.Lock = attrs.Factory(threading.Lock)

    def should_cut(self, data: bytes) -> bool:
        with self.lock:
            if self.trigger and self.cuts_left and self.trigger in data:
                self.cuts_left -= 1
                self.cuts += 1
                return True
            return False


def _pump(src: socket.socket, dst: socket.socket, cutter: Cutter, cuts: bool) -> None:
    try:
        while data := src.recv(65536):
            while cutter.frozen.is_set():
                threading.Event().wait(0.05)
            dst.sendall(data)
            if cuts and cutter.should_cut(data):
                # Let the server run it and answer into the void, then drop both sides.
                threading.Event().wait(0.2)
                break
    except OSError:
        pass
    for s in (src, dst):
        with suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()


@contextmanager
def cutting_proxy(upstream_port: int, cutter: Cutter) -> Iterator[int]:
    """Listen on a free loopback port (yielded); forward to 127.0.0.1:upstream_port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            server = socket.create_connection(("127.0.0.1", upstream_port))
            threading.Thread(target=_pump, args=(client, server, cutter, True), daemon=True).start()
            threading.Thread(target=_pump, args=(server, client, cutter, False), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()
