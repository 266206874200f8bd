"""The app that the Procfile's `gunicorn app:app` and `flask --app app` load, built from the environment."""

import sys

from receiver import create_app

app = create_app()

if __name__ == "__main__":
    sys.exit("app.py is served by gunicorn: run `gunicorn app:app` (README, Run locally)")
