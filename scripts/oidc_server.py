"""A minimal OAuth 2.0 / OIDC token issuer for the OAUTHBEARER tests (scripts/kafka.sh).

Serves, on 127.0.0.1:PORT:
  POST /token  the client-credentials grant: HTTP Basic (or form) client id and secret, answers
               an RS256-signed JWT access token (sub = the client id, aud = kafka)
  GET  /jwks   the public key, for the broker's OAuthBearerValidatorCallbackHandler

The client id comes from --client-id, the secret from the OIDC_CLIENT_SECRET environment
variable (never from the command line, which any process can read). The signing key is made at
start and lives only in memory. Needs the `cryptography` package.

  OIDC_CLIENT_SECRET=... python3 scripts/oidc_server.py --port 8099 --client-id sluice
"""

import argparse
import base64
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

KEY_ID = "sluice-test"
AUDIENCE = "kafka"
LIFETIME_S = 3600


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def uint(n: int) -> str:
    return b64url(n.to_bytes((n.bit_length() + 7) // 8, "big"))


class Issuer:
    def __init__(self, client_id: str, secret: str, issuer: str):
        self.client_id = client_id
        self.secret = secret
        self.issuer = issuer
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> dict:
        numbers = self.key.public_key().public_numbers()
        return {
            "keys": [
                {
                    "kty": "RSA",
                    "kid": KEY_ID,
                    "use": "sig",
                    "alg": "RS256",
                    "n": uint(numbers.n),
                    "e": uint(numbers.e),
                }
            ]
        }

    def token(self, subject: str) -> str:
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "kid": KEY_ID}
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": AUDIENCE,
            "iat": now,
            "nbf": now,
            "exp": now + LIFETIME_S,
            "scope": "kafka",
        }
        signing_input = (
            b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
        )
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + b64url(signature)

    def credentials_ok(self, headers, form: dict) -> bool:
        auth = headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                pair = base64.b64decode(auth[6:]).decode()
            except ValueError:
                return False
            client_id, _, secret = pair.partition(":")
        else:
            client_id = form.get("client_id", [""])[0]
            secret = form.get("client_secret", [""])[0]
        return client_id == self.client_id and secret == self.secret


def handler(issuer: Issuer):
    class Handler(BaseHTTPRequestHandler):
        def answer(self, status: int, body: dict):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/jwks":
                self.answer(200, issuer.jwks())
            else:
                self.answer(404, {"error": "not_found"})

        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            form = parse_qs(self.rfile.read(length).decode())
            if self.path != "/token":
                self.answer(404, {"error": "not_found"})
            elif form.get("grant_type", [""])[0] != "client_credentials":
                self.answer(400, {"error": "unsupported_grant_type"})
            elif not issuer.credentials_ok(self.headers, form):
                self.answer(401, {"error": "invalid_client"})
            else:
                token = issuer.token(issuer.client_id)
                self.answer(
                    200,
                    {"access_token": token, "token_type": "bearer", "expires_in": LIFETIME_S},
                )

        def log_message(self, fmt, *args):
            # One line per request, without headers (they carry the credentials).
            sys.stderr.write("%s %s\n" % (self.address_string(), fmt % args))

    return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client-id", required=True)
    args = parser.parse_args()
    secret = os.environ.get("OIDC_CLIENT_SECRET")
    if not secret:
        sys.exit("oidc_server: set OIDC_CLIENT_SECRET")
    issuer = Issuer(args.client_id, secret, f"http://127.0.0.1:{args.port}")
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler(issuer))
    print(f"oidc_server: serving on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
