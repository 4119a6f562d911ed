"""docs/security.md names the test behind each promise: every name it gives must exist.

A promise whose proof was renamed or deleted would read as proved while
nothing checks it. Each `tests/...py::name` (and each `::name` after it in
the same cell, meaning the same file) must be a test function of that file,
and each `python -m bench run|compare NAME` a bench scenario.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "security.md"
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)?::(\w+)`|`(tests/[\w/]+\.py)`")
SCENARIO = re.compile(r"python -m bench (?:run|compare) ([a-z]\w*)")


def named_tests() -> list[tuple[str, str | None]]:
    """(file, test name or None) for every reference, `::name` taking the
    file of the nearest full reference before it on its line."""
    found = []
    for line in DOC.read_text().splitlines():
        current = None
        for match in REFERENCE.finditer(line):
            path, name, bare = match.groups()
            if bare:
                found.append((bare, None))
                continue
            current = path or current
            assert current, f"'::{name}' with no file before it: {line}"
            found.append((current, name))
    return found


def test_the_doc_names_tests_and_scenarios():
    assert len(named_tests()) > 50
    assert SCENARIO.findall(DOC.read_text())


def test_every_named_test_exists():
    missing = []
    for path, name in named_tests():
        source = ROOT / path
        if not source.is_file():
            missing.append(path)
        elif name and not re.search(rf"^(async )?def {name}\(", source.read_text(), re.M):
            missing.append(f"{path}::{name}")
    assert not missing, f"docs/security.md names what does not exist: {missing}"


def bench_scenarios() -> set[str]:
    """The bench's scenario names, asked of a child process: importing the
    bench monkey-patches (gevent) the process that imports it."""
    code = "import json; from bench.scenarios import SCENARIOS; print(json.dumps(list(SCENARIOS)))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout))


def test_every_named_bench_scenario_exists():
    named = set(SCENARIO.findall(DOC.read_text()))
    scenarios = bench_scenarios()
    assert named <= scenarios, named - scenarios
