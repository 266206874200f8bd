"""DT-Asymmetric-Signature: ES256 tokens from DT's issuer, its key set, and both headers together."""

import base64
import hashlib
import json
import time

import pytest
from support.issuer import ORGANIZATION_ID, FakeClock
from support.server import deliver
from support.signing import SECRET, base64url, claims_for, hand_made_hs256, signed_delivery, token_with

from receiver.errors import SignatureError, UnavailableError
from receiver.keys import FETCH_SECONDS, SigningKeys
from receiver.sample import encode_body, sample_event
from receiver.signatures import verify_asymmetric_token

BODY = encode_body(sample_event(event_id="asym-1"))


@pytest.fixture
def asymmetric_client(make_app, issuer):
    """Return a client of a receiver that requires only DT-Asymmetric-Signature."""
    return make_app(DT_SIGNATURE_SECRET="", DT_ORGANIZATION_ID=ORGANIZATION_ID, DT_ISSUER=issuer.url).test_client()


def post_asymmetric(client, token, body=BODY):
    """POST a body with a DT-Asymmetric-Signature header; return status and text."""
    status, text = deliver(client, body, {"DT-Asymmetric-Signature": token})
    return status, text.strip()


def test_valid_asymmetric_token_is_accepted(asymmetric_client, issuer, log_lines):
    """A token DT's issuer signed for our organization and these bytes gets 200."""
    assert post_asymmetric(asymmetric_client, issuer.token(BODY, "k1")) == (200, "logged")
    assert log_lines()[-1]["event_id"] == "asym-1"


@pytest.mark.parametrize("case, claims, status, reason", [
    ("wrong organization", {"sub": "org-someone-else"}, 403, "token is for another DT organization"),
    ("wrong issuer", {"iss": "https://evil.example/data-connector"}, 401, "token has the wrong issuer"),
    ("no organization", {"sub": None}, 401, "token lacks a required claim"),
    ("no checksum", {"checksum_sha256": None}, 401, "token lacks a required claim"),
    ("other body", {"checksum_sha256": hashlib.sha256(b"other").hexdigest()}, 401,
     "body does not match the token's checksum_sha256"),
    ("expired", {"iat": 1_600_000_000, "exp": 1_600_003_600}, 401, "token has expired"),
])
def test_asymmetric_rejection(asymmetric_client, issuer, case, claims, status, reason):
    """A signed token that is not for us, or not for these bytes, is turned away with its reason."""
    assert post_asymmetric(asymmetric_client, issuer.token(BODY, "k1", **claims)) == (status, reason)


def test_hs256_made_with_the_public_key_is_refused(asymmetric_client, issuer):
    """Key confusion: an HS256 token keyed with DT's public key is not accepted."""
    payload = json.loads(base64.urlsafe_b64decode(issuer.token(BODY, "k1").split(".")[1] + "=="))
    token = hand_made_hs256({"alg": "HS256", "typ": "JWT", "kid": "k1"}, payload, issuer.public_pem("k1"))
    assert post_asymmetric(asymmetric_client, token) == (401, "token algorithm is not allowed")


def test_es384_token_from_a_published_es384_key_is_refused(asymmetric_client, issuer):
    """Only ES256 is accepted, even from a P-384 key the issuer publishes for ES384 under its own kid."""
    issuer.add_key("p384", algorithm="ES384")
    assert post_asymmetric(asymmetric_client, issuer.token(BODY, "p384")) == (401, "token algorithm is not allowed")


SKEWS = [
    # (case, iat and exp relative to now, status, reason): DT's clock may be a minute off ours, and no more.
    ("expired 30 s ago", -3630, -30, 200, "logged"),
    ("expired 90 s ago", -3690, -90, 401, "token has expired"),
    ("issued 30 s ahead", 30, 3630, 200, "logged"),
    ("issued 90 s ahead", 90, 3690, 401, "token is not valid yet"),
]


