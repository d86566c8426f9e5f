"""A local stand-in for the Identity Toolkit's `accounts:lookup`, what deliver.revocation asks.

`POST /v1/projects/{project}/accounts:lookup` with `{"localId": [uid]}` answers
`{"users": [{"localId", "validSince", "disabled"}]}` for the users it knows (`{}` for the
others, as Google answers for unknown uids). `revoke(uid)` moves a user's `validSince` to now,
as `auth.revoke_refresh_tokens` does; `fail` makes it answer 503. It counts the lookups.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class IdentityToolkit:
    def __init__(self) -> None:
        self.users: dict[str, dict[str, Any]] = {}
        self.lookups = 0
        self.fail = False
        self._server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    def add(self, uid: str, *, valid_since: float = 0, disabled: bool = False) -> None:
        with self._lock:
            self.users[uid] = {"localId": uid, "validSince": str(int(valid_since)), "disabled": disabled}

    def revoke(self, uid: str, at: float | None = None) -> None:
        self.add(uid, valid_since=time.time() if at is None else at)

    def serve(self) -> str:
        """Starts it on 127.0.0.1; the base URL (as `LISTENERS_TOKEN_REVOCATION_URL`)."""
        toolkit = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with toolkit._lock:
                    toolkit.lookups += 1
                    found = [toolkit.users[u] for u in body.get("localId", []) if u in toolkit.users]
                    fail = toolkit.fail
                if fail or not self.path.endswith("/accounts:lookup"):
                    self.send_response(503 if fail else 404)
                    self.end_headers()
                    return
                data = json.dumps({"users": found} if found else {}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True, name="identity-toolkit").start()
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
