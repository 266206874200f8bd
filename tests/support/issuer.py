"""A local OpenID issuer standing in for DT's identity service: discovery document, JWKS, ES256 tokens."""

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ORGANIZATION_ID = "org-c0md3mm0c7bet3vico8g"
CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1}


class Issuer:
    """Serves its keys on loopback and signs DT-Asymmetric-Signature tokens with them."""

    def __init__(self):
        self.private_keys = {}  # kid -> key, all it can sign with
        self.algorithms = {}  # kid -> the alg its JWK names
        self.published = []  # kids listed in its JWKS
        self.available = True
        self.delay = 0.0  # seconds each answer hangs before it is sent, as a slow or stuck endpoint does
        self.trickle = 0.0  # seconds between the bytes of each answer's body, as a stalled transfer looks
        self.fetches = 0  # discovery requests, each the start of a fetch, counted whether or not answered
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.block_on_close = False  # closing does not wait out an answer held back on purpose
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/data-connector"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def add_key(self, kid: str, publish: bool = True, algorithm: str = "ES256") -> None:
        """Make a new key for ES256 (P-256, as DT's) or ES384 (P-384), published in the JWKS unless told otherwise."""
        self.private_keys[kid] = ec.generate_private_key(CURVES[algorithm]())
        self.algorithms[kid] = algorithm
        if publish:
            self.published.append(kid)

    def token(self, body: bytes, kid: str, algorithm: str | None = None, key=None, **claims) -> str:
        """Return a token like DT's for these bytes in the key's algorithm; claims given replace DT's (None removes one)."""
        now = int(time.time())
        payload = {"iss": self.url, "sub": ORGANIZATION_ID, "iat": now, "exp": now + 3600,
                   "checksum_sha256": hashlib.sha256(body).hexdigest()}
        payload.update(claims)
        payload = {name: value for name, value in payload.items() if value is not None}
        algorithm = algorithm or self.algorithms.get(kid, "ES256")
        return jwt.encode(payload, key or self.private_keys[kid], algorithm=algorithm, headers={"kid": kid})

    def public_pem(self, kid: str) -> bytes:
        """Return a published key in PEM form (what a key-confusion attacker would have)."""
        return self.private_keys[kid].public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def _documents(self, path: str) -> dict | None:
        if path.endswith("/.well-known/openid-configuration"):
            return {"issuer": self.url, "jwks_uri": self.url + "/jwks"}
        if path.endswith("/jwks"):
            keys = [{**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.private_keys[kid].public_key())),
                     "kid": kid, "use": "sig", "alg": self.algorithms[kid]} for kid in self.published]
            return {"keys": keys}
        return None

    def _handler(self):
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.endswith("/.well-known/openid-configuration"):
                    issuer.fetches += 1
                time.sleep(issuer.delay)
                document = issuer._documents(self.path) if issuer.available else None
                status = 200 if document is not None else (503 if not issuer.available else 404)
                payload = json.dumps(document or {}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    step = 1 if issuer.trickle else len(payload)
                    for start in range(0, len(payload), step):
                        self.wfile.write(payload[start:start + step])
                        self.wfile.flush()
                        time.sleep(issuer.trickle)
                except OSError:
                    pass  # the client stopped waiting for a slow answer

            def log_message(self, *args):
                pass

        return Handler


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
