"""The SLURM scripts on a real one-node SLURM cluster started on this machine (scripts/slurm_local.sh: munged,
slurmctld -D, slurmd -D, no cgroups), with the tiny demo model on CPU.

Skipped when SLURM is not installed (``bash scripts/slurm_local.sh install`` installs Debian's packages) or when
not root; with ``SAT_COGVIDEO_REQUIRE_SLURM=1`` (set by CI after installing) a missing SLURM fails instead.
The daemons started here are stopped at the end (by PID).  Test runs that start the cluster take turns
(helpers.slurm_cluster_lock: they would share the machine's one munge daemon); every wait is a few minutes at most,
and the jobs carry a SLURM time limit, so a hang fails in minutes.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import numpy as np
import pytest

from helpers import (ROOT, SLURM_JOB_TIMEOUT, SLURM_STATE_TIMEOUT, clean_env, read_frames,
                     slurm_cluster_lock)

INFER = os.path.join(ROOT, "scripts", "slurm_inference.sh")
SUBMIT = os.path.join(ROOT, "scripts", "submit_prompts.sh")

LOCAL = os.path.join(ROOT, "scripts", "slurm_local.sh")
NEEDED = ("sbatch", "squeue", "srun", "scontrol", "slurmctld", "slurmd", "munged")
# the #SBATCH defaults ask for a GPU partition, 8 CPUs and 64G: overridden on the command line for this node
# and a time limit (minutes): SLURM ends a hung job
SMALL = ["--partition=debug", "--gres=none", "--mem=1000M", "--cpus-per-task=1", "--time=5"]
CPU = "DEVICE=cpu,DTYPE=float32,NUM_STEPS=1"


def _missing():
    return [c for c in NEEDED if shutil.which(c) is None and not os.path.exists(f"/usr/sbin/{c}")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # first take turns with other test runs (before anything else, so that holding the lock is observable even
    # where SLURM is missing: test_slurm_scripts.py::test_real_slurm_tests_take_turns)
    lock_wait = float(os.environ.get("SAT_COGVIDEO_SLURM_LOCK_WAIT", "600"))
    with slurm_cluster_lock(timeout=lock_wait):
        missing = _missing()
        if missing:
            reason = (f"SLURM is not installed ({', '.join(missing)} missing): run 'bash scripts/slurm_local.sh "
                      f"install' as root (Debian slurmctld slurmd slurm-client munge)")
            if os.environ.get("SAT_COGVIDEO_REQUIRE_SLURM") == "1":
                pytest.fail(reason + "; SAT_COGVIDEO_REQUIRE_SLURM=1 says CI installed it")
            pytest.skip(reason)
        if os.geteuid() != 0:
            if os.environ.get("SAT_COGVIDEO_REQUIRE_SLURM") == "1":
                pytest.fail("the local SLURM cluster needs root (its daemons run as root)")
            pytest.skip("the local SLURM cluster needs root (its daemons run as root)")
        r = subprocess.run(["bash", LOCAL, "up"], capture_output=True, text=True, timeout=120, env=clean_env())
        assert r.returncode == 0, f"the local SLURM cluster did not start:\n{r.stderr[-3000:]}"
        folder = r.stdout.strip().splitlines()[-1]
        work = tmp_path_factory.mktemp("slurm-work")
        (work / "logs").mkdir()
        try:
            yield {"conf": os.path.join(folder, "slurm.conf"), "work": work}
        finally:
            subprocess.run(["bash", LOCAL, "down", folder], capture_output=True, timeout=120)


def submit(cluster, *args, script_args=()):
    """``sbatch --wait`` of slurm_inference.sh; returns the completed process and the job id."""
    cmd = ["sbatch", "--parsable", "--wait", *SMALL, *args, INFER, *script_args]
    r = subprocess.run(cmd, cwd=str(cluster["work"]), env=clean_env(SLURM_CONF=cluster["conf"]),
                       capture_output=True, text=True, timeout=SLURM_JOB_TIMEOUT)
    return r, r.stdout.strip().split(";")[0]


def job_state(cluster, job: str, timeout: float = SLURM_STATE_TIMEOUT) -> str:
    """Wait until every element of ``job`` is in a terminal state; return the states."""
    env = clean_env(SLURM_CONF=cluster["conf"])
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job, "-t", "all", "-o", "%T"], capture_output=True, text=True,
                             env=env, timeout=60).stdout.split()
        if out and not set(out) & {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING"}:
            return " ".join(sorted(set(out)))
        time.sleep(0.5)
    return "TIMEOUT"


def log(cluster, name):
    return (cluster["work"] / "logs" / name).read_text()


def test_sbatch_inference_job(cluster, tiny_sat_folder):
    tiny = tiny_sat_folder
    r, job = submit(cluster, f"--export=ALL,{CPU}", script_args=("A red fox in the snow", tiny))
    assert r.returncode == 0, log(cluster, f"inference-{job}.err")[-3000:]
    assert job_state(cluster, job) == "COMPLETED"
    frames = read_frames(cluster["work"] / "outputs" / f"inference_{job}.mp4")
    assert frames.shape == (9, 64, 96, 3)
    out = log(cluster, f"inference-{job}.out")
    assert f"job {job} on " in out and "model tiny cogvideox-5b (from checkpoint)" in out
    assert f"done: outputs/inference_{job}.mp4" in out
    assert f"wrote outputs/inference_{job}.mp4" in log(cluster, f"inference-{job}.err")

    # requeued (as after a preemption): same job id, restart count 1; the finished video is kept, not redone
    mtime = (cluster["work"] / "outputs" / f"inference_{job}.mp4").stat().st_mtime_ns
    env = clean_env(SLURM_CONF=cluster["conf"])
    for cmd in (["scontrol", "requeue", job], ["scontrol", "update", f"jobid={job}", "StartTime=now"]):
        # (a requeued job is otherwise held for about 2 minutes)
        assert subprocess.run(cmd, env=env, capture_output=True, timeout=60).returncode == 0
    assert job_state(cluster, job) == "COMPLETED"
    assert "restart 1" in log(cluster, f"inference-{job}.out")
    assert "all 1 outputs exist; nothing to do" in log(cluster, f"inference-{job}.err")
    assert (cluster["work"] / "outputs" / f"inference_{job}.mp4").stat().st_mtime_ns == mtime


def test_sbatch_error_is_one_line_in_err(cluster, tiny_sat_folder):
    tiny = tiny_sat_folder
    r, job = submit(cluster, f"--export=ALL,{CPU},GENERATE_TYPE=i2v", script_args=("A red fox", tiny))
    assert r.returncode == 2
    err = log(cluster, f"inference-{job}.err").strip().splitlines()
    assert err == ["error: i2v needs an I2V model but MODEL_PATH holds tiny cogvideox-5b (text-to-video): use a "
                   "CogVideoX-5b-I2V or CogVideoX1.5-5b-I2V folder, or GENERATE_TYPE=t2v/v2v"]
    assert not (cluster["work"] / "outputs" / f"inference_{job}.mp4").exists()


def test_two_task_job_then_array_resubmission(cluster, tiny_sat_folder):
    tiny = tiny_sat_folder
    work = cluster["work"]
    (work / "prompts.txt").write_text("a red fox\na blue bird\na green frog\n")
    names = ["0_a_red_fox", "1_a_blue_bird", "2_a_green_frog"]
    videos = [work / "outputs" / "batch" / n / "0" / "000000.mp4" for n in names]
    r, job = submit(cluster, "--ntasks=2", "--ntasks-per-node=2", "--mem=2000M",
                    f"--export=ALL,{CPU},MODEL_PATH={tiny},PROMPT_FILE=prompts.txt,OUTPUT_DIR=outputs/batch")
    err = log(cluster, f"inference-{job}.err")
    assert r.returncode == 0, err[-3000:]
    assert "+ srun --kill-on-bad-exit=1" in log(cluster, f"inference-{job}.out")
    assert err.count("wrote ") == 3 and all(err.count(f"wrote {v.relative_to(work)}") == 1 for v in videos)
    reference = read_frames(videos[1])

    # submit_prompts.sh as a job array: only the missing prompt is submitted, and regenerated identically
    os.remove(videos[1])
    r = subprocess.run(["bash", SUBMIT, "prompts.txt", "--", *SMALL, "--parsable"], cwd=str(work),
                       env=clean_env(SLURM_CONF=cluster["conf"], MODEL_PATH=tiny, OUTPUT_DIR="outputs/batch",
                                     DEVICE="cpu", DTYPE="float32", NUM_STEPS=1),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "1 prompt(s) to generate, 2 already done" in r.stdout and "--array=1 " in r.stdout
    array = r.stdout.strip().splitlines()[-1].split(";")[0]
    assert job_state(cluster, array) == "COMPLETED", log(cluster, f"inference-{array}_1.err")[-3000:]
    assert "prompt file" in log(cluster, f"inference-{array}_1.out")
    np.testing.assert_array_equal(read_frames(videos[1]), reference)


@pytest.mark.slow  # reason: two 2-process DeepSpeed trainings of the tiny model on CPU, about 3-4 minutes
def test_finetune_srun_then_requeued_torchrun(cluster):
    """slurm_finetune.sh: 2 srun tasks train 2 iterations; a second job (torchrun, 2 processes in one task, as a
    requeued job: SLURM_RESTART_COUNT is set by SLURM only on a real requeue, so RESUME=auto) continues to 4."""
    from sat_cogvideo.demo import demo_dir

    demo = demo_dir()
    prep = subprocess.run([os.path.join(ROOT, ".venv", "bin", "python") if os.path.exists(
        os.path.join(ROOT, ".venv", "bin", "python")) else "python3", "-m", "sat_cogvideo.train_video",
        "--prepare-demo", demo], cwd=ROOT, env=clean_env(SAT_COGVIDEO_DEMO=demo, PYTHONPATH=ROOT),
        capture_output=True, text=True, timeout=SLURM_JOB_TIMEOUT)
    assert prep.returncode == 0, prep.stderr[-2000:]
    work = cluster["work"]
    configs = f"{ROOT}/configs/tiny/cogvideox_2b_lora.yaml {ROOT}/configs/tiny/sft.yaml"
    env = clean_env(SLURM_CONF=cluster["conf"], SAT_COGVIDEO_DEMO=demo, CONFIGS=configs)
    script = os.path.join(ROOT, "scripts", "slurm_finetune.sh")
    base = ["sbatch", "--parsable", "--wait", "--nodes=1", "--partition=debug", "--gres=none", "--mem=3000M",
            "--time=8"]
    r = subprocess.run(base + ["--ntasks-per-node=2", "--cpus-per-task=1", "--export=ALL,EXTRA_ARGS=--device cpu "
                               f"--save {work}/ckpts --train-iters 2 --save-interval 2", script],
                       cwd=str(work), env=env, capture_output=True, text=True, timeout=2 * SLURM_JOB_TIMEOUT)
    job = r.stdout.strip().split(";")[0]
    assert r.returncode == 0, (work / "logs" / f"finetune-{job}.err").read_text()[-3000:]
    runs = os.listdir(work / "ckpts")
    assert len(runs) == 1 and open(work / "ckpts" / runs[0] / "latest").read().strip() == "2"
    r = subprocess.run(base + ["--ntasks-per-node=1", "--cpus-per-task=2", "--export=ALL,LAUNCHER=torchrun,"
                               "GPUS_PER_NODE=2,RESUME=auto,EXTRA_ARGS=--device cpu "
                               f"--save {work}/ckpts --train-iters 4 --save-interval 2", script],
                       cwd=str(work), env=env, capture_output=True, text=True, timeout=2 * SLURM_JOB_TIMEOUT)
    job = r.stdout.strip().split(";")[0]
    assert r.returncode == 0, (work / "logs" / f"finetune-{job}.err").read_text()[-3000:]
    out = (work / "logs" / f"finetune-{job}.out").read_text()
    assert "--rdzv_backend=c10d" in out and f"resuming {work}/ckpts/{runs[0]} at iteration 2" in out
    assert open(work / "ckpts" / runs[0] / "latest").read().strip() == "4"


@pytest.mark.slow  # reason: two SLURM jobs of the tiny model (one with 2 srun tasks), about 2 minutes
def test_two_task_sequence_parallel_job_equals_one_task(cluster, tiny_sat_folder):
    work = cluster["work"]
    r1, one = submit(cluster, f"--export=ALL,{CPU},OUTPUT_PATH=outputs/sp1.mp4",
                     script_args=("A red fox in the snow", tiny_sat_folder))
    assert r1.returncode == 0, log(cluster, f"inference-{one}.err")[-3000:]
    r2, two = submit(cluster, "--ntasks=2", "--ntasks-per-node=2", "--mem=2000M",
                     f"--export=ALL,{CPU},OUTPUT_PATH=outputs/sp2.mp4,SP_SIZE=2",
                     script_args=("A red fox in the snow", tiny_sat_folder))
    err = log(cluster, f"inference-{two}.err")
    assert r2.returncode == 0, err[-3000:]
    assert job_state(cluster, two) == "COMPLETED"
    out = log(cluster, f"inference-{two}.out")
    assert "+ srun --kill-on-bad-exit=1" in out and "--sp-size 2" in out
    assert err.count("wrote outputs/sp2.mp4") == 1  # one task of the video's group writes it
    a, b = read_frames(work / "outputs" / "sp1.mp4"), read_frames(work / "outputs" / "sp2.mp4")
    assert a.shape == b.shape == (9, 64, 96, 3)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # float32 reorderings may move a rounding
