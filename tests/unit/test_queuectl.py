"""`geosmtp queue`'s output: the list table and the record as `show` prints it."""

from __future__ import annotations

from geosmtp.queuectl import format_entry, format_list, human_age


def test_human_age():
    assert [human_age(s) for s in (0, 59.9, 60, 185, 3600, 7620, 86400, 97200)] == [
        "0s",
        "59s",
        "1m00s",
        "3m05s",
        "1h00m",
        "2h07m",
        "1d00h",
        "1d03h",
    ]


def _entry(**extra):  # type: ignore[no-untyped-def]
    return {
        "id": "ABC1",
        "sender": "",
        "arrival": "2026-12-01T12:00:00Z",
        "age_seconds": 65.2,
        "size": 2048,
        "held": False,
        "in_flight": False,
        "recipients": [
            {
                "address": "bob@remote.test",
                "state": "pending",
                "attempts": 2,
                "next_attempt": "2026-12-01T13:00:00Z",
                "status": "4.3.0",
                "last_error": "smtp; 451 4.3.0 later",
            },
            {
                "address": "carol@remote.test",
                "state": "delivered",
                "attempts": 1,
                "next_attempt": None,
                "status": "2.0.0",
                "last_error": None,
            },
        ],
        **extra,
    }


def test_format_list():
    text = format_list(
        {"count": 1, "held": 1, "oldest_age_seconds": 65.2, "entries": [_entry(held=True)]}
    )
    assert text.splitlines() == [
        "ID      AGE     SIZE  STATE  SENDER  RECIPIENTS",
        "ABC1  1m05s  2.0 KiB  held   <>      bob@remote.test  pending, 2 attempts, "
        "next 2026-12-01T13:00:00Z: smtp; 451 4.3.0 later",
        "                                     carol@remote.test  delivered, 1 attempt",
        "1 message, 1 held, oldest 1m05s",
    ]
    assert format_list({"count": 0, "held": 0, "oldest_age_seconds": 0, "entries": []}) == (
        "the queue is empty"
    )
    # Entries in quarantine/ (issue 18) are told, with or without a queue.
    empty = {"count": 0, "held": 0, "oldest_age_seconds": 0, "entries": [], "quarantined": 2}
    assert format_list(empty) == (
        "the queue is empty\n2 unusable entries in the queue folder's quarantine/ "
        "(see the server log)"
    )
    one = {"count": 1, "held": 0, "oldest_age_seconds": 1, "entries": [_entry()], "quarantined": 1}
    assert format_list(one).splitlines()[-2:] == [
        "1 message, 0 held, oldest 1s",
        "1 unusable entry in the queue folder's quarantine/ (see the server log)",
    ]


def test_format_entry():
    text = format_entry(_entry(in_flight=True, client="127.0.0.1", auth_user="alice"))
    lines = text.splitlines()
    assert lines[:3] == ["id           ABC1", "state        sending", "sender       <>"]
    assert "arrival      2026-12-01T12:00:00Z (1m05s ago)" in lines
    assert "envid        -" in lines and "auth_user    alice" in lines
    assert lines[lines.index("recipients") + 1] == "  <bob@remote.test>"
    assert "    last_error   smtp; 451 4.3.0 later" in lines


def test_what_a_client_chose_is_escaped():
    """A sender, an address, a remote's reply: one printable line each, with
    the logs' escapes (a U+2028 would start a line for `str.splitlines`)."""
    entry = _entry(sender="s\u202e@x\u2028forged", client="127.0.0.1")
    entry["recipients"][0]["address"] = "b\x85ob@remote.test"
    entry["recipients"][0]["last_error"] = "smtp; 451 \xa0later\u2029x"
    listed = format_list({"count": 1, "held": 0, "oldest_age_seconds": 1, "entries": [entry]})
    shown = format_entry(entry)
    for text in (listed, shown):
        assert all(line.isprintable() for line in text.splitlines())
        assert "<s\\u202e@x\\u2028forged>" in text and "b\\x85ob@remote.test" in text
        assert "451 \\xa0later\\u2029x" in text
    assert len(listed.splitlines()) == 4
