"""`bash inference.sh`: the demo (no arguments) and the pass-through to sample_video (with arguments)."""
from __future__ import annotations

import os
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_sh(args, cwd, demo_folder, timeout=600):
    env = dict(os.environ, SAT_COGVIDEO_DEMO=demo_folder)
    return subprocess.run(["bash", os.path.join(ROOT, "inference.sh"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_demo_writes_playable_mp4_and_preview_of_what_was_asked(tmp_path):
    """No arguments: the trained demo model (demo_model/) is asked for "a red circle moving to the right" and draws
    a red shape; the summary says what was asked and what the video shows; a PNG strip of the frames lies beside."""
    import imageio
    from PIL import Image

    from sat_cogvideo import demo_world as world

    t0 = time.time()
    proc = run_sh([], tmp_path, str(tmp_path / "unused-demo-cache"))
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "outputs" / "demo.mp4"
    reader = imageio.get_reader(str(out))
    frames = [f for f in reader]
    assert len(frames) == world.FRAMES and frames[0].shape == (world.SIZE, world.SIZE, 3)
    assert reader.get_meta_data()["fps"] == world.FPS
    seen = world.describe(frames)
    assert seen["color"] == "red", seen  # the prompt's colour (demo_model/README.md: what the model has learned)
    assert "asked:   'a red circle moving to the right'" in proc.stdout
    assert "shows:   a red shape" in proc.stdout
    assert Image.open(tmp_path / "outputs" / "demo.png").size == (world.SIZE * min(8, world.FRAMES), world.SIZE)
    assert elapsed < 120, f"demo took {elapsed:.0f}s"


def test_arguments_pass_through_to_sample_video(demo_paths, tmp_path):
    cfg = os.path.join(ROOT, "configs", "tiny", "cogvideox_5b.yaml")
    proc = run_sh(["--base", cfg, "--load", demo_paths["cogvideox_5b"], "--prompt", "a cat", "--num-frames", "10",
                   "--output-path", "x.mp4", "--device", "cpu"], tmp_path, demo_paths["folder"], timeout=300)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --num-frames 10 is not of the form 4N+1"), last
    assert not (tmp_path / "x.mp4").exists()
