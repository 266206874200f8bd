"""Why a delivery is not accepted, each with the HTTP status DT is given."""


class DeliveryError(Exception):
    """A delivery the receiver does not accept; the message is the reason sent back."""

    status = 400


class InvalidEventError(DeliveryError):
    """The signed body is not a DT event."""


class SignatureError(DeliveryError):
    """The delivery is not signed, or not signed for these bytes."""

    status = 401


class ForeignOrganizationError(DeliveryError):
    """DT signed the delivery, but for another organization."""

    status = 403


class UnavailableError(DeliveryError):
    """Something the receiver depends on is down; DT should retry later."""

    status = 503
    retry_after_seconds = 10


class ConfigError(RuntimeError):
    """The receiver is configured so that it could not accept any event."""
