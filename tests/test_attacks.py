"""Known attacks on a webhook endpoint, each its own test, through the test client and the real server."""

import socket
import threading
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import HMACAlgorithm
from support.server import deliver, raw_exchange
from support.signing import SECRET, claims_for, hand_made_hs256, signed_delivery, token_with

from receiver.errors import SignatureError
from receiver.sample import encode_body, sample_event, sign_body
from receiver.signatures import secret_problem, verify_secret_token
from receiver.webhook import MAX_BODY_BYTES

BODY = encode_body(sample_event(event_id="attack-1"))


def post(client, body: bytes, token: str) -> tuple[int, str]:
    """POST a body with an X-Dt-Signature; return the status and reason."""
    status, text = deliver(client, body, {"X-Dt-Signature": token})
    return status, text.strip()


def test_alg_none(client):
    """An unsigned token (alg none) is refused."""
    assert post(client, BODY, token_with(claims_for(BODY), secret=None, algorithm="none")) == (401, "token algorithm is not allowed")


@pytest.mark.parametrize("algorithm", ["HS384", "HS512"])
def test_other_hmac_algorithms(client, algorithm):
    """HS384 and HS512 tokens keyed with the right secret are still refused: HS256 only."""
    assert post(client, BODY, token_with(claims_for(BODY), algorithm=algorithm)) == (401, "token algorithm is not allowed")


def test_public_key_as_secret_is_refused_on_every_try(make_app):
    """pyjwt refuses a public key as an HMAC secret; checking each secret once must not make that once only."""
    public_pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    token = hand_made_hs256({"alg": "HS256", "typ": "JWT"}, claims_for(BODY), public_pem.encode())
    for _ in range(3):
        with pytest.raises(SignatureError, match="token has a malformed claim"):
            verify_secret_token(token, BODY, [public_pem])
    assert secret_problem("DT_SIGNATURE_SECRET", public_pem).startswith("DT_SIGNATURE_SECRET looks like a public key")
    client = make_app(DT_SIGNATURE_SECRET=public_pem).test_client()
    assert post(client, BODY, token) == (503, "receiver is not configured: see its log")


def test_receivers_hs256_leaves_pyjwts_own_alone():
    """The receiver's cached HS256 is its own: pyjwt's module-level HS256 is pyjwt's, and warns of a short key."""
    assert type(jwt.get_algorithm_by_name("HS256")) is HMACAlgorithm
    with pytest.warns(jwt.InsecureKeyLengthWarning):
        jwt.decode(jwt.encode({"a": 1}, "short", algorithm="HS256"), "short", algorithms=["HS256"])


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_asymmetric_header_on_an_hmac_token(client, algorithm):
    """Key confusion: an HMAC signature under an RS256 or ES256 header is refused."""
    assert post(client, BODY, hand_made_hs256({"alg": algorithm, "typ": "JWT"}, claims_for(BODY), SECRET.encode())) == (401, "token algorithm is not allowed")


@pytest.mark.parametrize("value", [12345, 1.5, ["a"], {"a": 1}, None, True])
def test_checksum_claims_of_other_types(client, value):
    """Checksum claims that are numbers, lists, objects, null or booleans are refused."""
    status, reason = post(client, BODY, token_with(claims_for(BODY, checksum=None) | {"checksum_sha256": value}))
    assert (status, reason) == (401, "token's checksum_sha256 is not a string")


def test_sha1_valid_sha256_wrong(client):
    """A right `checksum` does not excuse a wrong `checksum_sha256`."""
    assert post(client, BODY, token_with(claims_for(BODY, checksum_sha256="f" * 64))) == (401, "body does not match the token's checksum_sha256")


def test_sha256_valid_sha1_wrong(client):
    """A right `checksum_sha256` does not excuse a wrong `checksum`."""
    assert post(client, BODY, token_with(claims_for(BODY, checksum="f" * 40))) == (401, "body does not match the token's checksum")


