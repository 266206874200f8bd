"""The shape the project promises a newcomer: the design card's files at the top, small functions, short lines."""

import ast
import subprocess

from support.server import ROOT

APP_CODE = [ROOT / "app.py", ROOT / "gunicorn.conf.py", *sorted((ROOT / "receiver").glob("*.py"))]
TOP_LEVEL = {"app.py", "requirements.txt", "Procfile", "runtime.txt", "tests", "README.md", ".gitignore", ".ci",
             "gunicorn.conf.py", "app.json", "receiver", "docs", "pyproject.toml"}
LONGEST_FUNCTION_LINES = 60
LONGEST_LINE = 120


def test_top_level_holds_only_the_design_cards_files():
    """Git tracks nothing at the top level beyond the design card's files and folders."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert {path.split("/")[0] for path in tracked.split()} <= TOP_LEVEL


def test_no_app_function_is_over_60_lines():
    """Every function of the app code reads in one screen."""
    long = [f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in APP_CODE for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION_LINES]
    assert long == []


def test_no_app_line_is_over_120_characters():
    """No line of the app code, comments and pragmas included, is wider than the ruff configuration's 120."""
    wide = [f"{path.name}:{number}" for path in APP_CODE
            for number, line in enumerate(path.read_text().splitlines(), 1) if len(line) > LONGEST_LINE]
    assert wide == []


def test_every_app_file_names_its_job_first():
    """Each file of the app code opens with a docstring or comment saying what it is for."""
    first_lines = {path.name: path.read_text().splitlines()[0] for path in APP_CODE}
    assert [name for name, line in first_lines.items() if not line.startswith(('"""', "#"))] == []
