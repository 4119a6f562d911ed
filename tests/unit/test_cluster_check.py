"""The check of examples/cluster/ (`check`, `whole`): it fails on a planted
loss, duplicate, stray or damaged message, so its PASS is not a rubber stamp."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

from bench import messages

PATH = Path(__file__).resolve().parents[2] / "examples" / "cluster" / "cluster.py"
_spec = importlib.util.spec_from_file_location("cluster_example", PATH)
assert _spec is not None and _spec.loader is not None
cluster = importlib.util.module_from_spec(_spec)
sys.modules["cluster_example"] = cluster
_spec.loader.exec_module(cluster)

SENT = [f"run.{n}" for n in range(10)]
ACKED = SENT[:8]  # two sessions were cut before their 250


def found(*ids: str) -> Counter[str]:
    return Counter(ids)


def test_every_acknowledged_message_once_passes():
    v = cluster.check(SENT, ACKED, found(*ACKED))
    assert v.ok and v.problems == []
    assert (v.sent, v.acknowledged, v.delivered) == (10, 8, 8)
    assert v.line().startswith("verdict: PASS: sent 10, acknowledged 8, delivered 8, lost 0,")


def test_an_unacknowledged_message_may_arrive_once():
    v = cluster.check(SENT, ACKED, found(*ACKED, "run.9"))
    assert v.ok and v.unacknowledged_arrived == 1


def test_a_lost_message_fails():
    v = cluster.check(SENT, ACKED, found(*ACKED[1:]))
    assert not v.ok and v.lost == ["run.0"] and v.delivered == 7
    assert v.line().startswith("verdict: FAIL:") and "lost 1," in v.line()


def test_a_duplicate_fails():
    v = cluster.check(SENT, ACKED, found(*ACKED, "run.3"))
    assert not v.ok and v.duplicated == ["run.3"]
    assert "duplicated 1," in v.line()


def test_an_unacknowledged_message_twice_fails():
    v = cluster.check(SENT, ACKED, found(*ACKED, "run.9", "run.9"))
    assert not v.ok and v.duplicated == ["run.9"]


def test_more_copies_dropped_than_could_be_in_flight_fails():
    """Dovecot's duplicate test hides a second copy from the mailbox; the
    count of them must still fit the deliveries in flight at the kill."""
    ok = cluster.check(SENT, ACKED, found(*ACKED), dropped=4, max_in_flight=4)
    assert ok.ok and ok.dropped == 4 and "dropped by Dovecot 4," in ok.line()
    many = cluster.check(SENT, ACKED, found(*ACKED), dropped=5, max_in_flight=4)
    assert not many.ok and "more than the 4 deliveries" in many.problems[0]


def test_the_copies_dovecot_dropped_are_counted_from_its_log():
    log = (
        "lmtp(alice)<1><a>: Info: sieve: msgid=<1.run@bench.test>: "
        "stored mail into mailbox 'INBOX'\n"
        "lmtp(alice)<1><b>: Info: sieve: msgid=<1.run@bench.test>: discard action: "
        "Marked message to be discarded if not explicitly delivered (discard action)\n"
    )
    assert cluster.dropped_copies(log) == 1
    assert cluster.dropped_copies(log.splitlines()[0]) == 0


def test_a_message_not_sent_by_the_run_fails():
    v = cluster.check(SENT, ACKED, found(*ACKED, "other.1"))
    assert not v.ok and v.unknown == ["other.1"]


def test_a_damaged_message_fails():
    v = cluster.check(SENT, ACKED, found(*ACKED), damaged=["run.2"])
    assert not v.ok and v.damaged == ["run.2"]


def test_nothing_acknowledged_is_no_pass():
    v = cluster.check(SENT, [], found())
    assert not v.ok and "nothing was acknowledged" in v.problems[0]


def test_whole_knows_the_body_sent_from_one_changed():
    rcpts = tuple(messages.recipients(5, 1, 10))
    msg = messages.build("run", 5, 1024, rcpts)
    body = b"".join(msg.canonical_body_chunks())
    assert cluster.whole("run", 5, 1024, rcpts, body)
    assert not cluster.whole("run", 5, 1024, rcpts, body[:-2] + b"X\n")
    assert not cluster.whole("run", 6, 1024, rcpts, body)


def test_it_names_what_is_missing_and_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(cluster, "HAPROXY", "/nonexistent/haproxy")
    monkeypatch.setattr(cluster.dovecot_peer, "LMTP_SERVER", "/nonexistent/lmtp")
    assert cluster.main(["--quick"]) == 2
    out = capsys.readouterr().out
    assert "cannot run: missing haproxy" in out and "dovecot-lmtpd" in out


def test_the_benchs_direct_path_takes_no_proxy_header_and_haproxys_does(tmp_path):
    """`--bench`'s `direct` setup sends to the front end without HAProxy: a
    listener waiting for a PROXY header would close every one of those
    connections (it did, with PROXY on by default, before this test)."""
    opts = cluster.Options()
    for name in ("direct", "haproxy"):
        (tmp_path / name).mkdir()
    direct = cluster.bench_cluster(tmp_path / "direct", opts, 1, "direct")
    proxied = cluster.bench_cluster(tmp_path / "haproxy", opts, 2, "HAProxy")
    assert not direct.fronts[0].proxy_protocol
    assert "proxy_protocol" not in direct.fronts[0].config_path.read_text()
    assert all(fe.proxy_protocol for fe in proxied.fronts)
    assert "send-proxy-v2" in proxied.haproxy.config.read_text()
    assert opts.proxy_protocol  # the caller's options are left as they were
