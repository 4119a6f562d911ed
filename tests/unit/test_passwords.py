"""Password checks: libsodium for argon2id/argon2i, the reference code for the rest."""

from __future__ import annotations

import argon2
import pytest

from geosmtp.auth import check_password, hash_password

CHEAP = {"time_cost": 1, "memory_cost": 1024, "parallelism": 2}


@pytest.mark.parametrize("kind", [argon2.Type.ID, argon2.Type.I, argon2.Type.D])
def test_every_argon2_kind_checks_right_and_wrong_passwords(kind):
    stored = argon2.PasswordHasher(type=kind, **CHEAP).hash("sésame ouvre-toi")
    assert check_password(stored, "sésame ouvre-toi")
    assert not check_password(stored, "sesame ouvre-toi")
    assert not check_password(stored, "")


def test_the_hash_geosmtp_passwd_prints_checks():
    stored = hash_password("correct horse")
    assert stored.startswith("$argon2id$")
    assert check_password(stored, "correct horse")
    assert not check_password(stored, "correct horse ")


@pytest.mark.parametrize(
    "stored",
    ["$argon2id$garbage", "$argon2id$v=19$m=1024,t=1,p=1$c2FsdHNhbHQ$", "plain", "", "$argon2x$"],
)
def test_a_broken_hash_is_a_refusal_never_an_error(stored):
    assert check_password(stored, "anything") is False


def test_a_password_that_is_not_valid_utf8_text_is_refused():
    stored = argon2.PasswordHasher(**CHEAP).hash("x")
    assert not check_password(stored, "\udcff")
