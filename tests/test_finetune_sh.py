"""finetune.sh: a tiny LoRA run really trains; arguments and NPROC/--nproc reach the right command; the no-argument
demo's command (the demo itself: tests/test_demo_model_finetune.py)."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "finetune.sh")


def run(args, cwd, **env):
    full = dict(os.environ, **{k: str(v) for k, v in env.items()})
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        full.pop(key, None)
    return subprocess.run(["bash", SCRIPT, *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=300)


def test_arguments_and_nproc_build_the_command(tmp_path):
    out = run(["--base", "a.yaml", "b.yaml", "--seed", "3"], tmp_path, FINETUNE_DRY_RUN=1)
    assert out.returncode == 0, out.stderr
    assert "-m sat_cogvideo.train_video --base a.yaml b.yaml --seed 3" in out.stdout
    assert "torch.distributed.run" not in out.stdout
    for args, env in ((["--nproc", "2", "--base", "a.yaml"], {}), (["--base", "a.yaml"], {"NPROC": "2"}),
                      (["--nproc=2", "--base", "a.yaml"], {})):
        out = run(args, tmp_path, FINETUNE_DRY_RUN=1, **env)
        assert out.returncode == 0, out.stderr
        assert ("-m torch.distributed.run --standalone --nproc_per_node 2 -m sat_cogvideo.train_video --base a.yaml"
                in out.stdout)
    out = run(["--base", "a.yaml"], tmp_path, FINETUNE_DRY_RUN=1, NPROC="two")
    assert out.returncode == 2 and "NPROC/--nproc must be a positive integer" in out.stderr
    out = run([], tmp_path, FINETUNE_DRY_RUN=1, SAT_COGVIDEO_DEMO=tmp_path / "demo")
    assert out.returncode == 0 and "demo_model/cogvideox_5b_lora.yaml" in out.stdout and "--device cpu" in out.stdout
    assert "configs/tiny/sft_demo_lora.yaml" in out.stdout and "--train-iters" not in out.stdout
    out = run([], tmp_path, FINETUNE_DRY_RUN=1, SAT_COGVIDEO_DEMO=tmp_path / "demo", FINETUNE_DEMO_ITERS=3)
    assert out.returncode == 0 and "--train-iters 3" in out.stdout


def test_user_errors_are_one_line(tmp_path):
    out = run(["--base", "missing.yaml"], tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == ("error: config file missing.yaml does not exist (--base takes "
                                                   "YAML files, e.g. configs/cogvideox_5b.yaml)")


def test_tiny_lora_run_trains_and_saves(finetune_sh_run):
    out, demo = finetune_sh_run.proc, finetune_sh_run.demo
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "iteration        4/       4" in out.stdout + out.stderr
    assert "demo done" not in out.stderr  # with arguments finetune.sh only trains
    runs = finetune_sh_run.runs
    assert len(runs) == 1
    assert open(os.path.join(runs[0], "latest")).read().strip() == "4"
    assert os.path.isfile(os.path.join(runs[0], "4", "mp_rank_00_model_states.pt"))
    assert sorted(os.listdir(os.path.join(demo, "dataset", "videos"))) == ["1.mp4", "2.mp4"]
