"""Which account the workers run as (`server.privileges.account`), by who starts
geosmtp and what `user:`/`group:` say."""

from __future__ import annotations

import grp
import os
import pwd

import pytest

from geosmtp.config import ConfigError
from geosmtp.server import privileges


@pytest.fixture
def as_uid(monkeypatch):
    def set_uid(uid: int) -> None:
        monkeypatch.setattr(os, "geteuid", lambda: uid)

    return set_uid


def test_root_with_a_user_drops_to_it(as_uid):
    as_uid(0)
    nobody = pwd.getpwnam("nobody")
    who, note = privileges.account("nobody", None)
    assert note is None
    assert (who.name, who.uid, who.gid) == ("nobody", nobody.pw_uid, nobody.pw_gid)


def test_root_with_a_user_and_a_group(as_uid):
    as_uid(0)
    group = grp.getgrgid(0).gr_name  # a group every system has
    who, _ = privileges.account("nobody", group)
    assert (who.gid, who.group) == (0, group)


def test_root_without_a_user_says_so(as_uid):
    as_uid(0)
    who, note = privileges.account(None, None)
    assert who is None
    assert "running as root" in note and "'user:'" in note


@pytest.mark.parametrize(
    ("user", "group", "message"),
    [
        ("no-such-account-here", None, "user: no such account: 'no-such-account-here'"),
        ("nobody", "no-such-group-here", "group: no such group: 'no-such-group-here'"),
        ("root", None, "user: 'root' is root; name an unprivileged account"),
    ],
)
def test_root_with_an_unusable_account_is_a_config_error(as_uid, user, group, message):
    as_uid(0)
    with pytest.raises(ConfigError) as caught:
        privileges.account(user, group)
    assert str(caught.value) == message


def test_a_normal_user_ignores_another_account_with_a_note(as_uid):
    nobody = pwd.getpwnam("nobody").pw_uid
    as_uid(nobody)
    assert privileges.account(None, None) == (None, None)
    assert privileges.account("nobody", None) == (None, None)  # it is that account
    who, note = privileges.account("root", None)
    assert who is None
    assert note.startswith("user: 'root' ignored: geosmtp was not started as root")
