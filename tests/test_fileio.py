"""Atomic outputs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

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


# -- taking back what a failed command made -----------------------------------------------------------------
def _fail_inside(*paths, keep=(), make=lambda: None):
    from edge_adapt.fileio import removed_on_failure

    with pytest.raises(KeyboardInterrupt):
        with removed_on_failure(*paths, keep=keep):
            make()
            raise KeyboardInterrupt


def _write(path, text="x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_cache_inside_a_new_report_folder_keeps_its_samples_and_nothing_else_is_left(tmp_path):
    """Was: `eval --out R --cache R/cache` interrupted removed R whole, the samples with it."""
    out, cache = tmp_path / "R", tmp_path / "R" / "cache"

    def make():
        _write(cache / "pool-a.jsonl")
        _write(out / "partial.png")
        (cache / "empty").mkdir()

    _fail_inside(out, cache, keep=[cache], make=make)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "R", "R/cache", "R/cache/pool-a.jsonl"]


def test_a_cache_that_is_the_report_folder_keeps_its_samples(tmp_path):
    same = tmp_path / "R"
    _fail_inside(same, same, keep=[same], make=lambda: _write(same / "pool-a.jsonl"))
    assert (same / "pool-a.jsonl").read_text() == "x"


def test_the_folders_made_above_a_new_output_go_with_it_and_an_empty_cache_too(tmp_path):
    """Was: an interrupted run with a new `--cache a/b/c` left `a/b` behind."""
    cache, out = tmp_path / "a" / "b" / "c", tmp_path / "x" / "y"
    _fail_inside(out, cache, keep=[cache], make=lambda: (cache.mkdir(parents=True), _write(out / "f")))
    assert list(tmp_path.iterdir()) == []


def test_what_existed_before_is_never_touched(tmp_path):
    old = tmp_path / "R"
    _write(old / "notes.md", "mine")
    _fail_inside(old, make=lambda: _write(old / "new.png"))
    assert [p.name for p in old.iterdir()] == ["notes.md"] and (old / "notes.md").read_text() == "mine"


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody may write: mode 555, or for root (who ignores modes) a read-only tmpfs mounted on it."""
    import subprocess

    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("root writes anywhere, and no read-only file system can be mounted here")
    try:
        yield ro
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def test_an_unwritable_output_folder_is_refused_before_any_work(read_only_dir):
    """Was: label and tune-policy found out only when writing, after all the sampling."""
    from edge_adapt.errors import ModelFileError
    from edge_adapt.fileio import check_target

    with pytest.raises(ModelFileError, match="cannot write .*policy.json: permission denied"):
        check_target(read_only_dir / "policy.json", force=False)


def _broken_link(tmp_path: Path, kind: str) -> Path:
    """A symbolic link that leads nowhere: to a missing path, or to a link back to itself."""
    link = tmp_path / "link"
    if kind == "dangling":
        link.symlink_to(tmp_path / "missing")
    else:
        link.symlink_to(tmp_path / "link2")
        (tmp_path / "link2").symlink_to(link)
    return link


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_a_broken_link_as_an_output_folder_is_one_clear_error(tmp_path, kind):
    from edge_adapt.fileio import check_output_dir

    link = _broken_link(tmp_path, kind)
    with pytest.raises(UsageError, match="link is a symbolic link to .*, which does not exist"):
        check_output_dir(link, force=False, reuse=True)


def test_a_directory_that_cannot_be_moved_aside_is_left_as_it_was_with_nothing_beside_it(tmp_path, monkeypatch):
    """Was: replacing "." (a rename the OS refuses) left an empty `..XXXX.old` folder behind."""
    from edge_adapt.fileio import replace_path

    work = tmp_path / "work"
    (work / "new").mkdir(parents=True)
    (work / "mine.txt").write_text("kept")
    monkeypatch.chdir(work)
    with pytest.raises(OSError):
        replace_path(work / "new", Path("."))
    assert sorted(p.name for p in work.iterdir()) == ["mine.txt", "new"]


