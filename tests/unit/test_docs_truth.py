"""No roadmap words in the code's comments and docstrings or in the docs.

A note such as "LMTP (later)" or "the future POP3" promises work; once the
work is built (or dropped) the note is false, and nothing else would say
so. This test reads the comments and docstrings of `geosmtp/**/*.py`, the
whole of `docs/*.md`, `README.md`, `config.yaml` and the example configs
(their comments are their documentation) and `bench/README.md`, and fails on
phrases that announce unbuilt work.

The phrases are chosen to be few in false positives: "later" alone is how
the queue describes a retry ("retried later"), so only forms such as
"(later)", "added later" or "a later issue" count. A legitimate use that
still matches goes into `ALLOWED` with the reason it is not a promise.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: What announces unbuilt work. Case-insensitive unless the pattern says so.
ROADMAP = re.compile(
    r"""
      \((?:later|to\ come|coming|soon)\)              # "LMTP (later)"
    | \b(?:added|built|done|implemented|supported|handled|wired|written|offered)
        \ later\b                                     # "will be handled later"
    | \b(?:come|comes|follow|follows|arrive|arrives)\ later\b
    | \blater\ (?:issues?|versions?|releases?|phases?|milestones?)\b
    | \bstill\ to\ come\b
    | \bto\ be\ (?:done|added|written|built|implemented)\b
    | \bnot\ yet\ (?:implemented|supported|built|done|written|wired|available|offered|handled)\b
    | \bwill\ be\ (?:added|built|implemented|supported|done|written|wired|offered)\b
    | \bfor\ now\b
    | \bfuture\b                                       # "in the future", "the future POP3"
    | \bplanned\b
    | \bcoming\ soon\b
    | \bsomeday\b | \bsome\ day\b
    | \bissue\ \#?\d+\ will\b
    | (?-i:\b(?:TODO|FIXME|XXX|TBD)\b)
    """,
    re.IGNORECASE | re.VERBOSE,
)

#: Every `ROADMAP` form holds one of these (the last four as written, the
#: rest in any case): a text with none is passed over without the regex.
ANCHORS = ("later", "to come", "coming", "soon", "to be", "not yet", "will", "for now")
ANCHORS += ("future", "planned", "someday", "some day")
CASED_ANCHORS = ("TODO", "FIXME", "XXX", "TBD")


def may_hold_roadmap(text: str) -> bool:
    lower = text.lower()
    return any(a in lower for a in ANCHORS) or any(a in text for a in CASED_ANCHORS)


#: (file, what the line holds, why it is no promise). A hit is allowed when
#: its file matches and the line (comment or docstring line, doc line)
#: matches the second pattern.
ALLOWED: list[tuple[str, str, str]] = [
    (
        r".*",
        r"(?:fail(?:ed|s)?|fetched|refuse[sd]?) for now",
        "a temporary failure (4xx: the same mail may pass at a retry), not unbuilt work",
    ),
    (
        r"docs/filters\.md",
        r"for now\s*$|for now or for good",
        "a filter refuses for now (4xx) or for good (5xx)",
    ),
]


def doc_files() -> list[Path]:
    """The docs, the configs (their comments document every key) and the
    bench's README."""
    return [
        *sorted((ROOT / "docs").glob("*.md")),
        ROOT / "README.md",
        ROOT / "config.yaml",
        *sorted((ROOT / "examples").glob("*.yaml")),
        ROOT / "bench" / "README.md",
    ]


def python_files() -> list[Path]:
    return sorted((ROOT / "geosmtp").rglob("*.py"))


def prose_of_python(source: str) -> list[tuple[int, str]]:
    """(line number, text) of every comment and docstring line of a module."""
    lines: list[tuple[int, str]] = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            lines.append((token.start[0], token.string))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                text = body[0].value.value
                if isinstance(text, str):
                    first = body[0].lineno
                    lines.extend((first + i, line) for i, line in enumerate(text.splitlines()))
    return lines


def allowed(path: str, line: str, match: re.Match[str]) -> bool:
    """Whether an entry of `ALLOWED` covers this hit: its pattern must match
    the line where the hit is (around the hit, so one line holding a promise
    and an allowed phrase still fails)."""
    around = line[max(0, match.start() - 60) : match.end() + 5]
    return any(
        re.fullmatch(where, path) and re.search(what, around, re.IGNORECASE)
        for where, what, _ in ALLOWED
    )


def roadmap_hits(path: str, lines: list[tuple[int, str]]) -> list[str]:
    found = []
    for number, line in lines:
        if not may_hold_roadmap(line):
            continue
        for match in ROADMAP.finditer(line):
            if not allowed(path, line, match):
                found.append(f"{path}:{number}: {match.group(0)!r} in {line.strip()!r}")
    return found


def all_hits() -> list[str]:
    found = []
    for path in python_files():
        source = path.read_text()
        name = str(path.relative_to(ROOT))
        # Tokenizing is slow: only a module with a phrase on some line (in
        # code too, allowed or not) is read again for its comments and docstrings.
        if any(may_hold_roadmap(line) and ROADMAP.search(line) for line in source.splitlines()):
            found += roadmap_hits(name, prose_of_python(source))
    for path in doc_files():
        name = str(path.relative_to(ROOT))
        found += roadmap_hits(name, list(enumerate(path.read_text().splitlines(), 1)))
    return found


def test_no_roadmap_words_in_code_or_docs():
    hits = all_hits()
    assert not hits, "roadmap words (say what is built, not what will be):\n" + "\n".join(hits)


def test_the_scan_reads_what_it_should():
    """The scan is not vacuous: it finds every kind of text it reads, and
    its patterns catch the forms the issue named while leaving the queue's
    "retried later" alone."""
    assert len(python_files()) > 50
    assert all(p.is_file() for p in doc_files())
    assert {p.name for p in doc_files()} >= {"architecture.md", "README.md", "config.yaml"}
    source = '"""Doc: LMTP (later)."""\nx = 1  # TODO: more\ny = "try again later"\n'
    assert [n for n, _ in prose_of_python(source)] == [2, 1]
    assert len(roadmap_hits("geosmtp/x.py", prose_of_python(source))) == 2
    for promise in [
        "LMTP into Dovecot (later)",
        "the future POP3",
        "this is still to come",
        "DSN will be added by issue 9",
        "issue 21 will do it",
        "a stub for now",
        "FIXME",
    ]:
        assert roadmap_hits("docs/x.md", [(1, promise)]), promise
    for fact in [
        "deferred (retried later)",
        "a later attempt",
        "the key lookup failed for now",
        "input not yet processed",
        "a todo list",
    ]:
        assert not roadmap_hits("docs/x.md", [(1, fact)]), fact
