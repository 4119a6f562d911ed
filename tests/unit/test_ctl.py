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
