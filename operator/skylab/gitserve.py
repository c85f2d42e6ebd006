"""Campaign repositories served read-only over git's smart HTTP protocol.

In a cluster the trainer pods fetch their trial commit from the operator:
`GET /git/<repo>.git/info/refs?service=git-upload-pack` and
`POST /git/<repo>.git/git-upload-pack`, answered by `git http-backend` (CGI), where
<repo> is `<campaign>` or `<namespace>/<campaign>`. Nothing else of git is served: no
push, no dumb-protocol file access, no path outside ROOT. The same server answers the
operator's plain GET endpoints (health, metrics) given as `routes`.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

PREFIX = "/git/"
_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
# <repo>.git/info/refs (with ?service=git-upload-pack) or <repo>.git/git-upload-pack
_ROUTE = re.compile(rf"((?:{_LABEL}/)?{_LABEL})\.git/(info/refs|git-upload-pack)")
_UPLOAD_PACK = "service=git-upload-pack"

# A plain GET endpoint: returns (status, content type, body).
Route = Callable[[], tuple[int, str, bytes]]


class GitServer:
    """A threaded HTTP server for the bare repositories `ROOT/<repo>.git`."""

    def __init__(
        self,
        root: Path,
        host: str = "0.0.0.0",
        port: int = 8080,
        routes: Mapping[str, Route] | None = None,
    ) -> None:
        self.root = root.resolve()
        handler = type("Handler", (_GitHandler,), {"root": self.root, "routes": dict(routes or {})})
        self._server = ThreadingHTTPServer((host, port), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def url(self, campaign: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{PREFIX}{campaign}.git"

    def start(self) -> GitServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class _GitHandler(BaseHTTPRequestHandler):
    root: Path
    routes: dict[str, Route]
    protocol_version = "HTTP/1.0"  # one request per connection: nothing to keep alive

    def do_GET(self) -> None:
        route = self.routes.get(urlsplit(self.path).path)
        if route is None:
            self._serve("GET")
            return
        status, content_type, body = route()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self._serve("POST")

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: every fetch would print two lines."""

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        match = _ROUTE.fullmatch(url.path.removeprefix(PREFIX))
        if not url.path.startswith(PREFIX) or match is None:
            self.send_error(404, "not a campaign repository")
            return
        name, route = match.group(1), match.group(2)
        if (route, method) not in (("info/refs", "GET"), ("git-upload-pack", "POST")):
            self.send_error(405, "read-only: fetch only")
            return
        if route == "info/refs" and url.query != _UPLOAD_PACK:
            self.send_error(403, "read-only: only git-upload-pack is served")
            return
        if not (self.root / f"{name}.git").is_dir():
            self.send_error(404, f"no campaign repository {name}")
            return
        self._run_backend(method, f"/{name}.git/{route}", url.query)

    def _run_backend(self, method: str, path_info: str, query: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(self.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": path_info,
            "REQUEST_METHOD": method,
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": self.client_address[0],
            "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
            "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
        }
        done = subprocess.run(
            ["git", "http-backend"], input=body, env=env, capture_output=True, check=False
        )
        head, _, payload = done.stdout.partition(b"\r\n\r\n")
        status, headers = 200, []
        for line in head.decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            if key.lower() == "status":
                status = int(value.split()[0])
            elif key:
                headers.append((key, value.strip()))
        if done.returncode != 0 and status == 200:
            self.send_error(500, done.stderr.decode(errors="replace").strip()[:200])
            return
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
