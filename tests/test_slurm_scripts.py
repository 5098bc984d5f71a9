"""scripts/slurm_inference.sh, submit_prompts.sh and slurm_finetune.sh run with bash and a fake SLURM
environment (the #SBATCH lines are comments to bash): the guide's rules and errors, a CPU run of the tiny
demo model, resuming a requeued job, and 2-process gloo inference against the 1-process run."""
from __future__ import annotations

import os
import stat
import subprocess

import numpy as np
import pytest

from helpers import clean_env, read_frames  # noqa: F401  (also imported from here by older modules)
from helpers import make_image, make_sat_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFER = os.path.join(ROOT, "scripts", "slurm_inference.sh")
SUBMIT = os.path.join(ROOT, "scripts", "submit_prompts.sh")
FINETUNE = os.path.join(ROOT, "scripts", "slurm_finetune.sh")


def run(script, *args, cwd, timeout=300, **kw):
    return subprocess.run(["bash", script, *args], cwd=str(cwd), env=clean_env(**kw), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tiny_sat_folder):
    """A SAT model folder (transformer/, vae/3d-vae.pt, t5/) holding the tiny random-weight demo model."""
    return tiny_sat_folder


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    """SAT folders with the released models' shapes (detection only; no weights)."""
    base = tmp_path_factory.mktemp("fake")
    return {f: make_sat_folder(base / f, f) for f in ("cogvideox-2b", "cogvideox-5b-i2v", "cogvideox1.5-5b")}


CPU = dict(DEVICE="cpu", DTYPE="float32", NUM_STEPS=1)


def command_line(stdout: str) -> str:
    lines = [l for l in stdout.splitlines() if l.startswith("+ ")]
    assert len(lines) == 1, stdout
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# slurm_inference.sh: parameters, defaults, errors


def test_positional_arguments_and_family_defaults(tmp_path, fakes):
    r = run(INFER, "A cat playing piano", fakes["cogvideox-2b"], cwd=tmp_path, SLURM_JOB_ID=101, DRY_RUN=1)
    assert r.returncode == 0, r.stderr
    cmd = command_line(r.stdout)
    assert "--prompt A cat playing piano" in cmd
    assert "--num-frames 49 --sampling-fps 8 --dtype float16" in cmd         # CogVideoX-2B: 49 frames, 8 fps, fp16
    assert "--output-path outputs/inference_101.mp4" in cmd
    assert "--num-steps 50 --guidance-scale 6.0" in cmd and "--seed 42" in cmd
    assert (tmp_path / "logs").is_dir() and (tmp_path / "outputs").is_dir()
    assert (tmp_path / "logs" / "inference-101.yaml").is_file()
    assert "model cogvideox-2b (from checkpoint)" in r.stdout


def test_environment_overrides(tmp_path, fakes):
    r = run(INFER, cwd=tmp_path, SLURM_JOB_ID=102, DRY_RUN=1, PROMPT="A dog", MODEL_PATH=fakes["cogvideox1.5-5b"],
            NUM_STEPS=30, GUIDANCE_SCALE=7, SEED=9, OUTPUT_PATH="outputs/dog.mp4", FAMILY="1.5-5b")
    assert r.returncode == 0, r.stderr
    cmd = command_line(r.stdout)
    assert "--num-frames 81 --sampling-fps 16 --dtype bfloat16" in cmd          # CogVideoX1.5: 81 frames, 16 fps
    assert "--prompt A dog --output-path outputs/dog.mp4 --seed 9 --num-steps 30 --guidance-scale 7" in cmd
    assert "model cogvideox1.5-5b (from FAMILY)" in r.stdout


