"""The benchmark's ceiling: a bare Flask app that reads the body and answers 200, nothing more."""

from flask import Flask, request

app = Flask(__name__)


@app.post("/")
def receive():
    """Read the whole body, then answer."""
    request.get_data(cache=False)
    return "ok\n"


@app.get("/")
def hint():
    """Answer the readiness probe the benchmark shares with the receiver."""
    return "up\n"
