"""The protocol cores (SMTP, POP3, the relay's SMTP client) are sans-I/O: they
import only the standard library and the pure mail domain (`geosmtp.mail`, less
its id generator), and no I/O from either; so is the LMTP core, a subclass of
the SMTP one. The POP3 core shares the SMTP core's pure pieces (SASL,
ProtocolError), so both are checked as one.

Checked in a fresh interpreter, since this test process has long since
imported gevent, socket and friends for other tests.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import geosmtp.lmtp
import geosmtp.mail
import geosmtp.pop3
import geosmtp.relay.protocol
import geosmtp.smtp

CORE_DIRS = (Path(geosmtp.smtp.__file__).parent, Path(geosmtp.pop3.__file__).parent)
CORE_DIRS += (Path(geosmtp.lmtp.__file__).parent,)  # issue 21: the LMTP core
MAIL_DIR = Path(geosmtp.mail.__file__).parent
# The id generator reads the clock and the pid: the shell's, never the core's.
IMPURE = {MAIL_DIR / "ids.py"}
PURE_FILES = sorted(p for d in (*CORE_DIRS, MAIL_DIR) for p in d.glob("*.py") if p not in IMPURE)
# The relay's client core (issue 20); the rest of geosmtp.relay is its shell.
PURE_FILES += [Path(geosmtp.relay.protocol.__file__), Path(geosmtp.relay.__file__)]
CORE_MODULES = sorted(
    f"geosmtp.{p.parent.name}" + ("" if p.stem == "__init__" else "." + p.stem) for p in PURE_FILES
)
FORBIDDEN = ["gevent", "socket", "_socket", "yaml", "loguru", "ssl", "_ssl", "selectors", "select"]

_PROBE = """
import importlib, json, sys, sysconfig
before = set(sys.modules)
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
new = sorted(set(sys.modules) - before)
paths = sysconfig.get_paths()
stdlib = (paths["stdlib"], paths["platstdlib"])
outside = []
for name in new:
    if name in ("geosmtp", "geosmtp.relay", "geosmtp.relay.protocol") or name.startswith(
        ("geosmtp.smtp", "geosmtp.pop3", "geosmtp.mail", "geosmtp.lmtp")
    ):
        continue
    f = getattr(sys.modules[name], "__file__", None)
    if f is not None and (not f.startswith(stdlib) or "-packages" in f):
        outside.append((name, f))
print(json.dumps({"new": new, "outside": outside}))
"""


def _probe() -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(CORE_MODULES)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(out.stdout)


def test_core_modules_are_found():
    assert {"geosmtp.smtp", "geosmtp.smtp.session", "geosmtp.smtp.trace"} <= set(CORE_MODULES)
    assert {"geosmtp.pop3", "geosmtp.pop3.session", "geosmtp.pop3.stuffing"} <= set(CORE_MODULES)
    assert {"geosmtp.relay", "geosmtp.relay.protocol"} <= set(CORE_MODULES)


def test_importing_the_core_pulls_in_no_io():
    result = _probe()
    assert set(CORE_MODULES) <= set(result["new"])  # the probe really imported them
    assert [m for m in FORBIDDEN if m in result["new"]] == []
    assert "geosmtp.mail.ids" not in result["new"]


def test_core_imports_only_the_standard_library():
    assert _probe()["outside"] == []


def test_core_source_has_no_io():
    """No absolute import of the rest of geosmtp, no open(), no os/io/socket at all."""
    io_modules = {"os", "io", "socket", "ssl", "select", "selectors", "subprocess", "pathlib"}
    io_modules |= {"time", "datetime"}  # no clock reads either: the shell passes the time in
    for path in PURE_FILES:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [] if node.level else [node.module or ""]
            else:
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                    assert node.func.id != "open", f"{path.name}:{node.lineno} calls open()"
                continue
            for name in names:
                top = name.split(".")[0]
                assert top != "geosmtp", f"{path.name}: absolute import of {name}"
                assert top not in io_modules, f"{path.name}: imports {name}"
