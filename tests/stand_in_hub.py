"""A local stand-in for the Hugging Face Hub's file endpoint, for tests: serves `/{repo}/resolve/{revision}/{file}`
as huggingface_hub expects (commit and etag headers, the Hub's error codes), and records the Authorization header
of every request. Private repos answer only to their token. Also an endpoint that never answers and one that refuses.
"""

import hashlib
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Optional

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class StandInHub:
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)  # repo -> file -> content
    private: dict[str, str] = field(default_factory=dict)  # repo -> the one token that may read it
    authorizations: list[Optional[str]] = field(default_factory=list)  # Authorization header per request
    url: str = ""

    def add_folder(self, repo: str, folder: Path, token: Optional[str] = None) -> None:
        self.repos[repo] = {str(p.relative_to(folder)): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}
        if token:
            self.private[repo] = token


def _handler(hub: StandInHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _answer(self, body: bool) -> None:
            hub.authorizations.append(self.headers.get("Authorization"))
            parts = self.path.split("?")[0].lstrip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                return self._error(404, "RepoNotFound")
            repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
            needed = hub.private.get(repo)
            if repo not in hub.repos or (needed and self.headers.get("Authorization") != f"Bearer {needed}"):
                return self._error(401, "RepoNotFound")
            content = hub.repos[repo].get(filename)
            if content is None:
                return self._error(404, "EntryNotFound")
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            if body:
                self.wfile.write(content)

        def _error(self, status: int, code: str) -> None:
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_HEAD(self):
            self._answer(body=False)

        def do_GET(self):
            self._answer(body=True)

    return Handler


@contextmanager
def serve(hub: StandInHub) -> Iterator[StandInHub]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def never_answering() -> Iterator[str]:
    """An endpoint that accepts connections and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def refusing() -> str:
    """An endpoint on a port nobody listens on: every connection is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def point_hub_at(monkeypatch, url: str) -> None:
    """huggingface_hub online against `url`, as HF_ENDPOINT=url would set it at import."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
