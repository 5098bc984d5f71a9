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


def test_demo_writes_playable_mp4(demo_paths, tmp_path):
    import imageio

    t0 = time.time()
    proc = run_sh([], tmp_path, demo_paths["folder"])
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "outputs" / "demo_cogvideox_5b.mp4"
    assert out.is_file()
    reader = imageio.get_reader(str(out))
    frames = [f for f in reader]
    assert len(frames) == 9 and frames[0].shape == (64, 96, 3)
    assert reader.get_meta_data()["fps"] == 8
    assert "RANDOM weights" in proc.stdout and "configs/cogvideox_5b.yaml" in proc.stdout
    assert elapsed < 120, f"demo took {elapsed:.0f}s"
    # the cached model is reused: building again changes nothing in the demo folder
    from pathlib import Path

    from sat_cogvideo.demo import build_demo

    before = {str(p): p.stat().st_mtime_ns for p in Path(demo_paths["folder"]).rglob("*")}
    build_demo(demo_paths["folder"])
    assert before == {str(p): p.stat().st_mtime_ns for p in Path(demo_paths["folder"]).rglob("*")}


def test_arguments_pass_through_to_sample_video(demo_paths, tmp_path):
    cfg = os.path.join(ROOT, "configs", "tiny", "cogvideox_5b.yaml")
    proc = run_sh(["--base", cfg, "--load", demo_paths["cogvideox_5b"], "--prompt", "a cat", "--num-frames", "10",
                   "--output-path", "x.mp4", "--device", "cpu"], tmp_path, demo_paths["folder"], timeout=300)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --num-frames 10 is not of the form 4N+1"), last
    assert not (tmp_path / "x.mp4").exists()
