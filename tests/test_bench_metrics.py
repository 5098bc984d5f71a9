"""The quality metric of the benchmarks (benchmarks/bench_options.py ``psnr_ssim``) on hand-computed cases: videos
are ``[F, 3, H, W]`` in [0, 1], as ``sample_video.generate`` and diffusers' ``output_type="pt"`` return them."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from bench_options import psnr_ssim  # noqa: E402

pytest.importorskip("skimage")


def video(frames=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 251, (frames, 3, 16, 16), generator=g).float() / 255  # 8-bit levels, room for +2


def test_psnr_of_a_two_level_offset():
    ref = video()
    psnr, ssim = psnr_ssim(ref + 2 / 255, ref)
    assert psnr == pytest.approx(10 * math.log10(255 ** 2 / 4), abs=1e-6)  # every pixel off by 2 levels: MSE 4
    assert 0.9 < ssim < 1.0


def test_identical_videos_and_frame_axis():
    ref = video()
    psnr, ssim = psnr_ssim(ref.clone(), ref)
    assert psnr == math.inf and ssim == pytest.approx(1.0)
    # one frame of five replaced by noise: SSIM is the mean over frames, so about 4/5 + (noise SSIM)/5
    other = ref.clone()
    other[2] = video(1, seed=1)[0]
    _, ssim = psnr_ssim(other, ref)
    assert 0.79 < ssim < 0.85
