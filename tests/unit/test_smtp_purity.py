"""The protocol cores (SMTP, POP3, the relay's SMTP client) are sans-I/O: they
import only the standard library, the shared protocol base (`geosmtp.protocol`)
and the pure mail domain (`geosmtp.mail`, less its id generator), and no I/O
from any. No core imports another core, nor anything of the shell.

Checked in a fresh interpreter, since this test process has long since
imported gevent, socket and friends for other tests.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import geosmtp
import geosmtp.mail
import geosmtp.pop3
import geosmtp.protocol
import geosmtp.relay.protocol
import geosmtp.smtp

#: The sans-I/O cores, by module name (a package stands for every module in
#: it). A new core goes here: it is then held to every test in this file.
CORES = (
    "geosmtp.protocol",
    "geosmtp.smtp",
    "geosmtp.pop3",
    "geosmtp.lmtp",
    "geosmtp.relay.protocol",
)
#: What a core may import of geosmtp besides itself: the shared base, the mail domain.
SHARED = ("geosmtp.protocol", "geosmtp.mail")
#: A core that is an extension of another (LMTP's, RFC 2033, a subclass of the
#: SMTP core) may import that one, and only by being named here.
EXTENDS = {"geosmtp.lmtp": ("geosmtp.smtp",)}
GEOSMTP_DIR = Path(geosmtp.__file__).parent


def _core_files(core: str) -> list[Path]:
    """The source files of `core` (none when it does not exist in this tree)."""
    path = GEOSMTP_DIR.joinpath(*core.split(".")[1:])
    if path.is_dir():
        return sorted(path.glob("*.py"))
    return [path.with_suffix(".py")] if path.with_suffix(".py").is_file() else []


CORE_DIRS = tuple(
    GEOSMTP_DIR.joinpath(*core.split(".")[1:])
    for core in CORES
    if GEOSMTP_DIR.joinpath(*core.split(".")[1:]).is_dir()
)
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
        ("geosmtp.protocol", "geosmtp.smtp", "geosmtp.pop3", "geosmtp.lmtp", "geosmtp.mail")
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
    assert {"geosmtp.protocol", "geosmtp.protocol.connection", "geosmtp.protocol.sasl"} <= set(
        CORE_MODULES
    )
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


# ------------------------------------------------- no core imports another


def _imported(module: str, path: Path) -> list[tuple[int, str]]:
    """The geosmtp modules the source at `path` (module `module`) imports, by
    line, relative imports resolved; `from X import name` counts as X.name
    (it may be a submodule)."""
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == "geosmtp"]


def _within(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def foreign_imports(core: str, path: Path) -> list[str]:
    """What the file at `path` of `core` imports of geosmtp that is neither
    the core itself nor `SHARED`: another core, or the shell."""
    relative = path.relative_to(GEOSMTP_DIR).with_suffix("")
    module = ".".join(("geosmtp", *relative.parts))
    if module.endswith(".__init__"):
        module = module.removesuffix(".__init__")
    # The base itself imports no other part of geosmtp.
    allowed = (core,) if core == "geosmtp.protocol" else (core, *SHARED, *EXTENDS.get(core, ()))
    return [
        f"{path.relative_to(GEOSMTP_DIR)}:{line} imports {name}"
        for line, name in _imported(module, path)
        if name != "geosmtp" and not any(_within(name, a) for a in allowed)
    ]


def test_the_cores_are_found():
    found = {core for core in CORES if _core_files(core)}
    assert found == set(CORES)  # a core moved or renamed would be checked for nothing


@pytest.mark.parametrize("core", CORES)
def test_no_core_imports_another_core_or_the_shell(core):
    problems = [p for path in _core_files(core) for p in foreign_imports(core, path)]
    assert problems == []


def test_the_import_check_sees_a_core_importing_another(tmp_path, monkeypatch):
    """The check above is not met by a walker that finds nothing."""
    fake = tmp_path / "geosmtp"
    (fake / "pop3").mkdir(parents=True)
    (fake / "pop3" / "session.py").write_text(
        "from ..smtp.session import NEED_DATA\n"
        "from ..protocol import sasl\n"
        "from . import replies\n"
        "from ..mail import Envelope\n"
        "import geosmtp.server.stream\n"
        "from .. import config\n"
    )
    monkeypatch.setattr(f"{__name__}.GEOSMTP_DIR", fake)
    assert foreign_imports("geosmtp.pop3", fake / "pop3" / "session.py") == [
        "pop3/session.py:1 imports geosmtp.smtp.session.NEED_DATA",
        "pop3/session.py:5 imports geosmtp.server.stream",
        "pop3/session.py:6 imports geosmtp.config",
    ]
    # A declared extension may import the core it extends, and nothing more.
    (fake / "lmtp").mkdir()
    (fake / "lmtp" / "session.py").write_text(
        "from ..smtp.session import SMTPConnection\nfrom ..pop3 import replies\n"
    )
    assert foreign_imports("geosmtp.lmtp", fake / "lmtp" / "session.py") == [
        "lmtp/session.py:2 imports geosmtp.pop3.replies",
    ]
