"""``python -m sat_cogvideo.demo`` options: ``--model`` for every family, ``--folder``, ``--rebuild``, and the default
folder (``$SAT_COGVIDEO_DEMO``, else ``$SAT_COGVIDEO_CACHE/demo``)."""
from __future__ import annotations

import pytest

from helpers import DEMO_FAMILIES, model_config, read_frames


def expected_video(model):
    """(frames, height, width, fps) the demo writes for ``model`` (I2V 1.5: the size follows the demo's image)."""
    net = model_config(model).network_config.params
    frames = int(net.num_frames)
    is15 = model.startswith("cogvideox1.5")
    height, width = 8 * int(net.latent_height), 8 * int(net.latent_width)
    return frames, (height, width) if not (is15 and "i2v" in model) else None, 16 if is15 else 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("demo_options")


@pytest.mark.parametrize("model", DEMO_FAMILIES)
def test_model_option_builds_and_runs_each_family(model, folder, tmp_path):
    import imageio

    from sat_cogvideo import demo

    out = tmp_path / "v.mp4"
    assert demo.main(["--model", model, "--folder", str(folder), "--num-steps", "1", "--output-path", str(out)]) == 0
    assert (folder / model / "transformer" / "latest").is_file()  # this family's tiny checkpoint, built in --folder
    frames, size, fps = expected_video(model)
    video = read_frames(out)
    assert video.shape[0] == frames
    if size is not None:
        assert video.shape[1:3] == size
    assert imageio.get_reader(str(out)).get_meta_data()["fps"] == fps


def test_folder_default_and_rebuild(tmp_path, monkeypatch, capsys):
    """Without --folder the model goes to $SAT_COGVIDEO_CACHE/demo (when $SAT_COGVIDEO_DEMO is unset) and is
    reused by the next run; --rebuild deletes the folder and builds it again."""
    from sat_cogvideo import demo

    monkeypatch.delenv("SAT_COGVIDEO_DEMO", raising=False)
    monkeypatch.setenv("SAT_COGVIDEO_CACHE", str(tmp_path / "cache"))
    default = tmp_path / "cache" / "demo"
    argv = ["--model", "cogvideox_5b", "--num-steps", "1", "--output-path", str(tmp_path / "v.mp4")]
    assert demo.main(argv) == 0
    assert f"tiny model in {default}" in capsys.readouterr().err
    ckpt = default / "cogvideox_5b" / "transformer" / "latest"
    assert ckpt.is_file() and (default / "vae" / "3d-vae.pt").is_file()
    stale = default / "stale.txt"
    stale.write_text("left by an older version")
    built = ckpt.stat().st_mtime_ns, (default / "vae" / "3d-vae.pt").stat().st_mtime_ns
    assert demo.main(argv) == 0  # cached: nothing rebuilt, nothing removed
    assert stale.exists() and (ckpt.stat().st_mtime_ns, (default / "vae" / "3d-vae.pt").stat().st_mtime_ns) == built
    assert demo.main(argv + ["--rebuild"]) == 0
    assert not stale.exists() and ckpt.is_file()
    assert (default / "vae" / "3d-vae.pt").stat().st_mtime_ns != built[1]
    assert read_frames(tmp_path / "v.mp4").shape[0] == expected_video("cogvideox_5b")[0]
    # --folder wins over the environment
    other = tmp_path / "other"
    assert demo.main(argv + ["--folder", str(other)]) == 0
    assert (other / "cogvideox_5b" / "transformer" / "latest").is_file()
