"""No checkpoint runs code unless the user says so (``--trust-pickle`` / ``SAT_COGVIDEO_TRUST_PICKLE=1``).

Each path that reads a checkpoint gets a file whose unpickling would create a marker file (a ``__reduce__``
payload); the path must refuse it with one ``error:`` line naming the file and the flag, exit code 2, and the marker
must not exist afterwards.  Everything the project writes itself (model states, RNG state, ZeRO shards) loads
weights-only, so resuming needs no flag.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import clean_env, run_folder, run_train, sample_argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
LORA = os.path.join(ROOT, "configs", "tiny", "cogvideox_2b_lora.yaml")
SFT = os.path.join(ROOT, "configs", "tiny", "sft.yaml")
MODEL_STATES = "mp_rank_00_model_states.pt"


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears if the payload ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def poison(path, marker) -> None:
    """Rewrite the torch file ``path`` (or write a new one) with the payload added next to its contents."""
    from sat_cogvideo.checkpoint import _plain_data_globals

    obj = {}
    if os.path.exists(path):
        with torch.serialization.safe_globals(_plain_data_globals()):
            obj = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(obj, dict):
        obj = {"state": obj}
    obj["payload"] = Payload(marker)
    torch.save(obj, path)


def poisoned_copy(src_folder, dst_folder, marker, name=MODEL_STATES) -> str:
    """A copy of a SAT checkpoint folder whose ``name`` file in the ``latest`` iteration carries the payload."""
    shutil.copytree(src_folder, dst_folder)
    tag = open(os.path.join(dst_folder, "latest")).read().strip()
    poison(os.path.join(dst_folder, tag, name), marker)
    return str(dst_folder)


def assert_refused(proc, marker, *needles):
    err = proc.stderr
    assert proc.returncode == 2, proc.stdout[-2000:] + err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    assert "holds pickled Python objects that a safe load refuses" in err, err[-4000:]
    assert "--trust-pickle" in err and "SAT_COGVIDEO_TRUST_PICKLE=1" in err, err[-4000:]
    for needle in needles:
        assert needle in err, err[-4000:]
    assert not os.path.exists(marker), "the payload ran"


def run_module(module, argv, cwd, **env):
    return subprocess.run([PY, "-m", module, *map(str, argv)], cwd=str(cwd), capture_output=True, text=True,
                          env=clean_env(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **env), timeout=600)


# ------------------------------------------------------------------------------------------------- the loader


def test_loader_refuses_runs_only_when_trusted_and_names_damage(tmp_path, monkeypatch):
    from sat_cogvideo.checkpoint import load_torch_file, trusting
    from sat_cogvideo.errors import UserError

    marker = tmp_path / "ran"
    poison(tmp_path / "p.pt", marker)
    with pytest.raises(UserError, match=r"checkpoint .*p\.pt holds pickled Python objects .*GLOBAL io\.open"):
        load_torch_file(tmp_path / "p.pt")
    assert not marker.exists()
    with trusting(True), pytest.warns(UserWarning, match=r"--trust-pickle: unpickling .*p\.pt fully"):
        load_torch_file(tmp_path / "p.pt")
    assert marker.exists()  # trusted: the file's code runs, as the user asked
    marker.unlink()
    monkeypatch.setenv("SAT_COGVIDEO_TRUST_PICKLE", "1")
    with pytest.warns(UserWarning, match="--trust-pickle"):
        load_torch_file(tmp_path / "p.pt")
    assert marker.exists()
    monkeypatch.delenv("SAT_COGVIDEO_TRUST_PICKLE")

    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(UserError, match=r"empty\.pt is empty \(0 bytes\)"):
        load_torch_file(tmp_path / "empty.pt")
    torch.save({"w": torch.ones(100)}, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"cannot read checkpoint .*cut\.pt: it is truncated or damaged"):
        load_torch_file(tmp_path / "cut.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(UserError, match=r"text\.pt is not a PyTorch checkpoint"):
        load_torch_file(tmp_path / "text.pt")


def test_only_the_trusted_loader_unpickles_fully():
    hits = subprocess.run(["grep", "-rln", "weights_only=False", "--include=*.py", "sat_cogvideo", "sgm", "tools"],
                          cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert hits == ["sat_cogvideo/checkpoint.py"], hits
    source = open(os.path.join(ROOT, "sat_cogvideo", "checkpoint.py")).read()
    assert source.count("weights_only=False") == 1
    calls = subprocess.run(["grep", "-rn", "torch.load(", "--include=*.py", "sat_cogvideo", "sgm", "tools"],
                           cwd=ROOT, capture_output=True, text=True).stdout.splitlines()
    assert all(line.startswith("sat_cogvideo/checkpoint.py:") for line in calls), calls


# ------------------------------------------------------------------------------------------------- inference


@pytest.fixture(scope="module")
def infer(demo_paths, tmp_path_factory):
    """The tiny 5B demo model's arguments and a poisoned copy of its transformer folder."""
    base = tmp_path_factory.mktemp("sec")
    marker = base / "ran-load"
    bad = poisoned_copy(demo_paths["cogvideox_5b"], base / "bad_transformer", marker)
    return {"argv": sample_argv(demo_paths, "cogvideox_5b", steps=1), "bad": bad, "marker": str(marker),
            "base": base, "paths": demo_paths}


def _with_load(argv, load):
    argv = list(argv)
    argv[argv.index("--load") + 1] = load
    return argv


def test_inference_load_refuses_a_payload(infer, tmp_path):
    out = tmp_path / "v.mp4"
    proc = run_module("sat_cogvideo.sample_video",
                      _with_load(infer["argv"], infer["bad"]) + ["--prompt", "a cat", "--output-path", out], tmp_path)
    assert_refused(proc, infer["marker"], "bad_transformer")
    assert not out.exists()


