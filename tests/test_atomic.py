"""Atomic file writes (:mod:`sat_cogvideo.atomic`): normal file mode, nothing left behind on failure."""
import os
import stat

import pytest

from sat_cogvideo.atomic import atomic_path, atomic_torch_save, atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_get_the_umask_mode(tmp_path, umask_022):
    text, pt = tmp_path / "a" / "note.txt", tmp_path / "b" / "x.pt"
    atomic_write_text(text, "hello\n")
    atomic_torch_save({"x": 1}, pt)
    assert text.read_text() == "hello\n"
    for path in (text, pt):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0o600
    assert sorted(os.listdir(tmp_path / "a")) == ["note.txt"]


def test_failure_leaves_neither_target_nor_temp(tmp_path, umask_022):
    target = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert os.path.dirname(tmp) == str(tmp_path) and tmp.endswith(".mp4")
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise RuntimeError("writer failed")
    assert os.listdir(tmp_path) == []


def test_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "latest"
    atomic_write_text(target, "1\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target):
            raise RuntimeError("writer failed")
    assert target.read_text() == "1\n" and os.listdir(tmp_path) == ["latest"]


def test_temp_dir_gets_the_mkdir_mode(tmp_path):
    import stat

    from sat_cogvideo.atomic import make_temp_dir

    old = os.umask(0o022)
    try:
        folder = make_temp_dir(tmp_path / "parent", prefix=".x-")
    finally:
        os.umask(old)
    assert os.path.basename(folder).startswith(".x-") and os.path.dirname(folder) == str(tmp_path / "parent")
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755
