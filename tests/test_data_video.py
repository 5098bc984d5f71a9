"""SFTDataset: folder format, frame sampling by fps, resize/crop, normalisation, and every bad-data case."""
import os

import numpy as np
import pytest
import torch

from sat_cogvideo.data_video import (SFTDataset, pad_last_frame, resize_for_rectangle_crop,
                                     select_frame_indices)
from sat_cogvideo.errors import UserError


def write_video(path, num_frames, fps, height=48, width=64, step=4):
    """Frame k is a flat grey of value step*k (so decoded frames tell which source frame they are)."""
    import imageio

    os.makedirs(os.path.dirname(path), exist_ok=True)
    writer = imageio.get_writer(path, format="FFMPEG", mode="I", fps=fps, macro_block_size=1, quality=10)
    for k in range(num_frames):
        writer.append_data(np.full((height, width, 3), min(step * k, 255), np.uint8))
    writer.close()


def write_label(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def make_pair(root, stem, num_frames=40, fps=24, caption=b"a cat", **kw):
    write_video(os.path.join(root, "videos", f"{stem}.mp4"), num_frames, fps, **kw)
    write_label(os.path.join(root, "labels", f"{stem}.txt"), caption)


# ---------------------------------------------------------------------------------------------------------- frames


def test_case_a_samples_nearest_frames_at_target_fps():
    # 30 fps source sampled at 8 fps: frame times k/8 s -> source frames round(k * 3.75) after the skipped 3.
    idx, n = select_frame_indices(300, 30.0, 8, 9, skip_frms_num=3)
    assert n == 9
    assert idx == [3 + int(np.floor(k * 3.75 + 0.5)) for k in range(9)] == [3, 7, 11, 14, 18, 22, 26, 29, 33]
    # The original's floored step would give 3 (10 fps): we cover 8/8 s, not 8/10 s.
    assert (idx[-1] - idx[0]) / 30.0 == pytest.approx(1.0, abs=0.02)


def test_case_a_source_slower_than_target_repeats_frames_instead_of_failing():
    idx, n = select_frame_indices(100, 4.0, 8, 9, skip_frms_num=0)  # original: step 0 -> error
    assert n == 9 and idx == [0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_case_a_indices_clamped_to_clip():
    # 40 frames at 30 fps last 10.7 frames at 8 fps, but 10 skipped frames push the last time past the end
    # (the original raises IndexError here).
    idx, _ = select_frame_indices(40, 30.0, 8, 9, skip_frms_num=10)
    assert idx[-1] == 39 and idx[-2] == 10 + 26 and len(idx) == 9


def test_case_b_and_c_as_original():
    # B: 60 frames at 30 fps, 2 s * 8 fps = 16 <= 49 but 60 > 49: step max((57-3)//49, 1) = 1
    idx, n = select_frame_indices(60, 30.0, 8, 49, skip_frms_num=3)
    assert n == 49 and idx == list(range(3, 52))
    # C: 20 frames <= 49: n = 20 - 6 = 14 -> largest 4k+1 <= 14 is 13
    idx, n = select_frame_indices(20, 30.0, 8, 49, skip_frms_num=3)
    assert n == 13 and idx == list(range(3, 16))
    # C with n % 4 == 0: n = 12 -> 9
    idx, n = select_frame_indices(18, 30.0, 8, 49, skip_frms_num=3)
    assert n == 9 and idx == list(range(3, 12))


def test_pad_last_frame():
    x = torch.arange(3.0).view(3, 1, 1, 1)
    assert pad_last_frame(x, 5).flatten().tolist() == [0, 1, 2, 2, 2]
    assert pad_last_frame(x, 2).flatten().tolist() == [0, 1]


def test_resize_for_rectangle_crop_covers_and_centres():
    # 40x120 (wide) to 20x30: resized to height 20, width 60, centre crop columns 15..44.
    x = torch.zeros(1, 3, 40, 120)
    x[..., :, 60:] = 255.0  # right half white
    y = resize_for_rectangle_crop(x, [20, 30])
    assert y.shape == (1, 3, 20, 30)
    assert y[0, 0, 10, 0] == 0 and y[0, 0, 10, -1] == 255  # the boundary is in the middle after centring
    assert float(y.min()) >= 0 and float(y.max()) <= 255 and torch.equal(y, y.round())


# ---------------------------------------------------------------------------------------------------------- dataset


def test_dataset_items(tmp_path):
    root = str(tmp_path / "data")
    make_pair(root, "1", num_frames=40, fps=24, caption="un chat qui dort\nsecond line ignored".encode())
    make_pair(root, "2", num_frames=6, fps=24, caption=b"short clip")
    ds = SFTDataset(root, video_size=[32, 40], fps=8, max_num_frames=9, skip_frms_num=0)
    assert len(ds) == 2 and not ds.skipped
    item = ds[0]
    assert set(item) == {"mp4", "txt", "num_frames", "fps"}
    assert item["txt"] == "un chat qui dort" and item["fps"] == 8 and item["num_frames"] == 9
    assert item["mp4"].shape == (9, 3, 32, 40) and item["mp4"].dtype == torch.float32
    # 24 fps at 8 fps: source frames 0, 3, 6, ... ; frame k has grey value 4k (h264 is near-lossless on flat frames)
    grey = item["mp4"].mean(dim=(1, 2, 3)) * 127.5 + 127.5
    assert torch.allclose(grey, torch.tensor([4.0 * 3 * k for k in range(9)]), atol=2.5)
    # Case C: 6 frames -> 5 used (4k+1), padded with the last to 9
    short = ds[1]
    assert short["num_frames"] == 5 and short["mp4"].shape[0] == 9
    g = short["mp4"].mean(dim=(1, 2, 3)) * 127.5 + 127.5
    assert torch.allclose(g[4:], g[4].expand(5), atol=1e-6) and abs(float(g[4]) - 16) < 2.5
    # Default collate gives the batch of the original.
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["mp4"].shape == (2, 9, 3, 32, 40) and batch["num_frames"].tolist() == [9, 5]
    assert batch["fps"].tolist() == [8, 8] and batch["txt"] == ["un chat qui dort", "short clip"]


def test_create_dataset_function_matches_constructor(tmp_path):
    root = str(tmp_path / "d")
    make_pair(root, "1")
    ds = SFTDataset.create_dataset_function(root, None, video_size=[16, 16], fps=8, max_num_frames=5,
                                            skip_frms_num=3.0)
    assert isinstance(ds, SFTDataset) and ds.data_dir == root and ds.max_num_frames == 5


def test_bad_data_reported_once_with_path_and_skipped(tmp_path, capsys):
    root = str(tmp_path / "data")
    make_pair(root, "good", num_frames=20)
    # a caption without a video
    write_label(os.path.join(root, "labels", "orphan.txt"), b"no video for me")
    # a video without a caption
    write_video(os.path.join(root, "videos", "nolabel.mp4"), 20, 24)
    # an empty caption
    make_pair(root, "empty", num_frames=20, caption=b"\n\n")
    # a caption that is not UTF-8
    make_pair(root, "latin1", num_frames=20, caption="caf\xe9 cr\xe8me".encode("latin-1"))
    # an unreadable video
    write_label(os.path.join(root, "labels", "broken.txt"), b"a broken file")
    write_label(os.path.join(root, "videos", "broken.mp4"), b"this is not an mp4" * 10)
    # a video too short once the skipped frames are removed (4 frames, 3 skipped at each end)
    make_pair(root, "short", num_frames=4)
    ds = SFTDataset(root, video_size=[16, 16], fps=8, max_num_frames=9, skip_frms_num=3)
    err = capsys.readouterr().err
    assert len(ds) == 1 and ds.video_paths == [os.path.join(root, "videos", "good.mp4")]
    expect = {
        os.path.join(root, "labels", "orphan.txt"): "caption without video",
        os.path.join(root, "videos", "nolabel.mp4"): "video without caption",
        os.path.join(root, "labels", "empty.txt"): "empty caption",
        os.path.join(root, "labels", "latin1.txt"): "not UTF-8",
        os.path.join(root, "videos", "broken.mp4"): "cannot be decoded",
        os.path.join(root, "videos", "short.mp4"): "too short",
    }
    for path, reason in expect.items():
        lines = [ln for ln in err.splitlines() if path in ln]
        assert len(lines) == 1, (path, err)
        assert lines[0].startswith(f"warning: skipping {path}: ") and reason in lines[0]
    assert set(ds.skipped) == set(expect)
    assert ds[0]["txt"] == "a cat"


def test_video_failing_during_training_is_replaced_and_reported_once(tmp_path, capsys):
    root = str(tmp_path / "data")
    make_pair(root, "1", caption=b"first")
    make_pair(root, "2", caption=b"second")
    ds = SFTDataset(root, video_size=[16, 16], fps=8, max_num_frames=5, skip_frms_num=0)
    capsys.readouterr()
    bad = os.path.join(root, "videos", "1.mp4")
    with open(bad, "wb") as f:  # the file is damaged after the dataset was built
        f.write(b"\x00" * 100)
    items = [ds[0], ds[0], ds[1]]
    assert [it["txt"] for it in items] == ["second", "second", "second"]
    err = capsys.readouterr().err
    assert err.count(bad) == 1 and "cannot be decoded" in err


def test_every_video_failing_during_training_is_a_clear_error(tmp_path):
    root = str(tmp_path / "data")
    make_pair(root, "1")
    ds = SFTDataset(root, video_size=[16, 16], fps=8, max_num_frames=5, skip_frms_num=0)
    with open(os.path.join(root, "videos", "1.mp4"), "wb") as f:
        f.write(b"\x00" * 100)
    with pytest.raises(UserError, match="no video of dataset .* can be decoded"):
        ds[0]


def test_no_usable_pair_is_a_clear_error_before_training(tmp_path):
    root = str(tmp_path / "data")
    write_label(os.path.join(root, "labels", "1.txt"), b"")
    write_video(os.path.join(root, "videos", "1.mp4"), 20, 24)
    with pytest.raises(UserError, match=r"has no usable video/caption pair .*1 file\(s\) skipped"):
        SFTDataset(root, video_size=[16, 16], fps=8, max_num_frames=5)
    with pytest.raises(UserError, match="does not exist"):
        SFTDataset(str(tmp_path / "missing"), video_size=[16, 16], fps=8, max_num_frames=5)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(UserError, match="no usable video/caption pair"):
        SFTDataset(str(tmp_path / "empty"), video_size=[16, 16], fps=8, max_num_frames=5)