def test_i2v_model_forces_i2v_through_the_script(tmp_path, fakes):
    image = make_image(tmp_path / "cat.png")
    r = run(INFER, cwd=tmp_path, SLURM_JOB_ID=103, DRY_RUN=1, GENERATE_TYPE="t2v", IMAGE_OR_VIDEO_PATH=image,
            MODEL_PATH=fakes["cogvideox-5b-i2v"])
    assert r.returncode == 0, r.stderr
    assert f"--generate-type i2v" in command_line(r.stdout) and f"--image-or-video-path {image}" in r.stdout
    assert "note: cogvideox-5b-i2v is an image-to-video model: GENERATE_TYPE t2v -> i2v" in r.stderr


@pytest.mark.parametrize("model,kw,message", [
    ("/nonexistent/CogVideoX-5B-SAT", {}, "error: MODEL_PATH '/nonexistent/CogVideoX-5B-SAT' does not exist: download "
                                          "a CogVideoX SAT checkpoint"),
    ("cogvideox-5b-i2v", {}, "error: i2v needs an image: set IMAGE_OR_VIDEO_PATH to a .jpg/.png file"),
    ("cogvideox-5b-i2v", {"IMAGE_OR_VIDEO_PATH": "/nonexistent/cat.jpg"},
     "error: IMAGE_OR_VIDEO_PATH '/nonexistent/cat.jpg' does not exist: give an absolute path the compute node"),
    ("cogvideox-5b-i2v", {"GENERATE_TYPE": "v2v"},
     "error: cogvideox-5b-i2v is an image-to-video model and cannot do v2v"),
    ("cogvideox-2b", {"GENERATE_TYPE": "i2v"}, "error: i2v needs an I2V model but MODEL_PATH holds cogvideox-2b"),
    ("cogvideox-2b", {"GENERATE_TYPE": "v2v"}, "error: v2v needs an input video"),
    ("cogvideox1.5-5b", {"NUM_FRAMES": 49}, "error: NUM_FRAMES=49 is not allowed for cogvideox1.5-5b: use 161 or 81"),
    ("cogvideox-2b", {"CONDA_ACTIVATE_CMD": "conda_does_not_exist activate cogvideo"},
     "error: CONDA_ACTIVATE_CMD failed: 'conda_does_not_exist activate cogvideo'"),
])
def test_errors_are_one_line_before_anything_runs(tmp_path, fakes, model, kw, message):
    r = run(INFER, "a prompt", fakes.get(model, model), cwd=tmp_path, SLURM_JOB_ID=104, **kw)
    assert r.returncode == 2
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), r.stderr
    assert "+ " not in r.stdout and not os.listdir(tmp_path / "outputs")   # nothing was launched


