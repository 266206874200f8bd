"""Your code: what to do with each verified event, after it is stored (or found stored) and before DT is told 200."""

from .events import Event


def on_event(event: Event) -> None:
    """Act on one event (forward it, alert on a threshold); raise to have DT deliver it again.

    DT delivers at least once: the same event can arrive twice (a retry, a Synchronize, an answer
    lost on the way back), and one that made this function raise comes back. Act idempotently,
    keyed by `event.event_id`, and return within a few seconds: the whole delivery is answered
    within the deadline in receiver/webhook.py, or DT hears 503 and retries. Deliveries that arrive
    together run it at once, each in its own greenlet: guard what they share with a lock
    (threading's locks cooperate with gevent in the server).
    """
