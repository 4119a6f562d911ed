"""docs/scaling.md's figures each cite the command that produced them: every
command it cites must still be one the bench accepts, and every file it
points to must exist.

A figure whose command no longer runs (a scenario renamed, an option
dropped) could not be measured again, and would read as current while
nothing can check it. Each `python -m bench ...` in a code span or a code
block is parsed by the bench's own argument parser (in a child process:
importing the bench monkey-patches the process that imports it), and each
`bench/...` path it names is a file of the repository.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "scaling.md"
BENCH_COMMAND = re.compile(r"python -m bench ([^`\n]+)")
BENCH_PATH = re.compile(r"\bbench/[\w./-]+\.(?:py|md|json|png)\b")

PARSE = """
import json, sys
from bench.cli import _parser
bad = []
for argv in json.loads(sys.stdin.read()):
    try:
        _parser().parse_args(argv)
    except SystemExit:
        bad.append(argv)
print(json.dumps(bad))
"""


def cited_commands() -> list[list[str]]:
    """The argument lists of every `python -m bench ...` the doc cites
    (a `# comment` after a command in a code block is not part of it)."""
    commands = []
    for match in BENCH_COMMAND.finditer(DOC.read_text()):
        text = match.group(1).split("  #")[0].split(" # ")[0].strip()
        commands.append(shlex.split(text))
    return commands


def test_the_doc_cites_commands_and_files():
    commands = cited_commands()
    assert len(commands) >= 5
    assert {argv[1] for argv in commands if argv[0] in ("run", "compare")} >= {
        "throughput",
        "relay",
        "pop3",
        "idle",
    }
    assert BENCH_PATH.findall(DOC.read_text())


def test_every_cited_bench_command_parses():
    done = subprocess.run(
        [sys.executable, "-c", PARSE],
        cwd=ROOT,
        input=json.dumps(cited_commands()),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    bad = json.loads(done.stdout)
    assert not bad, f"docs/scaling.md cites bench commands the bench refuses: {bad}"


def test_every_cited_bench_file_exists():
    missing = sorted({p for p in BENCH_PATH.findall(DOC.read_text()) if not (ROOT / p).is_file()})
    assert not missing, f"docs/scaling.md names files that do not exist: {missing}"
