"""Your code: what to do with each verified event, after it is stored (or found stored) and before DT is told 200."""

from .events import Event


def on_event(event: Event) -> None:
    """Act on one event (forward it, alert on a threshold); raise to have DT deliver it again.

    DT delivers at least once: the same event can arrive twice (a retry, a Synchronize, an answer
    lost on the way back), and one that made this function raise comes back. Act idempotently,
    keyed by `event.event_id`, and return within a few seconds: the whole delivery is answered
    within the deadline in receiver/webhook.py, or DT hears 503 and retries. Deliveries that arrive
    together run it at once, each in its own greenlet: guard what they share with a lock
    (threading's locks cooperate with gevent in the server). It runs outside Flask's request
    and app contexts (deliveries skip Flask, see receiver/deliveries.py): use what it is given.

    With a database, the event is stored before this runs, so nothing is lost while this fails.
    DT retries for 12 hours; after a longer outage of this code (or a bug that did the wrong
    thing), fix it, deploy, and run it again over the stored events of that window:
    `heroku run --exit-code -- flask --app app replay --since 36h` calls this once per stored
    event, oldest first, with no deadline; a backfilled event's body has no labels or metadata.
    """
