"""sat_cogvideo.launch: the cluster guide's rules (family detection, defaults, generation types, errors).

Fake SAT folders hold only the tensors detection reads, with the released models' shapes, so the family
defaults are checked on all five families without weights; one test uses the tiny demo model.
"""
from __future__ import annotations

import os

import pytest
import yaml

from helpers import make_image, make_sat_folder
from sat_cogvideo import launch
from sat_cogvideo.errors import UserError

@pytest.fixture
def env(tmp_path):
    def make(family="cogvideox-5b", **kw):
        folder = tmp_path / family
        if not folder.exists():
            make_sat_folder(folder, family)
        e = {"MODEL_PATH": str(folder), "PROMPT": "a cat", "JOB_ID": "7",
             "JOB_YAML": str(tmp_path / "logs" / "job-7.yaml")}
        e.update({k: str(v) for k, v in kw.items()})
        return e
    return make


def err(env_dict) -> str:
    with pytest.raises(UserError) as info:
        launch.resolve(env_dict)
    return str(info.value)


@pytest.mark.parametrize("family,frames,fps,dtype,gtype", [
    ("cogvideox-2b", 49, 8, "float16", "t2v"),
    ("cogvideox-5b", 49, 8, "bfloat16", "t2v"),
    ("cogvideox-5b-i2v", 49, 8, "bfloat16", "i2v"),
    ("cogvideox1.5-5b", 81, 16, "bfloat16", "t2v"),
    ("cogvideox1.5-5b-i2v", 81, 16, "bfloat16", "i2v"),
])
def test_family_detected_and_defaults(env, tmp_path, family, frames, fps, dtype, gtype):
    image = make_image(tmp_path / "img.png")
    job = launch.resolve(env(family, IMAGE_OR_VIDEO_PATH=image))
    assert job.profile.name == family and job.profile.source == "checkpoint"
    assert (job.num_frames, job.fps, job.dtype, job.generate_type) == (frames, fps, dtype, gtype)
    argv = job.argv
    assert argv[argv.index("--num-frames") + 1] == str(frames)
    assert argv[argv.index("--sampling-fps") + 1] == str(fps)
    assert argv[argv.index("--dtype") + 1] == dtype
    assert argv[argv.index("--generate-type") + 1] == gtype
    assert ("--image-or-video-path" in argv) == (gtype == "i2v")
    assert job.output_path == os.path.join("outputs", "inference_7.mp4")


def test_explicit_values_win(env):
    job = launch.resolve(env("cogvideox1.5-5b", NUM_FRAMES=161, FPS=8, DTYPE="bf16", NUM_STEPS=30,
                             GUIDANCE_SCALE=7.5, SEED=3, SAMPLER="ddim", OUTPUT_PATH="o/x.mp4"))
    assert (job.num_frames, job.fps, job.dtype) == (161, 8, "bfloat16")
    a = job.argv
    for flag, value in [("--num-steps", "30"), ("--guidance-scale", "7.5"), ("--seed", "3"), ("--sampler", "ddim"),
                        ("--output-path", "o/x.mp4"), ("--prompt", "a cat")]:
        assert a[a.index(flag) + 1] == value
    assert "--skip-existing" in a and "--overwrite" not in a


def test_job_yaml_points_at_the_folder(env, tmp_path):
    e = env("cogvideox-2b")
    job = launch.resolve(e)
    with open(e["JOB_YAML"]) as f:
        cfg = yaml.safe_load(f)
    folder = os.path.abspath(e["MODEL_PATH"])
    assert cfg["args"]["load"] == os.path.join(folder, "transformer")
    assert cfg["model"]["first_stage_config"]["params"]["ckpt_path"] == os.path.join(folder, "vae", "3d-vae.pt")
    t5 = [m for m in cfg["model"]["conditioner_config"]["params"]["emb_models"] if "T5" in m["target"]]
    assert t5[0]["params"]["model_dir"] == os.path.join(folder, "t5-v1_1-xxl")
    assert cfg["model"]["network_config"]["params"]["hidden_size"] == 1920   # configs/cogvideox_2b.yaml
    assert cfg["args"]["sampling_fps"] == 8 and cfg["args"]["latent_channels"] == 16
    assert job.argv[:2] == ["--base", e["JOB_YAML"]]


def test_family_variable(env):
    job = launch.resolve(env("cogvideox-5b", FAMILY="CogVideoX-5B"))
    assert job.profile.source == "FAMILY" and job.profile.name == "cogvideox-5b"
    msg = err(env("cogvideox-5b", FAMILY="2b"))
    assert msg == "FAMILY=2b but the checkpoint is cogvideox-5b: unset FAMILY or fix MODEL_PATH"
    assert "unknown model family '3b'" in err(env("cogvideox-5b", FAMILY="3b"))


