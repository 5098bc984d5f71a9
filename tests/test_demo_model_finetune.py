"""``bash finetune.sh`` without arguments: LoRA on the trained demo model with clips of a colour it has never seen
(cyan) learns that colour; the before/after previews are written."""
from __future__ import annotations

import os
import subprocess

import pytest

from sat_cogvideo import demo_world as world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # reason: 80 LoRA iterations and 4 generations on the CPU (2.5 min on 2 cores)
def test_finetune_demo_learns_the_new_colour(tmp_path):
    from sat_cogvideo import demo, media

    env = dict(os.environ, SAT_COGVIDEO_DEMO=str(tmp_path / "demo"), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "SAT_COGVIDEO_DEMO_MODEL"):
        env.pop(key, None)
    out = subprocess.run(["bash", os.path.join(ROOT, "finetune.sh")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=3600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "demo done" in out.stderr
    videos = sorted(os.listdir(tmp_path / "demo" / "lora_dataset" / "videos"))
    assert len(videos) == 2 * 4 * 3  # cyan x shapes x directions x 3 clips
    assert os.path.isfile(tmp_path / "outputs" / "demo_lora_before_after.png")
    for i, prompt in enumerate(demo.LORA_PROMPTS):
        color, _, direction = world.parse_caption(prompt)
        before = world.describe(media.read_video(str(tmp_path / "outputs" / f"demo_lora_before_{i}.mp4"))[0])
        after = world.describe(media.read_video(str(tmp_path / "outputs" / f"demo_lora_after_{i}.mp4"))[0])
        assert before["color"] != color, before  # never seen: the base model draws another colour
        assert after["color"] == color, after
        assert os.path.isfile(tmp_path / "outputs" / f"demo_lora_after_{i}.png")
