"""Atomic outputs."""

from __future__ import annotations

import os
import stat

import pytest

from edge_adapt.errors import UsageError
from edge_adapt.fileio import atomic_dir, atomic_file, atomic_output


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "f.txt") as tmp:
            tmp.write_text("x")
        with atomic_dir(tmp_path / "d"):
            pass
    finally:
        os.umask(mask)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_a_directory_in_the_way_of_an_output_file_is_named_as_such_with_or_without_force(tmp_path):
    for force in (False, True):
        with pytest.raises(UsageError, match=f"^{tmp_path} is a directory$"):
            with atomic_file(tmp_path, force=force):
                pass


def test_force_never_replaces_a_fifo_or_a_device_with_a_file(tmp_path):
    """`-o X --force` (and chat's `/save X --force`) replaces an earlier output, not whatever has the name: a FIFO
    or a device (here through a symlink to /dev/null) stays, also when it appears while the output is made."""
    fifo, device = tmp_path / "fifo", tmp_path / "null"
    os.mkfifo(fifo)
    device.symlink_to(os.devnull)
    for path, why in ((fifo, "is a FIFO, not a regular file"), (device, "is a device, not a regular file")):
        with pytest.raises(UsageError, match=f"^{path} {why}$"):
            with atomic_output(path, force=True) as fh:
                fh.write(b"x")
    with pytest.raises(UsageError, match=f"^{fifo} exists and is not a directory$"):  # not "pass --force"
        with atomic_dir(fifo):
            pass
    late = tmp_path / "late"
    with pytest.raises(UsageError, match="is a FIFO, not a regular file"):
        with atomic_file(late, force=True) as tmp:
            tmp.write_text("x")
            os.mkfifo(late)
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and stat.S_ISFIFO(late.lstat().st_mode) and device.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "late", "null"]  # no temp file left behind


def test_a_symlink_output_is_replaced_only_with_force_and_what_it_points_to_is_left_alone(tmp_path):
    kept, link, dangling = tmp_path / "kept.txt", tmp_path / "link.txt", tmp_path / "dangling.txt"
    kept.write_text("mine")
    link.symlink_to(kept)
    dangling.symlink_to(tmp_path / "gone")
    for path in (link, dangling):
        with pytest.raises(UsageError, match="already exists; pass --force"):
            with atomic_file(path) as tmp:
                tmp.write_text("new")
        with atomic_file(path, force=True) as tmp:
            tmp.write_text("new")
        assert not path.is_symlink() and path.read_text() == "new"
    assert kept.read_text() == "mine"