def test_script_variables_reach_the_job(tmp_path, fakes):
    """OVERWRITE, T5_PATH, VAE_PATH, LOG_DIR, MODEL_CONFIG and EXTRA_ARGS (dry runs: the command and the job YAML)."""
    from omegaconf import OmegaConf

    model = fakes["cogvideox-2b"]
    # a transformer folder alone; T5 and VAE elsewhere
    alone = tmp_path / "alone"
    alone.mkdir()
    os.symlink(os.path.join(model, "transformer"), alone / "transformer")
    t5, vae = os.path.join(model, "t5-v1_1-xxl"), os.path.join(model, "vae", "3d-vae.pt")
    r = run(INFER, "a cat", str(alone), cwd=tmp_path, SLURM_JOB_ID=601, DRY_RUN=1)
    assert r.returncode == 2 and "VAE weights" in r.stderr and "set VAE_PATH" in r.stderr
    r = run(INFER, "a cat", str(alone), cwd=tmp_path, SLURM_JOB_ID=601, DRY_RUN=1, VAE_PATH=vae)
    assert r.returncode == 2 and "no T5 folder" in r.stderr and "T5_PATH" in r.stderr
    r = run(INFER, "a cat", str(alone), cwd=tmp_path, SLURM_JOB_ID=601, DRY_RUN=1, VAE_PATH=vae, T5_PATH=t5,
            LOG_DIR="joblogs", OVERWRITE=1, EXTRA_ARGS="--offload --vae-tiling")
    assert r.returncode == 0, r.stderr
    cmd = command_line(r.stdout)
    assert "--base joblogs/inference-601.yaml" in cmd and (tmp_path / "joblogs" / "inference-601.yaml").is_file()
    assert not (tmp_path / "logs" / "inference-601.yaml").exists()
    assert "--overwrite" in cmd.split() and "--skip-existing" not in cmd.split()
    assert cmd.endswith(" --offload --vae-tiling")
    job = OmegaConf.load(tmp_path / "joblogs" / "inference-601.yaml")
    assert job.model.first_stage_config.params.ckpt_path == vae
    assert job.model.conditioner_config.params.emb_models[0].params.model_dir == t5
    assert job.args.load == os.path.join(model, "transformer") or job.args.load == str(alone / "transformer")
    # defaults: outputs are kept (a requeued job resumes), logs/ holds the YAML, nothing extra
    r = run(INFER, "a cat", model, cwd=tmp_path, SLURM_JOB_ID=602, DRY_RUN=1)
    cmd = command_line(r.stdout)
    assert "--skip-existing" in cmd.split() and "--overwrite" not in cmd.split() and "--offload" not in cmd
    assert "--base logs/inference-602.yaml" in cmd
    # MODEL_CONFIG: the model YAML of the job (here the 2B config with another VAE scale factor)
    custom = tmp_path / "my_2b.yaml"
    cfg = OmegaConf.load(os.path.join(ROOT, "configs", "cogvideox_2b.yaml"))
    cfg.model.scale_factor = 0.123
    OmegaConf.save(cfg, custom)
    r = run(INFER, "a cat", model, cwd=tmp_path, SLURM_JOB_ID=603, DRY_RUN=1, MODEL_CONFIG=custom)
    assert r.returncode == 0, r.stderr
    assert OmegaConf.load(tmp_path / "logs" / "inference-603.yaml").model.scale_factor == pytest.approx(0.123)
    assert OmegaConf.load(tmp_path / "logs" / "inference-602.yaml").model.scale_factor == pytest.approx(1.15258426)
    r = run(INFER, "a cat", model, cwd=tmp_path, SLURM_JOB_ID=604, DRY_RUN=1,
            MODEL_CONFIG=os.path.join(ROOT, "configs", "cogvideox_5b.yaml"))
    assert r.returncode == 2 and "does not fit" in r.stderr and "fix MODEL_CONFIG" in r.stderr


# ---------------------------------------------------------------------------------------------------------------
# a real run of the tiny model on CPU; a requeued job resumes


def test_tiny_model_end_to_end_and_requeue(tmp_path, tiny):
    r = run(INFER, "A red fox in the snow", tiny, cwd=tmp_path, SLURM_JOB_ID=201, **CPU)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "outputs" / "inference_201.mp4"
    frames = read_frames(out)
    assert frames.shape == (9, 64, 96, 3)                   # tiny 5B: 9 frames at 64x96
    assert "done: outputs/inference_201.mp4" in r.stdout and "wrote outputs/inference_201.mp4" in r.stderr
    mtime = out.stat().st_mtime_ns
    # requeued (same job id, SLURM_RESTART_COUNT=1): the finished output is kept, nothing is recomputed
    r2 = run(INFER, "A red fox in the snow", tiny, cwd=tmp_path, SLURM_JOB_ID=201, SLURM_RESTART_COUNT=1, **CPU)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert "restart 1" in r2.stdout and "all 1 outputs exist; nothing to do" in r2.stderr
    assert out.stat().st_mtime_ns == mtime


