"""`geosmtp ctl`'s pure helpers: the stats screen and `config set` patches."""

from __future__ import annotations

from geosmtp.ctl import _nested, format_stats


def _stats(uptime: float, accepted: int, total: int) -> dict:
    return {
        "version": "9.9",
        "uptime_seconds": uptime,
        "process": {"uid": 65534, "user": "nobody", "workers": 2, "master_pid": 1},
        "connections": {"current": 2, "total": total, "refused": 1},
        "messages": {"accepted": accepted, "rejected": 0, "recipients": accepted},
        "bytes": {"received": 3 * 1024 * 1024, "sent": 512},
        "metrics": {"geosmtp_commands_total": {"verb=MAIL": 7.0, "verb=EHLO": 9.0}},
    }


def test_screen():
    screen = format_stats(_stats(10, 5, 6))
    assert screen.splitlines()[0] == "geosmtp 9.9   up 10 s   2 workers as nobody (uid 65534)"
    assert "refused        1" in screen
    assert "3.0 MiB" in screen and "512 B" in screen
    assert screen.splitlines()[-1] == "commands     EHLO 9  MAIL 7"
    assert "rates" not in screen


def test_rates_use_the_time_the_server_saw():
    # Asked every second, but 1.25 s passed between the two samples.
    screen = format_stats(_stats(11.25, 105, 56), _stats(10, 5, 6), interval=1.0)
    assert "80.0 msgs/s" in screen and "40.0 connections/s" in screen
    # No time passed (a restarted server, a clock oddity): the nominal interval.
    screen = format_stats(_stats(10, 7, 6), _stats(10, 5, 6), interval=2.0)
    assert "1.0 msgs/s" in screen


def test_nested_patch():
    assert _nested("limits.max_recipients", 3) == {"limits": {"max_recipients": 3}}
    assert _nested("max_clients", 5) == {"max_clients": 5}


def test_sessions_escape_what_a_client_chose(capsys):
    """`ctl sessions` prints one printable line per session, whatever the API
    returned (the logs' escapes)."""
    import argparse

    from geosmtp.ctl import cmd_sessions

    session = {
        "id": "A1",
        "peer": "127.0.0.1\u2028forged",
        "port": 4000,
        "listener": "mx\x85",
        "state": "mail",
        "age_seconds": 1.0,
        "bytes_in": 1,
        "bytes_out": 2,
        "user": "al\u202eice",
    }

    class FakeClient:
        def request(self, method: str, path: str, body: object = None) -> dict:
            return {"count": 1, "sessions": [session]}

    cmd_sessions(FakeClient(), argparse.Namespace(json=False))  # type: ignore[arg-type]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(line.isprintable() for line in lines)
    assert "127.0.0.1\\u2028forged:4000" in lines[1]
    assert "mx\\x85" in lines[1] and lines[1].endswith("al\\u202eice")
