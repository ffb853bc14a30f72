"""Atomic outputs."""

from __future__ import annotations

import os

import pytest

from edge_adapt.errors import UsageError
from edge_adapt.fileio import atomic_dir, atomic_file


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
