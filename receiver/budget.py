"""What the bodies of a worker's deliveries in flight may hold together: each reserves its size before it is read."""

import threading

from .errors import UnavailableError


class BodyBudget:
    """A byte budget shared by a worker's concurrent requests; a request beyond it is answered 503 to retry.

    A worker serves up to a thousand connections at once: without a bound, signed bodies arriving together
    (a replayed token, say) could make it hold a thousand times the largest body and exceed the dyno's memory.
    """

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.reserved_bytes = 0
        self._lock = threading.Lock()  # a gevent lock in a worker; an OS thread's in the tests' test client

    def reserve(self, size: int) -> None:
        """Reserve room for a body of this size, or raise UnavailableError if the budget cannot hold it now."""
        with self._lock:
            if self.reserved_bytes + size > self.limit_bytes:
                raise UnavailableError(f"too many bodies in flight (over {self.limit_bytes // 2**20} MB): retry later")
            self.reserved_bytes += size

    def release(self, size: int) -> None:
        """Give back what a reservation took, once its body is no longer held."""
        with self._lock:
            self.reserved_bytes -= size