def test_two_process_gloo_inference_matches_one_process(tmp_path, tiny):
    """torchrun, 2 ranks, gloo on CPU: prompts shared out by line, each video written once, equal to the
    1-process run; the output of line 2 already exists (a job preempted after it), so it is not redone."""
    import shutil

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na blue bird\na green frog\n")
    names = ["0_a_red_fox", "1_a_blue_bird", "2_a_green_frog"]
    video = [os.path.join(n, "0", "000000.mp4") for n in names]
    common = dict(PROMPT_FILE=prompts, SLURM_JOB_ID=301, MODEL_PATH=tiny, **CPU)
    one = run(INFER, cwd=tmp_path, OUTPUT_DIR=tmp_path / "one", LAUNCHER="none", **common)
    assert one.returncode == 0, one.stderr[-2000:]
    assert all((tmp_path / "one" / v).is_file() for v in video)
    os.makedirs(tmp_path / "two" / names[2] / "0")
    shutil.copy(tmp_path / "one" / video[2], tmp_path / "two" / video[2])
    kept = (tmp_path / "two" / video[2]).stat().st_mtime_ns
    two = run(INFER, cwd=tmp_path, OUTPUT_DIR=tmp_path / "two", LAUNCHER="torchrun", NPROC=2,
              SLURM_RESTART_COUNT=1, **common)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "torch.distributed.run --nnodes=1 --nproc_per_node=2" in two.stdout
    assert two.stderr.count("wrote ") == 2                       # line 0 by rank 0, line 1 by rank 1
    for v in video[:2]:
        assert two.stderr.count(f"wrote {tmp_path / 'two' / v}") == 1
    assert (tmp_path / "two" / video[2]).stat().st_mtime_ns == kept
    assert sorted(os.listdir(tmp_path / "two")) == names
    for v in video:
        np.testing.assert_array_equal(read_frames(tmp_path / "one" / v), read_frames(tmp_path / "two" / v))


# ---------------------------------------------------------------------------------------------------------------
# submit_prompts.sh and slurm_finetune.sh with fake sbatch / scontrol


