"""The app's WSGI entry: POST / answered by the webhook directly, every other request handed to Flask."""

import functools

from werkzeug.exceptions import HTTPException

from .errors import DeliveryError
from .webhook import PlainText, close_if_large_body_unread, deliver, refusal


class DeliveriesFirst:
    """Answer each delivery without Flask's per-request machinery; hand everything else to Flask's own WSGI app.

    A delivery needs none of it: no routing (one method on one path), no request or response objects
    (the webhook reads the environ), no session, no context. Skipping it saves about a fifth of a
    delivery's cost under the server. A delivery is answered as Flask answered it (the same status,
    reason, headers and log line, the same connection closing), and a fault the webhook does not
    expect is handed to Flask's own handling, as if it had been raised in a view.
    """

    def __init__(self, app):
        self.app = app
        self.flask_wsgi_app = app.wsgi_app

    def __call__(self, environ: dict, start_response):
        if environ.get("PATH_INFO") != "/" or environ.get("REQUEST_METHOD") != "POST":
            return self.flask_wsgi_app(environ, start_response)
        try:
            answer = plain_answer(deliver(environ, self.app.extensions["receiver"]) + "\n", 200)
        except (DeliveryError, HTTPException) as error:
            answer = plain_answer(*refusal(environ, error))
        except Exception as error:
            return self.answer_as_flask_would(environ, start_response, error)
        close_if_large_body_unread(environ)
        status, headers, body = answer
        start_response(status, list(headers))
        return [body]

    def answer_as_flask_would(self, environ: dict, start_response, error: Exception):
        """Answer an unexpected fault through Flask's own handling: its log, its 500 (or, when testing, a raise)."""
        with self.app.request_context(environ):
            response = self.app.handle_exception(error)
        return response(environ, start_response)


@functools.lru_cache(maxsize=256)
def plain_answer(text: str, status: int, extra_headers: tuple = ()) -> tuple[str, tuple, bytes]:
    """Return a short text/plain answer's status line, headers and body, as Flask's response would hand them over."""
    response = PlainText(text, status=status)
    response.headers.extend(extra_headers)
    return response.status, tuple(response.headers.to_wsgi_list()), response.get_data()