@pytest.mark.parametrize("header", ["X-Dt-Signature", "DT-Asymmetric-Signature"])
@pytest.mark.parametrize("case, iat, exp, status, reason", SKEWS, ids=[row[0] for row in SKEWS])
def test_clock_skew_leeway_is_one_minute(make_app, issuer, header, case, iat, exp, status, reason):
    """Either signature's exp and iat pass up to a minute off the receiver's clock, and fail beyond it."""
    now = int(time.time())
    if header == "X-Dt-Signature":
        client = make_app().test_client()
        token = token_with(claims_for(BODY, iat=now + iat, exp=now + exp))
    else:
        client = make_app(DT_SIGNATURE_SECRET="", DT_ORGANIZATION_ID=ORGANIZATION_ID, DT_ISSUER=issuer.url).test_client()
        token = issuer.token(BODY, "k1", iat=now + iat, exp=now + exp)
    answer = client.post("/", data=BODY, headers={header: token})
    assert (answer.status_code, answer.text) == (status, reason + "\n")


def test_token_without_kid_is_refused(asymmetric_client, issuer):
    """A token naming no key cannot be checked and is refused."""
    token = issuer.token(BODY, "k1").split(".")
    token[0] = base64url(b'{"alg":"ES256","typ":"JWT"}')
    assert post_asymmetric(asymmetric_client, ".".join(token)) == (401, "token names no signing key")


def test_unsigned_secret_header_alone_is_not_enough(asymmetric_client):
    """With only the organization configured, an X-Dt-Signature alone is refused."""
    body, headers = signed_delivery()
    answer = asymmetric_client.post("/", data=body, headers=headers)
    assert (answer.status_code, answer.text) == (401, "missing DT-Asymmetric-Signature header\n")


def test_both_settings_require_both_headers(make_app, issuer):
    """With a secret and an organization, each header is required and both together pass."""
    client = make_app(DT_ORGANIZATION_ID=ORGANIZATION_ID, DT_ISSUER=issuer.url).test_client()
    body, headers = signed_delivery(sample_event(event_id="both-1"))
    asymmetric = {"DT-Asymmetric-Signature": issuer.token(body, "k1")}
    assert client.post("/", data=body, headers=headers).status_code == 401
    assert client.post("/", data=body, headers=asymmetric).status_code == 401
    assert client.post("/", data=body, headers={**headers, **asymmetric}).status_code == 200


def test_key_endpoint_down_before_first_fetch_is_503(asymmetric_client, issuer, log_lines):
    """With no keys ever fetched, DT is told to retry (503), not that its signature is bad."""
    issuer.available = False
    answer = asymmetric_client.post("/", data=BODY, headers={"DT-Asymmetric-Signature": issuer.token(BODY, "k1")})
    assert (answer.status_code, answer.headers["Retry-After"]) == (503, "10")
    assert [line["msg"] for line in log_lines()] == ["could not fetch DT's signing keys", "request rejected"]


def test_fetched_keys_survive_an_outage_of_the_endpoint(issuer):
    """Keys fetched once keep verifying while the endpoint is down, even past their refresh age, which tries once."""
    clock = FakeClock()
    keys = SigningKeys(issuer.url, max_age=60, clock=clock)
    verify_asymmetric_token(issuer.token(BODY, "k1"), BODY, keys, ORGANIZATION_ID)
    issuer.available = False
    clock.now += 3600
    for _ in range(3):  # the first starts a refresh in the background; none waits for it
        verify_asymmetric_token(issuer.token(BODY, "k1"), BODY, keys, ORGANIZATION_ID)
    wait_for_fetches_to_end(keys)
    verify_asymmetric_token(issuer.token(BODY, "k1"), BODY, keys, ORGANIZATION_ID)
    assert issuer.fetches == 2


def wait_for_fetches_to_end(keys: SigningKeys) -> None:
    """Wait until no fetch of the key set is under way."""
    deadline = time.monotonic() + 10
    while keys._in_flight is not None and time.monotonic() < deadline:
        time.sleep(0.01)