def test_inference_lora_path_refuses_a_payload(infer, tmp_path):
    marker = tmp_path / "ran-lora"
    lora = poisoned_copy(infer["paths"]["cogvideox_5b"], tmp_path / "bad_lora", marker)
    proc = run_module("sat_cogvideo.sample_video", infer["argv"] + ["--prompt", "a cat", "--lora-path", lora,
                                                                     "--output-path", tmp_path / "v.mp4"], tmp_path)
    assert_refused(proc, marker, "bad_lora")


def test_inference_vae_refuses_a_payload(infer, tmp_path):
    demo = tmp_path / "demo"  # the tiny configs find t5/ and vae/ through $SAT_COGVIDEO_DEMO
    demo.mkdir()
    os.symlink(infer["paths"]["t5"], demo / "t5")
    (demo / "vae").mkdir()
    shutil.copy(infer["paths"]["vae"], demo / "vae" / "3d-vae.pt")
    marker = tmp_path / "ran-vae"
    poison(demo / "vae" / "3d-vae.pt", marker)
    proc = run_module("sat_cogvideo.sample_video", infer["argv"] + ["--prompt", "a cat", "--output-path",
                                                                     tmp_path / "v.mp4"], tmp_path,
                      SAT_COGVIDEO_DEMO=str(demo))
    assert_refused(proc, marker, "3d-vae.pt")


def test_slurm_dry_run_refuses_a_payload(infer, tmp_path):
    folder = tmp_path / "Model-SAT"
    folder.mkdir()
    os.symlink(infer["bad"], folder / "transformer")
    os.symlink(os.path.dirname(infer["paths"]["vae"]), folder / "vae")
    os.symlink(infer["paths"]["t5"], folder / "t5")
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "slurm_inference.sh"), "a cat", str(folder)],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
                          env=clean_env(DRY_RUN="1", DEVICE="cpu", DTYPE="float32", PYTHON=PY))
    assert_refused(proc, infer["marker"], MODEL_STATES)


def test_converter_and_lora_export_refuse_a_payload(infer, tmp_path):
    proc = subprocess.run([PY, os.path.join(ROOT, "tools", "convert_weight_sat2hf.py"), "--transformer_ckpt_path",
                           infer["bad"], "--output_path", str(tmp_path / "hf"), "--no_text_encoder"],
                          capture_output=True, text=True, env=clean_env(), timeout=300)
    assert_refused(proc, infer["marker"])
    proc = subprocess.run([PY, os.path.join(ROOT, "tools", "export_sat_lora_weight.py"), "--sat_pt_path",
                           infer["bad"], "--lora_save_directory", str(tmp_path / "lora")],
                          capture_output=True, text=True, env=clean_env(), timeout=300)
    assert_refused(proc, infer["marker"])
    assert not (tmp_path / "hf").exists() and not (tmp_path / "lora").exists()


# ------------------------------------------------------------------------------------------------- finetuning


@pytest.fixture(scope="module")
def lora_run(demo_paths, tmp_path_factory):
    """A 2-iteration tiny LoRA run (checkpoint at 2) of our own finetuning."""
    from sat_cogvideo.demo import prepare_demo

    demo = os.environ["SAT_COGVIDEO_DEMO"]
    prepare_demo(demo)  # the generated 2-video dataset beside the demo model
    save = tmp_path_factory.mktemp("secrun") / "ckpts"
    run_train(demo, ["--base", LORA, SFT, "--device", "cpu", "--save", save,
                                                "--train-iters", "2", "--save-interval", "2", "--log-interval", "1"])
    return run_folder(save)


def test_our_own_files_load_weights_only(lora_run):
    from sat_cogvideo.checkpoint import load_torch_file

    files = glob.glob(os.path.join(lora_run, "2", "*.pt"))
    assert {os.path.basename(f) for f in files} >= {MODEL_STATES, "rng_state_rank00.pt",
                                                     "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
    for f in files:
        load_torch_file(f)  # no UserError: weights-only (DeepSpeed's plain-data classes allow-listed)
    rng = load_torch_file(os.path.join(lora_run, "2", "rng_state_rank00.pt"))
    assert isinstance(rng["numpy"][1], torch.Tensor) and isinstance(rng["python"][1], list)


def _finetune(argv, cwd):
    return subprocess.run([PY, "-m", "sat_cogvideo.train_video", *map(str, argv)], cwd=str(cwd), capture_output=True,
                          text=True, timeout=600,
                          env=clean_env(PYTHONPATH=ROOT, OMP_NUM_THREADS="2",
                                        SAT_COGVIDEO_DEMO=os.environ["SAT_COGVIDEO_DEMO"]))


def test_finetune_load_refuses_a_payload(infer, tmp_path):
    argv = ["--base", LORA, SFT, "--device", "cpu", "--save", tmp_path / "ck", "--train-iters", "1",
            "--load", infer["bad"]]
    assert_refused(_finetune(argv, tmp_path), infer["marker"], "bad_transformer")


@pytest.mark.parametrize("name", ["rng_state_rank00.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_resume_refuses_a_payload(lora_run, tmp_path, name):
    run = tmp_path / "ckpts" / os.path.basename(lora_run)
    marker = tmp_path / "ran-resume"
    poisoned_copy(lora_run, run, marker, name=name)
    argv = ["--base", LORA, SFT, "--device", "cpu", "--save", run.parent, "--train-iters", "3", "--resume", run]
    assert_refused(_finetune(argv, tmp_path), marker, name)
