"""``python -m sat_cogvideo.demo --model <I2V model>``: the I2V demos bring their own first frame and write a video."""
from __future__ import annotations

import os

import pytest


@pytest.mark.parametrize("model,frames,size", [
    ("cogvideox_5b_i2v", 9, (64, 96)),       # 1.0: the image is cover-resized and cropped to the model's size
    ("cogvideox1.5_5b_i2v", 17, (80, 128)),  # 1.5: the size follows the 192x128 image's aspect ratio
])
def test_i2v_demo_writes_its_video(demo_paths, tmp_path, model, frames, size):
    from sat_cogvideo import demo, media

    out = tmp_path / f"{model}.mp4"
    assert demo.main(["--model", model, "--folder", demo_paths["folder"], "--num-steps", "2",
                      "--output-path", str(out)]) == 0
    video, fps = media.read_video(str(out))
    assert video.shape == (frames, *size, 3)
    assert fps == (16 if "1.5" in model else 8)
    assert os.path.isfile(os.path.join(demo_paths["folder"], "first_frame.png"))


def test_demo_image_is_deterministic_and_kept(tmp_path):
    from PIL import Image

    from sat_cogvideo.demo import build_image

    for name in ("a", "b"):
        os.makedirs(tmp_path / name)
    a, b = build_image(str(tmp_path / "a")), build_image(str(tmp_path / "b"))
    assert open(a, "rb").read() == open(b, "rb").read()
    img = Image.open(a)
    assert img.size == (192, 128) and len(set(img.getdata())) == 3  # background, disc, bar
    before = os.stat(a).st_mtime_ns
    assert build_image(str(tmp_path / "a")) == a and os.stat(a).st_mtime_ns == before
    assert sorted(os.listdir(tmp_path / "a")) == ["first_frame.png"]  # no temporary file left behind
