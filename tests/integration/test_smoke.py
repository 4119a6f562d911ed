"""The foundation end to end: smtplib in, Maildir out, access log written."""

import mailbox
import smtplib

from tests.conftest import wait_until


def test_plain_mail_is_stored_and_logged(server):
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        refused = client.sendmail(
            "sender@remote.example",
            ["alice@test.example"],
            b"Subject: hello\r\nMessage-ID: <smoke-1@remote.example>\r\n\r\nbody line\r\n",
        )
    assert refused == {}
    box = mailbox.Maildir(server.mail_dir / "alice", create=False)
    (msg,) = list(box)
    assert msg["Subject"] == "hello"
    assert msg["Return-Path"] == "<sender@remote.example>"
    assert "by mx.test.example" in msg["Received"]
    assert msg.get_payload() == "body line\n"
    line = wait_until(lambda: server.access_log(), what="access log")
    assert "from=<sender@remote.example>" in line
    assert "to=<alice@test.example>" in line
    assert "msgid=<smoke-1@remote.example>" in line
    assert "result=250" in line
    assert server.stop() == 0
