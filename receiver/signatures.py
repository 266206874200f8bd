"""Verify DT's signatures of a delivery against the exact bytes received."""

import functools
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import jwt
from jwt.algorithms import HMACAlgorithm

from .errors import ForeignOrganizationError, SignatureError
from .keys import SigningKeys

SIGNATURE_HEADER = "X-Dt-Signature"
ASYMMETRIC_HEADER = "DT-Asymmetric-Signature"
DT_ISSUER = "https://identity.disruptive-technologies.com/data-connector"

# DT's tokens live an hour; a minute of leeway absorbs clock skew between DT and the dyno.
LEEWAY_SECONDS = 60

DIGESTS = {"checksum_sha256": hashlib.sha256, "checksum": hashlib.sha1}
HS256_RULES = {"algorithms": ["HS256"], "leeway": LEEWAY_SECONDS}  # and the claims HS256_JWT requires

# Fixed reasons, never pyjwt's messages: those may quote parts of the token.
TOKEN_FAULTS = (
    (jwt.ExpiredSignatureError, "token has expired"),
    (jwt.ImmatureSignatureError, "token is not valid yet"),
    (jwt.InvalidAlgorithmError, "token algorithm is not allowed"),
    (jwt.InvalidSignatureError, "signature does not verify"),
    (jwt.MissingRequiredClaimError, "token lacks a required claim"),
    (jwt.InvalidIssuerError, "token has the wrong issuer"),
    (jwt.DecodeError, "token is not a valid JWT"),
    (jwt.PyJWTError, "token has a malformed claim"),
)

class HS256CheckingEachSecretOnce(HMACAlgorithm):
    """pyjwt's HS256, which checks a secret once rather than on every token.

    Before every use pyjwt makes sure an HMAC secret is not a public key, a certificate or a JWK
    (four parsers, two exceptions) and measures it: a tenth of a delivery's cost, for the same one
    or two secrets. A secret that fails a check is not cached and fails it every time. Its length is
    not measured here: the receiver warns of a short secret once at start-up, pyjwt would on every token.
    """

    @functools.lru_cache(maxsize=8)  # noqa: B019 (one instance, made once: it lives as long as the process anyway)
    def prepare_key(self, key: str | bytes) -> bytes:
        return super().prepare_key(key)

    def check_key_length(self, key: bytes) -> None:
        return None


# The receiver's own decoder, so the rest of the process keeps pyjwt's HS256. pyjwt 2 takes no
# algorithms in PyJWT's constructor: an instance's algorithms live in the PyJWS it holds.
# Its required claims are given here, once, rather than merged into its options on every decode.
HS256_JWT = jwt.PyJWT(options={"require": ["exp", "iat"]})
HS256_JWT._jws = jwt.PyJWS(algorithms=[], options=HS256_JWT._jws.options)
HS256_JWT._jws.register_algorithm("HS256", HS256CheckingEachSecretOnce(HMACAlgorithm.SHA256))


def secret_problem(name: str, secret: str) -> str | None:
    """Return why pyjwt would refuse this secret as an HMAC key (a pasted public key, say), or None."""
    try:
        HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret)
    except jwt.InvalidKeyError:
        return (f"{name} looks like a public key or a certificate, not a shared secret: "
                "set the Data Connector's Signature Secret")
    return None


@dataclass(frozen=True)
class Verifier:
    """Check every signature the configuration requires, for one delivery: its headers first, then its body."""

    secrets: Sequence[str] = ()
    organization_id: str | None = None
    keys: SigningKeys | None = None

    def verify_headers(self, headers: Mapping[str, str]) -> tuple[Mapping, ...]:
        """Return the claims of each required token once its signature and claims hold; raise a DeliveryError if not.

        Nothing here needs the body, so a request that fails is refused before its body is read.
        """
        claims = []
        if self.secrets:
            claims.append(secret_token_claims(required_header(headers, SIGNATURE_HEADER), self.secrets))
        if self.organization_id:
            token = required_header(headers, ASYMMETRIC_HEADER)
            claims.append(asymmetric_token_claims(token, self.keys, self.organization_id))
        return tuple(claims)

    @staticmethod
    def verify_body(claims_of_each_token: Sequence[Mapping], body: bytes) -> None:
        """Raise a DeliveryError unless the body matches every checksum the verified tokens claim."""
        for claims in claims_of_each_token:
            verify_checksums(claims, body)


