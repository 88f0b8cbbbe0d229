"""Pushing a merged adapter: a Hub that refuses the token gets one line back, and the token is not in it."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from huggingface_hub import constants

from coremerge import HubError
from coremerge.webapp.hub_push import push_folder

TOKEN = "hf_abcdefghijklmnopqrstuvwxyz012345"


class RefusingHub(BaseHTTPRequestHandler):
    """Answers every request 401 and, like a careless proxy, echoes the Authorization header back."""

    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"error": f"Invalid credentials in Authorization header: {self.headers['Authorization']}"})
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def refusing_hub(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), RefusingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_refused_push_names_the_repo_and_never_echoes_the_token(refusing_hub, tmp_path):
    with pytest.raises(HubError) as error:
        push_folder(tmp_path, "me/merged", TOKEN, endpoint=refusing_hub)
    message = str(error.value)
    assert message.startswith("push to me/merged: ") and "401" in message and "Bearer ***" in message
    assert TOKEN not in message and TOKEN[3:] not in message
    assert error.value.__cause__ is None and error.value.__suppress_context__  # no chained error holding it
