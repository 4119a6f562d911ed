"""File modes: folders made with exactly their mode, log files 0640 across
rotations, whatever the umask (geosmtp/storage/modes.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from loguru import logger

from geosmtp import logs
from geosmtp.config import Log
from geosmtp.storage.modes import (
    LOG_FILE_MODE,
    UMASK,
    apply_umask,
    make_folder,
    open_log_file,
)


def mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o7777


@pytest.fixture(params=[0o022, 0o077, 0o000], ids=lambda m: f"umask{m:03o}")
def umask(request):  # type: ignore[no-untyped-def]
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_make_folder_gives_every_level_it_makes_the_mode(tmp_path, umask):
    target = tmp_path / "a" / "b" / "c"
    assert make_folder(target, 0o770) is True
    for folder in (tmp_path / "a", tmp_path / "a" / "b", target):
        assert mode(folder) == 0o770, folder
    assert make_folder(target, 0o700) is False  # there already: left as it is
    assert mode(target) == 0o770
    assert mode(tmp_path) != 0o770  # what existed before is not touched


def test_make_folder_leaves_an_existing_folder_alone_and_refuses_a_file(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2775)  # e.g. /var/mail, root:mail
    assert make_folder(shared, 0o750) is False
    assert mode(shared) == 0o2775
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        make_folder(tmp_path / "file", 0o750)
    with pytest.raises(NotADirectoryError):
        make_folder(tmp_path / "file" / "sub", 0o750)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_make_folder_hands_what_it_makes_to_the_owner(tmp_path):
    tmp_path.chmod(0o755)
    make_folder(tmp_path / "mail" / "box", 0o750, owner=(65534, 65533))
    for folder in (tmp_path / "mail", tmp_path / "mail" / "box"):
        st = os.stat(folder)
        assert (st.st_uid, st.st_gid) == (65534, 65533), folder
    assert os.stat(tmp_path).st_uid == 0


def test_apply_umask_sets_0027_and_gives_the_old_one_back():
    old = os.umask(0o077)
    try:
        assert apply_umask() == 0o077
        assert UMASK == 0o027
        assert os.umask(0o077) == 0o027
    finally:
        os.umask(old)


def test_a_log_file_is_0640_made_or_found(tmp_path, umask):
    made = tmp_path / "made.log"
    with open(made, "a", opener=open_log_file) as f:
        f.write("one\n")
    assert mode(made) == LOG_FILE_MODE
    found = tmp_path / "found.log"
    found.write_text("from before\n")
    found.chmod(0o644)
    with open(found, "a", opener=open_log_file) as f:
        f.write("two\n")
    assert mode(found) == LOG_FILE_MODE
    assert found.read_text() == "from before\ntwo\n"  # appended, not replaced


def test_the_log_folder_and_every_log_file_keep_their_modes_across_rotations(tmp_path, umask):
    log_dir = tmp_path / "var" / "logs"
    try:
        logs.setup(Log(dir=log_dir, rotation="200 B", retention=5), console=False)
        for n in range(40):
            logger.info("line {} {}", n, "x" * 40)
            logs.access.log(logs.ACCESS_LEVEL, "access line {}", n)
    finally:
        logger.remove()
    files = sorted(log_dir.iterdir())
    names = {p.name for p in files}
    assert {"log.txt", "access.log"} <= names
    assert len(files) > 4, names  # rotated ones too
    assert mode(log_dir) == 0o750
    assert {p.name: mode(p) for p in files} == {p.name: 0o640 for p in files}
