"""A loopback TCP forwarder that can go silent (a network partition the tests switch on and off) or slow."""

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Blackhole:
    """Forwards each connection on a free loopback port to an upstream address, or swallows its bytes silently."""

    def __init__(self, upstream_host: str, upstream_port: int, answer_delay: float = 0.0):
        self.upstream = (upstream_host, upstream_port)
        self.answer_delay = answer_delay  # seconds each read from upstream waits before it is passed on
        self.swallowing = False
        self._links: list[Link] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="blackhole", daemon=True).start()

    def swallow(self) -> None:
        """Stop forwarding: every byte is read and dropped, no connection is closed, new ones are accepted and ignored."""
        self.swallowing = True

    def forward(self) -> None:
        """Forward again; connections that lost bytes meanwhile are closed, as TCP gives up on them after a partition."""
        self.swallowing = False
        with self._lock:
            broken = [link for link in self._links if link.lost_bytes or link.upstream is None]
            self._links = [link for link in self._links if link not in broken]
        for link in broken:
            link.close()

    @contextmanager
    def silenced(self) -> Iterator[None]:
        """Swallow traffic for the block; forwarding resumes however the block ends."""
        self.swallow()
        try:
            yield
        finally:
            self.forward()

    def close(self) -> None:
        """Stop listening and close every connection."""
        self._listener.close()
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = None
            if not self.swallowing:
                try:
                    upstream = socket.create_connection(self.upstream, timeout=5)
                    upstream.settimeout(None)
                except OSError:
                    client.close()
                    continue
            link = Link(self, client, upstream)
            with self._lock:
                self._links.append(link)
            link.start()


class Link:
    """One client connection and its upstream connection (None if it arrived while swallowing)."""

    def __init__(self, blackhole: Blackhole, client: socket.socket, upstream: socket.socket | None):
        self.blackhole = blackhole
        self.client = client
        self.upstream = upstream
        self.lost_bytes = False

    def start(self) -> None:
        """Pump bytes both ways, each in its own thread."""
        threading.Thread(target=self._pump, args=(self.client, self.upstream), daemon=True).start()
        if self.upstream is not None:
            threading.Thread(target=self._pump, args=(self.upstream, self.client, self.blackhole.answer_delay),
                             daemon=True).start()

    def close(self) -> None:
        """Close both sockets."""
        for end in (self.client, self.upstream):
            if end is not None:
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                end.close()

    def _pump(self, source: socket.socket, destination: socket.socket | None, delay: float = 0.0) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            if delay:
                time.sleep(delay)  # a database farther away: each of its answers takes this much longer
            if self.blackhole.swallowing or destination is None:
                self.lost_bytes = self.lost_bytes or bool(data)
                if not data:
                    return  # an end closed during the partition: the other end must not hear of it
                continue
            if not data:
                self.close()
                return
            try:
                destination.sendall(data)
            except OSError:
                self.close()
                return