def required_header(headers: Mapping[str, str], name: str) -> str:
    """Return a header's value from a case-insensitive mapping, or reject the delivery."""
    value = headers.get(name)
    if not value:
        raise SignatureError(f"missing {name} header")
    return value


def verify_secret_token(token: str, body: bytes, secrets: Sequence[str]) -> None:
    """Check an HS256 token signed with any of the secrets and its checksums of the body."""
    verify_checksums(secret_token_claims(token, secrets), body)


def secret_token_claims(token: str, secrets: Sequence[str]) -> dict:
    """Return the claims of an HS256 token signed with any of the secrets, once its signature and claims hold."""
    with reasons_for_token_faults():
        return decode_with_any_secret(token, secrets)


def decode_with_any_secret(token: str, secrets: Sequence[str]) -> dict:
    """Return the claims of an HS256 token signed with one of the secrets (two during a rotation)."""
    *earlier, last = secrets
    for secret in earlier:
        try:
            return HS256_JWT.decode(token, secret, **HS256_RULES)
        except jwt.InvalidSignatureError:
            pass  # signed with the other secret of the rotation, perhaps
    return HS256_JWT.decode(token, last, **HS256_RULES)


def verify_asymmetric_token(token: str, body: bytes, keys: SigningKeys, organization_id: str) -> None:
    """Check an ES256 token from DT's issuer for this organization and its checksum of the body."""
    verify_checksums(asymmetric_token_claims(token, keys, organization_id), body)


def asymmetric_token_claims(token: str, keys: SigningKeys, organization_id: str) -> dict:
    """Return the claims of an ES256 token from DT's issuer for this organization, once its signature holds.

    A key id not held waits for a fetch of DT's keys (see SigningKeys.key_for).
    """
    with reasons_for_token_faults():
        key = keys.key_for(key_id(token))
        return jwt.decode(
            token,
            key,
            algorithms=["ES256"],
            issuer=keys.issuer,
            subject=organization_id,
            options={"require": ["exp", "iat", "iss", "sub", "checksum_sha256"]},
            leeway=LEEWAY_SECONDS,
        )


def key_id(token: str) -> str:
    """Return the `kid` a token names in its header."""
    kid = jwt.get_unverified_header(token).get("kid")
    if not isinstance(kid, str):
        raise SignatureError("token names no signing key")
    return kid


@contextmanager
def reasons_for_token_faults():
    """Turn pyjwt's exceptions into a rejection with a short, fixed reason."""
    try:
        yield
    except jwt.exceptions.InvalidSubjectError:
        raise ForeignOrganizationError("token is for another DT organization") from None
    except jwt.PyJWTError as error:
        reason = next(reason for fault, reason in TOKEN_FAULTS if isinstance(error, fault))
        raise SignatureError(reason) from None


def verify_checksums(claims: Mapping, body: bytes) -> None:
    """Compare each checksum claim present with the body's digest, in constant time."""
    present = [name for name in DIGESTS if name in claims]
    if not present:
        raise SignatureError("token has no checksum claim")
    for name in present:
        claimed = claims[name]
        if not isinstance(claimed, str):
            raise SignatureError(f"token's {name} is not a string")
        actual = DIGESTS[name](body).hexdigest()
        if not hmac.compare_digest(claimed.encode("utf-8", "surrogatepass"), actual.encode()):
            raise SignatureError(f"body does not match the token's {name}")
