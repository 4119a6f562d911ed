"""The SMTP core's contract with its shell, h11-style (issue 9).

What the shell may call when, what it gets back, and what happens when it
calls something at the wrong time; the per-command tally.
"""

from __future__ import annotations

import pytest

from .smtp_helpers import DATA, EHLO, MAIL, MODES, RCPT, make_conn, run

# ----------------------------------------------------------------- the tally


@pytest.mark.parametrize("mode", MODES)
def test_take_counts_tallies_verbs_and_reply_classes(mode):
    conn = make_conn()
    script = [EHLO, MAIL, RCPT, b"RCPT TO:<x@elsewhere.test>\r\n", b"FOO\r\n", DATA, b".\r\n"]
    res = run(script, mode, conn)
    counts = conn.take_counts()
    noops = 2 if mode == "pipelined" else 0  # the harness's NOOP before and after
    expected = {"EHLO": 1, "MAIL": 1, "RCPT": 2, "UNKNOWN": 1, "DATA": 1, "2xx": 4 + noops}
    expected |= {"3xx": 1, "5xx": 2}
    if noops:
        expected["NOOP"] = noops
    assert counts == expected
    assert res.codes.count(250) == 4  # the last: queued


def test_take_counts_starts_a_new_tally():
    conn = make_conn()
    conn.greeting()
    run([EHLO, MAIL], "whole", conn)
    first = conn.take_counts()
    assert first == {"EHLO": 1, "MAIL": 1, "2xx": 3}
    assert conn.take_counts() == {}
    run([b"NOOP\r\n"], "whole", conn)
    assert conn.take_counts() == {"NOOP": 1, "2xx": 1}
    assert first == {"EHLO": 1, "MAIL": 1, "2xx": 3}  # the caller's dict is left alone