def test_a_directory_output_named_by_a_symlink_replaces_what_it_leads_to_and_the_link_stays(tmp_path):
    """Was: `eval --out linkout` renamed the link away and put a real directory in its place: the report never
    reached the link's target, which kept its old contents, and the link was lost."""
    real, link = tmp_path / "disk" / "out", tmp_path / "out"
    real.mkdir(parents=True)
    (real / "old.txt").write_text("earlier run")
    link.symlink_to(real)
    with pytest.raises(UsageError, match=f"{link} already exists; pass --force"):  # named as typed
        with atomic_dir(link):
            pass
    with atomic_dir(link, force=True, carry=lambda name: name == "old.txt") as tmp:
        (tmp / "report.md").write_text("new")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert sorted(p.name for p in real.iterdir()) == ["old.txt", "report.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "out"]  # no temp or parked folder left
    assert sorted(p.name for p in real.parent.iterdir()) == ["out"]


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_a_broken_link_as_a_directory_output_is_refused_and_left_as_it_was(tmp_path, kind):
    """Was: with --force a dangling link (or a loop) was replaced by the new directory."""
    link = _broken_link(tmp_path, kind)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UsageError, match=r"link is a symbolic link to .*, which does not exist \(or loops\)"):
        with atomic_dir(link, force=True) as tmp:
            (tmp / "report.md").write_text("new")
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_directory_output_holding_an_input_is_refused_through_links_too(tmp_path):
    """`import out/m.gguf -o out --force` deleted the model it read: the output folder is swapped as a whole."""
    from edge_adapt.fileio import check_replaceable

    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    model = out / "sub" / "m.gguf"
    model.write_text("weights")
    (tmp_path / "link").symlink_to(out)
    (tmp_path / "m.gguf").symlink_to(model)  # an input outside, leading inside
    for output, given in ((out, model), (tmp_path / "link", model), (out, tmp_path / "link" / "sub" / "m.gguf"),
                          (out, tmp_path / "m.gguf")):
        with pytest.raises(UsageError, match=f"^{output} holds the input {given}: .*would delete the input"):
            check_replaceable(output, inputs=[given])
    check_replaceable(out / "sub" / "new", inputs=[model, tmp_path / "elsewhere.gguf"])  # beside is fine
    check_replaceable(tmp_path / "outer", inputs=[model])


def test_a_file_output_that_is_or_lies_inside_an_input_is_refused_through_links_too(tmp_path):
    """`convert hf -o hf/model.safetensors --force` replaced the weights it read: --force is for earlier outputs."""
    from edge_adapt.fileio import check_not_input

    hf = tmp_path / "hf"
    hf.mkdir()
    weights = hf / "model.safetensors"
    weights.write_text("weights")
    (tmp_path / "link").symlink_to(weights)
    for output, given, how in ((weights, weights, "is"), (tmp_path / "link", weights, "is"),
                               (weights, tmp_path / "link", "is"), (weights, hf, "is a file inside")):
        with pytest.raises(UsageError, match=f"^{output} {how} the input {given}; name an output the command"):
            check_not_input(output, [None, given])
    check_not_input(tmp_path / "m.gguf", [None, hf, weights])  # beside is fine
    check_not_input(hf / "model.gguf", [hf])  # and so is a new file beside the checkpoint's, as llama.cpp writes it


def test_an_output_under_a_file_names_the_file_in_the_way(tmp_path):
    """Was: `-o labels.jsonl/x.jsonl` said "output directory labels.jsonl does not exist", though it does."""
    from edge_adapt.fileio import check_target

    (tmp_path / "labels.jsonl").write_text("{}\n")
    for output in (tmp_path / "labels.jsonl" / "x.jsonl", tmp_path / "labels.jsonl" / "sub" / "x.jsonl"):
        with pytest.raises(UsageError, match=f"^cannot write {output}: {tmp_path / 'labels.jsonl'} is not a directory$"):
            check_target(output, force=True)
    with pytest.raises(UsageError, match="^output directory .*missing does not exist$"):
        check_target(tmp_path / "missing" / "x.jsonl", force=False)