def test_unknown_kid_refreshes_once_per_default_interval_then_finds_the_new_key(issuer):
    """A rotated-in key is found after one refresh; bogus kids cost at most one fetch per 30 s, the default interval."""
    clock = FakeClock()
    keys = SigningKeys(issuer.url, clock=clock)
    verify_asymmetric_token(issuer.token(BODY, "k1"), BODY, keys, ORGANIZATION_ID)
    issuer.add_key("k2")
    for n in range(200):
        with pytest.raises(SignatureError, match="unknown key"):
            keys.key_for(f"bogus-{n}")
    clock.now += 29
    with pytest.raises(SignatureError, match="unknown key"):
        verify_asymmetric_token(issuer.token(BODY, "k2"), BODY, keys, ORGANIZATION_ID)
    assert issuer.fetches == 1
    clock.now += 1
    verify_asymmetric_token(issuer.token(BODY, "k2"), BODY, keys, ORGANIZATION_ID)
    assert issuer.fetches == 2


def test_keys_older_than_an_hour_are_refreshed_by_default(issuer):
    """With no max_age given, a key set an hour old is still used as it is; a second later it is fetched again."""
    clock = FakeClock()
    keys = SigningKeys(issuer.url, clock=clock)
    assert keys.key_for("k1").key_id == "k1"
    issuer.published.remove("k1")  # DT retires k1
    issuer.add_key("k2")
    clock.now += 3600
    assert keys.key_for("k1").key_id == "k1"
    wait_for_fetches_to_end(keys)
    assert issuer.fetches == 1
    clock.now += 1
    assert keys.key_for("k1").key_id == "k1"  # held: the refresh runs in the background
    wait_for_fetches_to_end(keys)
    assert issuer.fetches == 2
    with pytest.raises(SignatureError, match="unknown key"):
        keys.key_for("k1")
    assert keys.key_for("k2").key_id == "k2"


def test_fetch_from_a_trickling_endpoint_ends_within_its_bound(issuer, log_lines):
    """An endpoint that sends a byte every 0.1 s (each read well inside its timeout) is given up on at FETCH_SECONDS."""
    issuer.trickle = 0.1  # its two documents would take over 30 s
    keys = SigningKeys(issuer.url, clock=FakeClock())
    started = time.monotonic()
    with pytest.raises(UnavailableError):
        keys.key_for("k1")
    while not (failed := [line for line in log_lines() if line["msg"] == "could not fetch DT's signing keys"]):
        assert time.monotonic() - started < FETCH_SECONDS + 1, "the fetch outlived its bound"
        time.sleep(0.05)
    assert FETCH_SECONDS - 0.5 < time.monotonic() - started
    assert failed == [{"level": "warning", "msg": "could not fetch DT's signing keys", "error": "TimeoutError"}]


@pytest.mark.parametrize("held", [False, True], ids=["no key held", "keys held"])
def test_failed_fetch_is_503_and_tried_again_after_5_s(issuer, held):
    """After a failed fetch a key not held may be real: 503, and the next fetch comes after 5 s, not 30 s."""
    clock = FakeClock()
    keys = SigningKeys(issuer.url, clock=clock)
    if held:
        keys.key_for("k1")
        clock.now += 30
    issuer.add_key("k2")
    issuer.available = False
    with pytest.raises(UnavailableError):
        keys.key_for("k2")
    issuer.available = True
    clock.now += 4
    with pytest.raises(UnavailableError):
        keys.key_for("k2")  # too soon: no new fetch
    clock.now += 1
    assert keys.key_for("k2").key_id == "k2"
    assert issuer.fetches == 2 + held


def test_secret_rotation_with_both_headers(make_app, issuer):
    """During a secret rotation, both secrets pass beside a valid asymmetric token; a third does not."""
    previous = "previous-signature-secret-0123456789abcdef"
    client = make_app(DT_SIGNATURE_SECRET_PREVIOUS=previous, DT_ORGANIZATION_ID=ORGANIZATION_ID,
                      DT_ISSUER=issuer.url).test_client()
    for secret, status in ((SECRET, 200), (previous, 200), ("third-secret-0123456789abcdef0123456789", 401)):
        body, headers = signed_delivery(secret=secret)
        headers["DT-Asymmetric-Signature"] = issuer.token(body, "k1")
        assert client.post("/", data=body, headers=headers).status_code == status