def test_i2v_model_forces_i2v(env, tmp_path):
    image = make_image(tmp_path / "img.jpg")
    job = launch.resolve(env("cogvideox-5b-i2v", GENERATE_TYPE="t2v", IMAGE_OR_VIDEO_PATH=image))
    assert job.generate_type == "i2v"
    assert any("GENERATE_TYPE t2v -> i2v" in n for n in job.notes)
    assert job.argv[job.argv.index("--image-or-video-path") + 1] == os.path.abspath(image)


@pytest.mark.parametrize("family,kw,message", [
    ("cogvideox-5b-i2v", {}, "i2v needs an image: set IMAGE_OR_VIDEO_PATH to a .jpg/.png file"),
    ("cogvideox1.5-5b-i2v", {"IMAGE_OR_VIDEO_PATH": "/nonexistent/cat.jpg"},
     "IMAGE_OR_VIDEO_PATH '/nonexistent/cat.jpg' does not exist"),
    ("cogvideox-5b-i2v", {"GENERATE_TYPE": "v2v"}, "cogvideox-5b-i2v is an image-to-video model and "
                                                  "cannot do v2v"),
    ("cogvideox-5b", {"GENERATE_TYPE": "i2v"}, "i2v needs an I2V model but MODEL_PATH holds cogvideox-5b"),
    ("cogvideox-2b", {"GENERATE_TYPE": "v2v"}, "v2v needs an input video: set IMAGE_OR_VIDEO_PATH to a .mp4 file"),
    ("cogvideox-2b", {"GENERATE_TYPE": "x2v"}, "GENERATE_TYPE='x2v' is not one of t2v, i2v, v2v"),
    ("cogvideox-5b", {"NUM_FRAMES": 81}, "NUM_FRAMES=81 is not allowed for cogvideox-5b: use 49 or 41 or 33"),
    ("cogvideox1.5-5b", {"NUM_FRAMES": 50}, "NUM_FRAMES=50 is not of the form 4N+1 (the VAE "
                                            "compresses time by 4): use 161 or 81 for cogvideox1.5-5b"),
    ("cogvideox-5b", {"NUM_FRAMES": "many"}, "NUM_FRAMES='many' is not an integer"),
    ("cogvideox-5b", {"DTYPE": "int8"}, "DTYPE='int8' is not one of float16, bfloat16, float32"),
    ("cogvideox-5b", {"FPS": 0}, "FPS=0 must be at least 1"),
    ("cogvideox-5b", {"NUM_STEPS": 0}, "NUM_STEPS=0 is outside 1..1000"),
    ("cogvideox-5b", {"GUIDANCE_SCALE": "high"}, "GUIDANCE_SCALE='high' is not a number"),
    ("cogvideox-5b", {"SEED": "x"}, "SEED='x' is not an integer"),
    ("cogvideox-5b", {"SAMPLER": "euler"}, "SAMPLER='euler' is not one of dpm, ddim"),
    ("cogvideox-5b", {"STRENGTH": 2}, "STRENGTH=2.0 is outside [0, 1]"),
    ("cogvideox-5b", {"OUTPUT_PATH": "out.avi"}, "OUTPUT_PATH 'out.avi' must end in .mp4"),
    ("cogvideox-5b", {"LORA_PATH": "/nonexistent/lora"}, "LORA_PATH '/nonexistent/lora' is not a folder"),
    ("cogvideox-5b", {"PROMPT": ""}, "PROMPT is empty"),
    ("cogvideox-5b", {"PROMPT_FILE": "/nonexistent/p.txt"}, "PROMPT_FILE '/nonexistent/p.txt' does not exist"),
])
def test_rule_violations(env, family, kw, message):
    assert message in err(env(family, **kw))


def test_v2v_needs_a_video_not_an_image(env, tmp_path):
    image = make_image(tmp_path / "img.png")
    assert "v2v needs a video but IMAGE_OR_VIDEO_PATH" in err(env("cogvideox-5b", GENERATE_TYPE="v2v",
                                                                  IMAGE_OR_VIDEO_PATH=image))
    video = tmp_path / "in.mp4"
    video.write_bytes(b"\0")
    job = launch.resolve(env("cogvideox-5b", GENERATE_TYPE="v2v", IMAGE_OR_VIDEO_PATH=video))
    assert job.generate_type == "v2v" and job.media == str(video)


def test_t2v_ignores_the_image(env, tmp_path):
    job = launch.resolve(env("cogvideox-5b", IMAGE_OR_VIDEO_PATH=make_image(tmp_path / "i.png")))
    assert "--image-or-video-path" not in job.argv and any("t2v ignores" in n for n in job.notes)


