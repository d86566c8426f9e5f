"""A local stand-in for Firebase Auth's token signing: an RSA key, its certificate served
over HTTP like Google's securetoken endpoint, and Firebase-shaped ID tokens signed with it.

For the tests and the embedded demo only: it lets the real verifier run unchanged, with
its certificate URL pointed here.
"""

from __future__ import annotations

import base64
import datetime
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

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

    def serve(self) -> str:
        """Serve the certificate JSON on a free loopback port; returns its URL."""
        body = json.dumps({self.kid: self.certificate_pem}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", "public, max-age=3600")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True, name="local-issuer").start()
        return f"http://127.0.0.1:{self._server.server_address[1]}/certs"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
