"""pyflakes over every Python file of the repository: unused imports, undefined names,
redefinitions. (It ran clean at the fifteenth session; this keeps it so.)"""

from pathlib import Path

from pyflakes.api import checkPath  # in the test extra
from pyflakes.reporter import Reporter

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("iomm_scale", "tests", "tools", "launchers", "benchmarks")


def test_pyflakes_finds_nothing():
    class Collect(Reporter):
        def __init__(self):
            self.problems: list[str] = []

        def unexpectedError(self, filename, message):
            self.problems.append(f"{filename}: {message}")

        def syntaxError(self, filename, msg, lineno, offset, text):
            self.problems.append(f"{filename}:{lineno}: {msg}")

        def flake(self, message):
            self.problems.append(str(message))

    files = sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))
    assert len(files) > 100
    reporter = Collect()
    for path in files:
        checkPath(str(path), reporter)
    assert reporter.problems == [], "\n".join(reporter.problems)
