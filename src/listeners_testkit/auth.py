"""A local stand-in for Firebase Auth's token signing: an RSA key, its certificate served
over HTTP like Google's securetoken endpoint, and Firebase-shaped ID tokens signed with it.

For the tests and the embedded demo only: it lets the real verifier run unchanged, with
its certificate URL pointed here. For the demo page it also hands out tokens, for the demo
users only: `GET /token?uid=U` -> `{token, uid, expires_at}`, and `GET /token` lists the
users (`{users}`); a browser may read these only from the origins it was given (CORS).
"""

from __future__ import annotations

import base64
import datetime
import json
import threading
import time
import uuid
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class LocalIssuer:
    def __init__(self, project_id: str) -> None:
        self.project_id = project_id
        self.kid = uuid.uuid4().hex
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "listeners local issuer")])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(self._key, hashes.SHA256())
        )
        self.certificate_pem = certificate.public_bytes(serialization.Encoding.PEM).decode()
        self._server: ThreadingHTTPServer | None = None
        self.demo_users: tuple[str, ...] = ()
        self.origins: set[str] = set()  # page origins that may read tokens (CORS)
        self.demo_token_lifetime = 3600.0

    def mint(
        self, uid: str, *, lifetime: float = 3600, header: dict[str, Any] | None = None, **claims: Any
    ) -> str:
        """A Firebase-shaped ID token; `claims` and `header` override the defaults."""
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": f"https://securetoken.google.com/{self.project_id}",
            "aud": self.project_id,
            "auth_time": now,
            "iat": now,
            "exp": now + int(lifetime),
            "sub": uid,
            "user_id": uid,
            "firebase": {"sign_in_provider": "custom", "identities": {}},
            **claims,
        }
        head = {"alg": "RS256", "kid": self.kid, "typ": "JWT", **(header or {})}
        signed = f"{_b64(json.dumps(head).encode())}.{_b64(json.dumps(body).encode())}"
        from cryptography.hazmat.primitives.asymmetric import padding

        signature = self._key.sign(signed.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signed}.{_b64(signature)}"

    def serve(self, *, demo_users: Iterable[str] = (), origins: Iterable[str] = ()) -> str:
        """Serve the certificate JSON on a free loopback port; returns its URL. With
        `demo_users`, also serve tokens for them at `token_url`, readable by `origins`."""
        body = json.dumps({self.kid: self.certificate_pem}).encode()
        self.demo_users = tuple(demo_users)
        self.origins = set(origins)
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if url.path == "/token":
                    self._token(parse_qs(url.query).get("uid", [""])[0])
                    return
                self._answer(200, body, {"Cache-Control": "public, max-age=3600"})

            def _token(self, uid: str) -> None:
                origin = self.headers.get("Origin")
                if origin is not None and origin not in issuer.origins:
                    self._json(403, {"error": "origin not allowed"}, None)
                elif not uid:
                    self._json(200, {"users": list(issuer.demo_users)}, origin)
                elif uid not in issuer.demo_users:
                    self._json(403, {"error": "not a demo user"}, origin)
                else:
                    lifetime = issuer.demo_token_lifetime
                    token = issuer.mint(uid, lifetime=lifetime)
                    grant = {"token": token, "uid": uid, "expires_at": int(time.time() + lifetime)}
                    self._json(200, grant, origin)

            def _json(self, status: int, data: dict[str, Any], origin: str | None) -> None:
                headers = {"Cache-Control": "no-store"}
                if origin is not None:
                    headers |= {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
                self._answer(status, json.dumps(data).encode(), headers)

            def _answer(self, status: int, content: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True, name="local-issuer").start()
        return f"{self.base_url}/certs"

    @property
    def base_url(self) -> str:
        assert self._server is not None, "serve() first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def token_url(self) -> str:
        """The demo users' token endpoint (LISTENERS_DEMO_TOKEN_URL)."""
        return f"{self.base_url}/token"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