def test_float16_on_a_5b_model_is_a_warning(env):
    job = launch.resolve(env("cogvideox-5b", DTYPE="fp16"))
    assert job.dtype == "float16" and any("black or NaN" in n for n in job.notes)


def test_model_folder_errors(tmp_path, monkeypatch):
    from huggingface_hub import constants

    def msg(path, **kw):
        with pytest.raises(UserError) as info:
            launch.find_model_folder(str(path), **kw)
        return str(info.value)

    assert "MODEL_PATH '/nonexistent/m' does not exist: download a CogVideoX SAT checkpoint" in msg("/nonexistent/m")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache, offline
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub = msg("THUDM/CogVideoX1.5-5b")
    assert "MODEL_PATH THUDM/CogVideoX1.5-5b is not in the Hugging Face cache" in hub and "HF_HUB_OFFLINE" in hub
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert "is a diffusers pipeline, not a CogVideoX one" in msg(tmp_path / "pipe")
    (tmp_path / "empty").mkdir()
    assert "has no transformer/ folder" in msg(tmp_path / "empty")
    m = make_sat_folder(tmp_path / "m", "cogvideox-2b")
    os.remove(os.path.join(m, "transformer", "1000", "mp_rank_00_model_states.pt"))
    assert "names iteration '1000' but" in msg(m)
    m = make_sat_folder(tmp_path / "m2", "cogvideox-2b")
    os.remove(os.path.join(m, "transformer", "latest"))
    assert "has no 'latest' file" in msg(m)
    m = make_sat_folder(tmp_path / "m3", "cogvideox-2b")
    os.remove(os.path.join(m, "vae", "3d-vae.pt"))
    assert f"VAE weights {m}/vae/3d-vae.pt are missing" in msg(m)
    m = make_sat_folder(tmp_path / "m4", "cogvideox-2b", t5_name="elsewhere")
    assert "no T5 folder in" in msg(m)
    found = launch.find_model_folder(m, t5_path=os.path.join(m, "elsewhere"))
    assert found.t5 == os.path.join(m, "elsewhere")
    # MODEL_PATH may also be the transformer folder itself
    m = make_sat_folder(tmp_path / "m5", "cogvideox-2b", t5_name="t5")
    found = launch.find_model_folder(os.path.join(m, "transformer"))
    assert (found.root, found.t5) == (m, os.path.join(m, "t5"))


def test_prompt_file_line_and_pending(env, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\n\na blue bird / sky\n")
    e = env("cogvideox-5b", PROMPT_FILE=prompts, PROMPT_LINE=2, OUTPUT_DIR=tmp_path / "out", SEED=5)
    job = launch.resolve(e)
    out = os.path.join(str(tmp_path / "out"), "2_a_blue_bird__sky", "0", "000000.mp4")
    assert job.prompt == "a blue bird / sky" and job.output_path == out
    # line 2 keeps the seed it has in a sharded run of the whole file: seed + 1000 * line
    assert job.argv[job.argv.index("--seed") + 1] == str(5 + 2000)
    assert "PROMPT_LINE=1 (0-based) is not a non-empty line of" in err(dict(e, PROMPT_LINE=1))
    whole = launch.resolve(dict(e, PROMPT_LINE=""))
    a = whole.argv
    assert a[a.index("--input-file") + 1] == str(prompts) and a[a.index("--seed") + 1] == "5"
    os.makedirs(os.path.dirname(out))
    open(out, "wb").close()
    rows = launch.pending_lines(str(prompts), str(tmp_path / "out"))
    assert [(r[0], r[3]) for r in rows] == [(0, False), (2, True)]


def test_tiny_demo_model_gets_the_tiny_config(tmp_path):
    from sat_cogvideo.demo import build_demo, demo_dir

    paths = build_demo(demo_dir(), models=("cogvideox_5b",))
    folder = tmp_path / "sat"
    folder.mkdir()
    os.symlink(paths["cogvideox_5b"], folder / "transformer")
    os.symlink(os.path.dirname(paths["vae"]), folder / "vae")
    os.symlink(paths["t5"], folder / "t5")
    e = {"MODEL_PATH": str(folder), "PROMPT": "x", "JOB_YAML": str(tmp_path / "j.yaml")}
    job = launch.resolve(e)
    assert job.profile.name == "tiny cogvideox-5b" and not job.profile.released
    assert job.profile.config.endswith(os.path.join("configs", "tiny", "cogvideox_5b.yaml"))
    assert (job.num_frames, job.fps, job.dtype) == (9, 8, "bfloat16")
    assert "FAMILY=2b but the checkpoint is a tiny cogvideox-5b model" in err(dict(e, FAMILY="2b"))
    assert launch.resolve(dict(e, FAMILY="5b")).profile.source == "FAMILY"
