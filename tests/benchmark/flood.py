"""Flood one worker with unsigned 256 KiB bodies beside DT's signed deliveries: the worker's memory and their p99.

Run by hand, never in CI: `python tests/benchmark/flood.py` (about ten seconds; no PostgreSQL). It starts the
Procfile's server with one worker (WEB_CONCURRENCY=1) on 127.0.0.1, warms it with signed deliveries, reads the
worker's idle resident set from /proc, and then opens `--connections` connections at once, each sending a body of
`--body-bytes` with no valid token (half with none, half signed with another secret): all but its last kilobyte at
once, the rest `--hold` seconds later, as bodies arriving over slow links overlap in a worker. Meanwhile `--senders`
keep-alive connections send DT's correctly signed deliveries one after another, as the router relays them, and
time each. The worker's resident set is sampled every 10 ms throughout. The report gives the worker's idle and
peak resident set, what the flood was answered, and the signed deliveries' answers and p50, p99 and slowest times.
Every loop is bounded in count and in time (`--seconds`).
"""

import argparse
import asyncio
import http.client
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent)]  # the receiver, and the tests' support modules
from support.server import Server  # noqa: E402
from support.signing import SECRET  # noqa: E402

from receiver.sample import encode_body, sample_event, sign_body  # noqa: E402
from receiver.webhook import MAX_BODY_BYTES  # noqa: E402

SAMPLE_SECONDS = 0.01
WRONG_SECRET = "another-secret-than-the-receivers-0123456789"


def arguments() -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000, help="flooding connections, all at once")
    parser.add_argument("--body-bytes", type=int, default=MAX_BODY_BYTES, help="each flooding body's size")
    parser.add_argument("--senders", type=int, default=4, help="keep-alive connections sending signed deliveries")
    parser.add_argument("--hold", type=float, default=2.0, help="seconds before each body's last kilobyte")
    parser.add_argument("--seconds", type=float, default=60, help="the longest the flood may take")
    return parser.parse_args()


def worker_pid(server: Server) -> int:
    """Return the process id of the server's one worker: the gunicorn master's child."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
        if len(children) == 1:
            return int(children[0])
        time.sleep(0.1)
    raise RuntimeError("the server did not settle on one worker within 15 s")


def resident_mb(pid: int, field: str = "VmRSS") -> float:
    """Return a process's resident set (or, with VmHWM, its peak) in MB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise LookupError(field)


class Sampler(threading.Thread):
    """Read a process's resident set every 10 ms until stopped; keep the largest."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_mb, self.stopped = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(SAMPLE_SECONDS):
            self.peak_mb = max(self.peak_mb, resident_mb(self.pid))


class Sender(threading.Thread):
    """Send signed deliveries one after another on one keep-alive connection until stopped; time each."""

    def __init__(self, port: int, number: int):
        super().__init__(daemon=True)
        self.port, self.number, self.stopped = port, number, threading.Event()
        self.seconds: list[float] = []
        self.answers: Counter = Counter()

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        for sent in range(100_000):
            if self.stopped.is_set():
                break
            body = encode_body(sample_event("temperature", event_id=f"flood-{self.number}-{sent:06d}"))
            headers = {"Content-Type": "application/json", "X-Dt-Signature": sign_body(body, SECRET)}
            started = time.monotonic()
            try:
                connection.request("POST", "/", body, headers)
                answer = connection.getresponse()
                answer.read()
                self.answers[answer.status] += 1
            except (OSError, http.client.HTTPException) as error:
                self.answers[type(error).__name__] += 1
                connection.close()
            self.seconds.append(time.monotonic() - started)
        connection.close()


async def send_unsigned(port: int, number: int, body: bytes, hold: float) -> str:
    """Send one request with a large body and no valid token; return its status, or how the connection ended."""
    token = sign_body(body, WRONG_SECRET) if number % 2 else None
    head = (f"POST / HTTP/1.1\r\nHost: flood\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            + (f"X-Dt-Signature: {token}\r\n" if token else "") + "\r\n").encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body[:-1024])
        await writer.drain()
        await asyncio.sleep(hold)
        writer.write(body[-1024:])
        await writer.drain()
    except ConnectionError:
        pass  # refused before the body was read, and closed: the answer may still be there to read
    try:
        line = await reader.readline()
        return line.split()[1].decode() if line else "closed without an answer"
    except ConnectionError:
        return "connection reset, no answer read"
    finally:
        writer.close()


async def flood(port: int, connections: int, body_bytes: int, hold: float, seconds: float) -> Counter:
    """Run every flooding connection at once; return how each ended."""
    body = b"x" * body_bytes

    async def bounded(number: int) -> str:
        try:
            return await asyncio.wait_for(send_unsigned(port, number, body, hold), seconds)
        except TimeoutError:
            return f"no answer within {seconds:g} s"
        except OSError as error:
            return type(error).__name__

    return Counter(await asyncio.gather(*(bounded(number) for number in range(connections))))


def flood_in_a_process(port: int, args: argparse.Namespace, results: multiprocessing.Queue) -> None:
    """Run the flood in its own process, so its sockets do not slow the senders' timing threads."""
    results.put(asyncio.run(flood(port, args.connections, args.body_bytes, args.hold, args.seconds)))


