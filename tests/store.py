"""An S3 store on loopback that behaves as one across a network does: moto's server (a real S3 API) behind a
proxy that delays every request, counts what the server receives, and can cut connections mid-answer.
Shared by the S3 tests (tests/test_remote.py) and the bench's P4-remote (bench/loops.py)."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
import time
from collections import Counter
from typing import Iterator
from urllib.parse import unquote, urlsplit

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3() -> Iterator[int]:
    """moto's S3 server on a free loopback port (yields the port), with test credentials in the environment
    for as long, where s3fs finds real ones (and stage subprocesses and forked workers inherit them)."""
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # else a line per request
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield port
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class StoreProxy:
    """A TCP proxy on 127.0.0.1 in front of the S3 server at `port`, standing for the network to a store:
    - each request waits `delay_s` before it is passed on (a store's latency; loopback answers at once);
    - each request the server receives is counted in `requests`, per (method, "bucket/key"), a listing as LIST;
    - with `drop_every`, every drop_every-th connection is closed once the server has sent `after` bytes on
      it, mid-answer (a flaky network, a load balancer cutting a stream)."""

    def __init__(self, port: int, delay_s: float = 0.0, drop_every: int = 0, after: int = 6000):
        self.target, self.delay_s, self.drop_every, self.after = port, delay_s, drop_every, after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = self.dropped = 0
        self.requests: Counter = Counter()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def count(self, method: str | None = None, prefix: str = "") -> int:
        """Requests of `method` (None: any) for objects whose "bucket/key" starts with `prefix`."""
        with self.lock:
            return sum(n for (m, k), n in self.requests.items() if method in (None, m) and k.startswith(prefix))

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()

    def close(self):
        self.listener.close()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            server = socket.create_connection(("127.0.0.1", self.target))
            cut = self.drop_every and self.connections % self.drop_every == 0
            threading.Thread(target=self._requests, args=(client, server), daemon=True).start()
            threading.Thread(target=self._answers, args=(server, client, self.after if cut else None),
                             daemon=True).start()

    def _requests(self, client, server):
        """Client to server: each request's head is counted and held `delay_s`, then passed on with its body."""
        pending, body = b"", 0  # bytes received and not passed on; body bytes of the current request to pass on
        with _closing(client, server):
            while data := client.recv(65536):
                pending += data
                while pending:
                    if body:
                        server.sendall(pending[:body])
                        body, pending = body - len(pending[:body]), pending[body:]
                        continue
                    end = pending.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    head, pending = pending[:end + 4], pending[end + 4:]
                    self._count(head)
                    body = int(m.group(1)) if (m := _LENGTH.search(head)) else 0
                    time.sleep(self.delay_s)
                    server.sendall(head)

    def _answers(self, server, client, limit: int | None):
        """Server to client, cut after `limit` bytes (None: never)."""
        sent = 0
        with _closing(server, client):
            while data := server.recv(65536):
                if limit is not None and sent + len(data) > limit:
                    client.sendall(data[:limit - sent])
                    self.dropped += 1
                    return
                client.sendall(data)
                sent += len(data)

    def _count(self, head: bytes) -> None:
        method, target = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[:2]
        url = urlsplit(target)
        key = unquote(url.path).lstrip("/")
        if method == "GET" and ("/" not in key.rstrip("/") or "list-type" in url.query):  # a bucket's listing
            method, key = "LIST", key.rstrip("/")
        with self.lock:
            self.requests[method, key] += 1


@contextlib.contextmanager
def _closing(*sockets):
    """Close both ends when either side closes or fails: the client then sees a dropped connection."""
    try:
        yield
    except OSError:
        pass
    finally:
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