def fake_bin(folder, name, body):
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_sbatch(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.log"
    fake_bin(bin_dir, "sbatch", f'echo "ARGS $* PROMPT_LINE=${{PROMPT_LINE:-}} PROMPT_FILE=$PROMPT_FILE '
                                f'OUTPUT_DIR=$OUTPUT_DIR" >> {log}\necho "Submitted batch job 77"\n')
    fake_bin(bin_dir, "scontrol", 'echo node17; echo node18\n')
    return bin_dir, log


def test_submit_prompts_array_skips_done(tmp_path, fake_sbatch):
    bin_dir, log = fake_sbatch
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na blue bird\n\na green frog\na grey owl\na cat, on a mat\n")
    done = tmp_path / "outputs" / "prompts" / "1_a_blue_bird" / "0"
    done.mkdir(parents=True)
    (done / "000000.mp4").write_bytes(b"x")
    path = f"{bin_dir}:{os.environ['PATH']}"
    r = run(SUBMIT, "prompts.txt", "--", "--partition=debug", cwd=tmp_path, PATH=path, MODEL_PATH="/m")
    assert r.returncode == 0, r.stderr
    assert "4 prompt(s) to generate, 1 already done" in r.stdout
    calls = log.read_text().splitlines()
    assert len(calls) == 1
    assert calls[0].startswith("ARGS --array=0,3-5 --export=ALL --output=logs/inference-%A_%a.out "
                               "--error=logs/inference-%A_%a.err --partition=debug " + INFER)
    assert f"PROMPT_FILE={prompts}" in calls[0] and "OUTPUT_DIR=outputs/prompts" in calls[0]
    log.unlink()
    r = run(SUBMIT, "--each", "--max-parallel", "2", "prompts.txt", cwd=tmp_path, PATH=path)
    calls = log.read_text().splitlines()
    assert [c.split("PROMPT_LINE=")[1].split()[0] for c in calls] == ["0", "3", "4", "5"]
    for n in (0, 3, 4, 5):   # pretend the jobs ran
        d = tmp_path / "outputs" / "prompts" / f"{n}_{['a_red_fox', '', '', 'a_green_frog', 'a_grey_owl', 'a_cat,_on_a_mat'][n]}" / "0"
        d.mkdir(parents=True)
        (d / "000000.mp4").write_bytes(b"x")
    log.unlink()
    r = run(SUBMIT, "prompts.txt", cwd=tmp_path, PATH=path)
    assert r.returncode == 0 and "0 prompt(s) to generate, 5 already done" in r.stdout and not log.exists()
    r = run(SUBMIT, "missing.txt", cwd=tmp_path, PATH=path)
    assert r.returncode == 2 and r.stderr.strip() == "error: prompt file missing.txt does not exist"


def test_array_element_runs_its_line(tmp_path, fakes):
    prompts = tmp_path / "p.txt"
    prompts.write_text("first prompt\nsecond prompt\n")
    r = run(INFER, cwd=tmp_path, DRY_RUN=1, SLURM_JOB_ID=402, SLURM_ARRAY_JOB_ID=400, SLURM_ARRAY_TASK_ID=1,
            PROMPT_FILE=prompts, OUTPUT_DIR="outputs/prompts", MODEL_PATH=fakes["cogvideox-2b"])
    assert r.returncode == 0, r.stderr
    cmd = command_line(r.stdout)
    assert "--prompt second prompt --output-path outputs/prompts/1_second_prompt/0/000000.mp4 --seed 1042" in cmd
    assert (tmp_path / "logs" / "inference-400_1.yaml").is_file()


def test_finetune_launch_commands(tmp_path, fake_sbatch):
    bin_dir, _ = fake_sbatch
    path = f"{bin_dir}:{os.environ['PATH']}"
    r = run(FINETUNE, cwd=tmp_path, PATH=path, DRY_RUN=1, SLURM_JOB_ID=12345, SLURM_NNODES=2,
            SLURM_JOB_NODELIST="node[17-18]", SLURM_NTASKS=16, SLURM_NTASKS_PER_NODE=8)
    assert r.returncode == 0, r.stderr
    assert "rendezvous node17:32345" in r.stdout              # first host of the node list, port from the job id
    cmd = command_line(r.stdout)
    assert cmd.startswith("+ srun --kill-on-bad-exit=1 bash -c") and "RANK=$SLURM_PROCID" in cmd
    assert 'exec "$0" -m sat_cogvideo.train_video "$@"' in cmd
    assert cmd.endswith(f" --base {ROOT}/configs/cogvideox_5b_lora.yaml {ROOT}/configs/sft.yaml --seed 42")
    r = run(FINETUNE, cwd=tmp_path, PATH=path, DRY_RUN=1, LAUNCHER="torchrun", GPUS_PER_NODE=4, SLURM_JOB_ID=7,
            SLURM_NNODES=2, SLURM_JOB_NODELIST="node[17-18]", SLURM_RESTART_COUNT=1)
    assert r.returncode == 0, r.stderr
    cmd = command_line(r.stdout)
    assert "torch.distributed.run --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d " \
           "--rdzv_endpoint=node17:20007 --rdzv_id=7 -m sat_cogvideo.train_video" in cmd
    assert cmd.endswith("--seed 42 --resume")                 # requeued: continue the newest run
    r = run(FINETUNE, cwd=tmp_path, PATH=path, DRY_RUN=1, CONFIGS="configs/nope.yaml")
    assert r.returncode == 2 and "error: config file configs/nope.yaml does not exist" in r.stderr


def test_finetune_resume_variable(tmp_path, fake_sbatch):
    """RESUME: unset -> a new run (or --resume when SLURM requeued the job); auto -> --resume (newest run);
    a folder -> --resume FOLDER."""
    bin_dir, _ = fake_sbatch
    path = f"{bin_dir}:{os.environ['PATH']}"

    def tail(**kw):
        r = run(FINETUNE, cwd=tmp_path, PATH=path, DRY_RUN=1, SLURM_JOB_ID=9, **kw)
        assert r.returncode == 0, r.stderr
        return command_line(r.stdout).split("--seed 42", 1)[1].strip()

    assert tail() == ""
    assert tail(SLURM_RESTART_COUNT=0) == ""
    assert tail(RESUME="auto") == "--resume"
    assert tail(RESUME="ckpts/lora-07-01-12-00") == "--resume ckpts/lora-07-01-12-00"
    assert tail(RESUME="ckpts/lora-07-01-12-00", SLURM_RESTART_COUNT=2) == "--resume ckpts/lora-07-01-12-00"
    assert tail(SLURM_RESTART_COUNT=1, EXTRA_ARGS="--train-iters 9") == "--resume --train-iters 9"


def test_several_tasks_use_srun(tmp_path, fakes, fake_sbatch):
    bin_dir, _ = fake_sbatch
    fake_bin(bin_dir, "srun", "exit 0\n")
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\nthree\n")
    r = run(INFER, cwd=tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", DRY_RUN=1, SLURM_JOB_ID=55, SLURM_NTASKS=4,
            SLURM_NNODES=2, SLURM_NTASKS_PER_NODE=2, SLURM_JOB_NODELIST="node[17-18]", PROMPT_FILE=prompts,
            MODEL_PATH=fakes["cogvideox-2b"])
    assert r.returncode == 0, r.stderr
    cmd = command_line(r.stdout)
    assert cmd.startswith("+ srun --kill-on-bad-exit=1 ") and "-m sat_cogvideo.sample_video" in cmd
    assert f"--input-type txt --input-file {prompts} --output-dir outputs/inference_55 --seed 42" in cmd
    assert "tasks 4" in r.stdout


# ---------------------------------------------------------------------------------------------------------------
# the real-SLURM tests: concurrent test runs take turns; waits are minutes


def test_real_slurm_tests_take_turns(tmp_path):
    """While one test run holds the local-SLURM lock, another run's cluster fixture (test_slurm_real.py) waits for
    it (here 1 s) and then stops with a message instead of starting a second cluster on the same munge daemon;
    once the lock is free, it is taken."""
    import sys

    from helpers import slurm_cluster_lock

    lock = str(tmp_path / "slurm.lock")
    env = clean_env(SAT_COGVIDEO_SLURM_LOCK=lock, SAT_COGVIDEO_SLURM_LOCK_WAIT=1)
    env.pop("SAT_COGVIDEO_REQUIRE_SLURM", None)
    with slurm_cluster_lock(timeout=5, path=lock):
        r = subprocess.run([sys.executable, "-m", "pytest", os.path.join(ROOT, "tests", "test_slurm_real.py"), "-q",
                            "-k", "sbatch_error", "--basetemp", str(tmp_path / "bt"), "-p", "no:cacheprovider"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and "another test run holds" in r.stdout, r.stdout[-3000:]
    probe = ("import sys; sys.path.insert(0, %r); from helpers import slurm_cluster_lock\n"
             "with slurm_cluster_lock(timeout=1, path=%r): print('taken')") % (os.path.join(ROOT, "tests"), lock)
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "taken", r.stderr[-2000:]


def test_waits_of_process_tests_are_minutes():
    """A hang of a training, an sbatch job or the local cluster fails the test within minutes: no wait in the
    process-starting tests exceeds 5 minutes, and the SLURM jobs carry a time limit."""
    import re

    import helpers

    assert max(helpers.TRAIN_TIMEOUT, helpers.SLURM_JOB_TIMEOUT, helpers.SLURM_STATE_TIMEOUT) <= 300
    for name in ("test_slurm_real.py", "test_train.py", "test_finetune_sh.py", "test_slurm_scripts.py",
                 "test_finetune_variants.py", "helpers.py"):
        source = open(os.path.join(ROOT, "tests", name), encoding="utf-8").read()
        literal = [int(t) for t in re.findall(r"timeout(?:_s)?\s*=\s*(\d+)", source)]
        assert all(t <= 300 for t in literal), (name, literal)
    real = open(os.path.join(ROOT, "tests", "test_slurm_real.py"), encoding="utf-8").read()
    assert '"--time=5"' in real and '"--time=8"' in real
