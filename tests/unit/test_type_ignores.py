"""Every `type: ignore` in geosmtp/ names its error codes and says why on its line.

The type checker (mypy, run by `.ci/run`) reports the ignores no longer needed
(`warn_unused_ignores`); this test keeps the rest readable: a bare
`# type: ignore`, or one without a reason after it, hides what it silences.
"""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import geosmtp

PACKAGE = Path(geosmtp.__file__).parent

#: `# type: ignore[code, ...]  # the reason`, the reason at least a word.
_EXPLAINED = re.compile(r"#\s*type:\s*ignore\[[a-z-]+(?:,\s*[a-z-]+)*\]\s+#\s*\w.*")


def _ignore_comments(source: str) -> list[tuple[int, str]]:
    """(line, comment) for each comment that holds `type: ignore`."""
    found: list[tuple[int, str]] = []
    if not re.search(r"type:\s*ignore", source):
        return found  # most files: not worth tokenizing
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and re.search(r"type:\s*ignore", token.string):
            found.append((token.start[0], token.string))
    return found


def unexplained(source: str) -> list[tuple[int, str]]:
    """The `type: ignore` comments of `source` without codes or a reason."""
    return [(line, text) for line, text in _ignore_comments(source) if not _EXPLAINED.match(text)]


def test_the_check_tells_an_explained_ignore_from_a_bare_one() -> None:
    source = (
        "a = 1  # type: ignore\n"
        "b = 2  # type: ignore[attr-defined]\n"
        "c = 3  # type: ignore[attr-defined]  # the stub lacks it\n"
        "d = 4  # type: ignore[arg-type, union-attr]  # both: set by start()\n"
        "e = 5  # type: ignore[misc]  #\n"
        "f = '# type: ignore'  # a string is not a comment\n"
    )
    assert [line for line, _ in unexplained(source)] == [1, 2, 5]


def test_every_type_ignore_in_geosmtp_says_why() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50  # the package itself, not an empty folder
    bad = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {text}"
        for path in files
        for line, text in unexplained(path.read_text(encoding="utf-8"))
    ]
    assert bad == [], "a type: ignore without its codes and a reason:\n" + "\n".join(bad)