def warm_up(port: int) -> None:
    """Send a few hundred signed deliveries, so the idle figure is that of a worker that has served some."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for sent in range(300):
        body = encode_body(sample_event("temperature", event_id=f"warm-{sent:06d}"))
        connection.request("POST", "/", body, {"X-Dt-Signature": sign_body(body, SECRET)})
        connection.getresponse().read()
    connection.close()


def run(server: Server, args: argparse.Namespace) -> dict:
    """Warm the worker, measure it idle, flood it beside the senders, and return the figures."""
    pid = worker_pid(server)
    warm_up(server.port)
    time.sleep(1)
    idle_mb = resident_mb(pid)
    sampler, senders = Sampler(pid), [Sender(server.port, number) for number in range(args.senders)]
    for thread in (sampler, *senders):
        thread.start()
    time.sleep(0.5)
    started = time.monotonic()
    results = multiprocessing.Queue()
    flooder = multiprocessing.Process(target=flood_in_a_process, args=(server.port, args, results))
    flooder.start()
    flood_answers = results.get(timeout=args.seconds + 30)
    flooder.join(10)
    flood_seconds = time.monotonic() - started
    time.sleep(0.5)
    for thread in (sampler, *senders):
        thread.stopped.set()
        thread.join(15)
    return {"idle_mb": idle_mb, "peak_mb": sampler.peak_mb, "hwm_mb": resident_mb(pid, "VmHWM"),
            "after_mb": resident_mb(pid), "flood": flood_answers, "flood_seconds": flood_seconds,
            "seconds": sorted(s for sender in senders for s in sender.seconds),
            "answers": sum((sender.answers for sender in senders), Counter())}


def report(figures: dict, args: argparse.Namespace) -> str:
    """Return the figures as a few lines of text."""
    seconds = figures["seconds"]
    p99 = statistics.quantiles(seconds, n=100)[98] if len(seconds) >= 2 else float("nan")
    return "\n".join([
        f"flood: {args.connections} connections, {args.body_bytes} bytes each, no valid token, "
        f"over {figures['flood_seconds']:.1f} s; answered {dict(figures['flood'])}",
        f"worker resident set: idle {figures['idle_mb']:.1f} MB, peak sampled {figures['peak_mb']:.1f} MB "
        f"(+{figures['peak_mb'] - figures['idle_mb']:.1f} MB), peak since start (VmHWM) {figures['hwm_mb']:.1f} MB, "
        f"after {figures['after_mb']:.1f} MB",
        f"signed deliveries alongside: {len(seconds)} on {args.senders} keep-alive connections, answered "
        f"{dict(figures['answers'])}; p50 {statistics.median(seconds) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
        f"slowest {max(seconds) * 1000:.0f} ms",
    ])


def main() -> None:
    args = arguments()
    with tempfile.TemporaryDirectory() as folder:
        server = Server(Path(folder) / "server.log", DT_SIGNATURE_SECRET=SECRET, WEB_CONCURRENCY="1")
        server.env.update(GUNICORN_CMD_ARGS=f"--bind 127.0.0.1:{server.port}")
        server.start()
        try:
            print(report(run(server, args), args))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