def test_replay_onto_other_bytes(client):
    """A genuine token taken from one delivery does not carry another body."""
    other = encode_body(sample_event(event_id="attack-2"))
    assert post(client, other, sign_body(BODY, SECRET)) == (401, "body does not match the token's checksum_sha256")


def test_expired_token(client):
    """A token past its exp (beyond the leeway) is refused."""
    assert post(client, BODY, sign_body(BODY, SECRET, now=time.time() - 3700)) == (401, "token has expired")


def test_iat_far_in_the_future(client):
    """A token issued in the year 3000 is refused."""
    assert post(client, BODY, token_with(claims_for(BODY, iat=32503680000, exp=32503683600))) == (401, "token is not valid yet")


def test_json_a_thousand_levels_deep(client):
    """Deeply nested signed JSON is a 400, not a RecursionError."""
    for depth in (1000, 20_000):  # 20,000 levels: past any recursion limit, inside the size limit
        body = b'{"event":' * depth + b"{}" + b"}" * depth
        assert post(client, body, sign_body(body, SECRET)) == (400, "body is nested too deeply")


def test_body_with_a_utf8_bom(client):
    """A signed body starting with a byte-order mark is not JSON by RFC 8259: 400."""
    body = b"\xef\xbb\xbf" + BODY
    assert post(client, body, sign_body(body, SECRET)) == (400, "body is not UTF-8 JSON")



def test_ten_megabyte_body(server):
    """A 10 MB body is refused with 413 on its Content-Length, before the server waits for it."""
    head = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\nX-Dt-Signature: x\r\n\r\n" % (10 * 1024 * 1024)
    assert raw_exchange(server, head + b"x" * 65536) == (413, f"body is larger than {MAX_BODY_BYTES} bytes")


def test_chunked_body_over_the_limit(server):
    """A signed chunked body with no length is cut off at the limit: 413."""
    chunk = b"x" * 65536
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(20)) + b"0\r\n\r\n"
    head = (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
            b"X-Dt-Signature: %s\r\n\r\n" % sign_body(chunk * 20, SECRET).encode())
    assert raw_exchange(server, head + chunks) == (413, f"body is larger than {MAX_BODY_BYTES} bytes")


def test_chunked_body_without_length_is_accepted(server):
    """A genuine event sent chunked, with no Content-Length, is verified and accepted."""
    body, headers = signed_delivery()
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:100], body[100:])) + b"0\r\n\r\n"
    request = f"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n{head}\r\n".encode() + chunks
    assert raw_exchange(server, request) == (200, "logged")


def test_hundred_kilobyte_header(server):
    """A 100 KB header is refused by the server with a 4xx."""
    request = b"POST / HTTP/1.1\r\nHost: t\r\nX-Dt-Signature: " + b"a" * 100_000 + b"\r\nContent-Length: 0\r\n\r\n"
    assert 400 <= raw_exchange(server, request)[0] < 500


def test_many_headers(server):
    """A thousand headers are refused by the server with a 4xx."""
    headers = b"".join(b"X-Junk-%d: %d\r\n" % (n, n) for n in range(1000))
    assert 400 <= raw_exchange(server, b"POST / HTTP/1.1\r\nHost: t\r\n" + headers + b"Content-Length: 0\r\n\r\n")[0] < 500


def test_slow_client_does_not_stop_others(server):
    """While clients trickle bodies a byte a second, other deliveries are still answered quickly."""
    body, headers = signed_delivery()
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    stop = threading.Event()

    def trickle():
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
            connection.sendall(f"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode())
            for byte in body:
                if stop.wait(1.0):
                    return
                connection.sendall(bytes([byte]))

    slow_clients = [threading.Thread(target=trickle) for _ in range(3)]
    for thread in slow_clients:
        thread.start()
    try:
        time.sleep(1.5)
        for _ in range(5):
            started = time.monotonic()
            assert server.post(*signed_delivery(), timeout=10)[0] == 200
            assert time.monotonic() - started < 2
    finally:
        stop.set()
        for thread in slow_clients:
            thread.join()
