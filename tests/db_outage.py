"""PostgreSQL made unreachable for a while: a proxy between a client and the server.

The embedded server listens on a Unix socket (libpq's host=DIRECTORY). The proxy
listens on a socket of the same name in a directory of its own and forwards every
connection to the server. `cut()` drops every connection open through it and refuses
new ones, as a server that stopped does; `restore()` lets connections through again.
"""

from __future__ import annotations

import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict, make_conninfo


class DatabaseProxy:
    def __init__(self, url: str) -> None:
        params = conninfo_to_dict(url)
        port = str(params.get("port") or 5432)
        self._server = Path(str(params["host"])) / f".s.PGSQL.{port}"
        self._directory = tempfile.TemporaryDirectory(prefix="skylab-pgproxy-")
        self.url = make_conninfo(url, host=self._directory.name)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(Path(self._directory.name) / f".s.PGSQL.{port}"))
        self._listener.listen(64)
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._cut = False
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        """Drop every connection and refuse new ones until restore()."""
        with self._lock:
            self._cut = True
            for conn in self._open:
                with suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self._open.clear()

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()
        self._directory.cleanup()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._cut:
                    client.close()
                    continue
                server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    server.connect(str(self._server))
                except OSError:
                    client.close()
                    continue
                self._open |= {client, server}
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        for end in (source, target):
            with suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()
        with self._lock:
            self._open.discard(source)
            self._open.discard(target)


@contextmanager
def database_proxy(url: str) -> Iterator[DatabaseProxy]:
    proxy = DatabaseProxy(url)
    try:
        yield proxy
    finally:
        proxy.close()
