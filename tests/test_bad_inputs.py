"""Issue 12 §3: every bad input is one line ``error: ...`` on stderr, exit code 2, no traceback, nothing written,
before any weight is loaded; and the suggested fix is accepted.

Inference runs through ``sample_video.main`` (one case also as ``python -m sat_cogvideo.sample_video``) with
``build_plan`` (the input checks, which run before any weight file is opened) stopping the run with ``Reached``
when it accepts the inputs, and ``build_engine`` refusing to run.  The cluster rules go through ``launch.main``,
the tools through their scripts with a package made unimportable, finetuning through
``python -m sat_cogvideo.train_video``.
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


class Reached(Exception):
    """``build_plan`` accepted every input; ``args[0]`` is its plan."""


@pytest.fixture
def no_weights(monkeypatch):
    from sat_cogvideo import sample_video

    real_build_plan = sample_video.build_plan

    def accepted(args):
        raise Reached(real_build_plan(args))

    def refuse(args):
        raise AssertionError("the engine must not be built")

    monkeypatch.setattr(sample_video, "build_plan", accepted)
    monkeypatch.setattr(sample_video, "build_engine", refuse)


@pytest.fixture
def out(tmp_path):
    """The folder outputs go to; nothing may be written under it."""
    return tmp_path / "out"


def tiny_argv(paths, model, frames=True):
    """The demo's sample_video arguments for a tiny ``model`` without prompt and output (and without
    ``--num-frames`` unless ``frames``); a later ``--sampling-image-size`` replaces the 1.5 models' one."""
    from sat_cogvideo.demo import demo_argv

    drop = ("--prompt", "--output-path") + (() if frames else ("--num-frames",))
    argv, kept, skip = demo_argv(paths, model, "unused.mp4", steps=2), [], False
    for a in argv:
        if skip:
            skip = False
        elif a in drop:
            skip = True
        else:
            kept.append(a)
    return kept


def real_argv(tmp_path, model, inference):
    """A released model config (no weights are needed before validation ends)."""
    return ["--base", os.path.join(CONFIGS, model), os.path.join(CONFIGS, inference), "--device", "cpu",
            "--load", str(tmp_path)]


def files_under(folder):
    return [p for p in glob.glob(os.path.join(str(folder), "**"), recursive=True) if os.path.isfile(p)]


def expect_error(argv, capsys, out) -> str:
    """Run sample_video; assert exit 2, exactly one ``error:`` line, no traceback, no file under ``out``."""
    from sat_cogvideo import sample_video

    with pytest.raises(SystemExit) as exc:
        sample_video.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert files_under(out) == []
    return lines[0]


def expect_accepted(argv, capsys):
    """Run sample_video until its input checks pass; returns (stderr, plan)."""
    from sat_cogvideo import sample_video

    with pytest.raises(Reached) as exc:
        sample_video.main(argv)
    return capsys.readouterr().err, exc.value.args[0]


def one_video(out):
    return ["--prompt", "a cat", "--output-path", str(out / "a.mp4")]


# ---------------------------------------------------------------------------------------------- 1. frame counts


@pytest.mark.parametrize("model,given,message,suggested", [
    ("cogvideox_5b", 12, "--sampling-num-frames 12 is not allowed for this 1.0 model: it counts latent frames, "
                         "use 3 (= 9 video frames), or give --num-frames in video frames", 3),
    ("cogvideox1.5_5b", 9, "--sampling-num-frames 9 is not allowed for this 1.5 model: it counts latent frames, "
                           "use 10 or 8 or 6 or 4 (= 33 or 25 or 17 or 9 video frames)", 4),
])
def test_latent_frame_count_is_answered_in_latent_frames(model, given, message, suggested, demo_paths, no_weights,
                                                         out, capsys):
    argv = tiny_argv(demo_paths, model, frames=False) + one_video(out)
    msg = expect_error(argv + ["--sampling-num-frames", str(given)], capsys, out)
    assert msg.startswith("error: " + message), msg
    expect_accepted(argv + ["--sampling-num-frames", str(suggested)], capsys)


def test_latent_frame_count_of_the_released_5b(tmp_path, no_weights, out, capsys):
    """The reported case: 12 latent frames answered "use 9" (video frames), and 9 then failed the same way."""
    argv = real_argv(tmp_path, "cogvideox_5b.yaml", "inference.yaml") + one_video(out)
    msg = expect_error(argv + ["--sampling-num-frames", "12"], capsys, out)
    assert "--sampling-num-frames 12 is not allowed for cogvideox-5b: it counts latent frames, use 13 or 11 or 9 " \
           "(= 49 or 41 or 33 video frames)" in msg, msg
    expect_accepted(argv + ["--sampling-num-frames", "9"], capsys)


def test_latent_frame_count_from_the_yaml_names_the_yaml_key(demo_paths, no_weights, tmp_path, out, capsys):
    yaml_file = tmp_path / "frames.yaml"
    yaml_file.write_text("args:\n  sampling_num_frames: 12\n")
    argv = tiny_argv(demo_paths, "cogvideox_5b", frames=False)
    argv.insert(argv.index("--base") + 2, str(yaml_file))
    msg = expect_error(argv + one_video(out), capsys, out)
    assert msg.startswith("error: sampling_num_frames: 12 is not allowed for this 1.0 model: it counts latent "
                          "frames, use 3"), msg


def test_video_frame_count_is_answered_in_video_frames(demo_paths, no_weights, out, capsys):
    argv = tiny_argv(demo_paths, "cogvideox_5b", frames=False) + one_video(out)
    msg = expect_error(argv + ["--num-frames", "13"], capsys, out)
    assert msg == "error: --num-frames 13 is not allowed for this 1.0 model: use 9", msg
    expect_accepted(argv + ["--num-frames", "9"], capsys)


# ---------------------------------------------------------------------------------------------- 2. video size


@pytest.mark.parametrize("case", ["tiny_1.0", "released_1.0"])
def test_size_of_a_1_0_model_is_its_configured_size(case, demo_paths, tmp_path, no_weights, out, capsys):
    if case == "tiny_1.0":
        argv, name, works = tiny_argv(demo_paths, "cogvideox_5b"), "this 1.0 model", (64, 96)
    else:
        argv, name, works = real_argv(tmp_path, "cogvideox_5b.yaml", "inference.yaml"), "cogvideox-5b", (480, 720)
    argv = argv + one_video(out)
    msg = expect_error(argv + ["--sampling-image-size", "500,700"], capsys, out)
    assert msg == (f"error: --sampling-image-size 500x700: {name} only generates {works[0]}x{works[1]} (its "
                   f"configured size): use --sampling-image-size {works[0]},{works[1]} or leave it out"), msg
    expect_accepted(argv + ["--sampling-image-size", f"{works[0]},{works[1]}"], capsys)


def test_size_in_the_yaml_of_a_1_0_model_is_ignored_with_a_note(demo_paths, tmp_path, no_weights, out, capsys):
    yaml_file = tmp_path / "size.yaml"
    yaml_file.write_text("args:\n  sampling_image_size: [500, 700]\n")
    argv = tiny_argv(demo_paths, "cogvideox_5b")
    argv.insert(argv.index("--base") + 2, str(yaml_file))
    err, _ = expect_accepted(argv + one_video(out), capsys)
    assert "note: sampling_image_size: 500x700 of the --base YAML is ignored: this 1.0 model generates 64x96" in err


@pytest.mark.parametrize("case,size,message,suggestion", [
    ("tiny", "500,700", "500x700 is not a multiple of 16 pixels and exceeds the model's maximum 128x128 pixels",
     "128x128"),
    ("tiny", "120,100", "120x100 is not a multiple of 16 pixels", "128x96"),
    ("tiny", "256,64", "256x64 exceeds the model's maximum 128x128 pixels", "128x64"),
    ("released", "500,700", "500x700 is not a multiple of 16 pixels", "496x704"),
    ("released", "2048,3008", "2048x3008 exceeds the model's maximum 2400x2400 pixels", "2048x2400"),
])
def test_size_of_a_1_5_model_suggests_an_accepted_size(case, size, message, suggestion, demo_paths, tmp_path,
                                                       no_weights, out, capsys):
    argv = tiny_argv(demo_paths, "cogvideox1.5_5b") if case == "tiny" else \
        real_argv(tmp_path, "cogvideox1.5_5b.yaml", "inference_1.5.yaml")
    argv = argv + one_video(out)
    msg = expect_error(argv + ["--sampling-image-size", size], capsys, out)
    assert msg == f"error: --sampling-image-size {message}: use e.g. {suggestion}", msg
    expect_accepted(argv + ["--sampling-image-size", suggestion.replace("x", ",")], capsys)


# ---------------------------------------------------------------------------------------------- 3. prompt encoding


def test_prompt_file_that_is_not_utf8_names_file_and_line(demo_paths, no_weights, tmp_path, out, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a cat\nab\xffc\n")
    argv = tiny_argv(demo_paths, "cogvideox_5b") + ["--input-type", "txt", "--input-file", str(prompts),
                                                    "--output-dir", str(out)]
    msg = expect_error(argv, capsys, out)
    assert msg == f"error: {prompts} line 2: byte 0xff at column 3 is not UTF-8: save the file as UTF-8 text", msg


def test_prompt_file_that_is_not_utf8_through_the_module(demo_paths, tmp_path, out):
    """The same through ``python -m sat_cogvideo.sample_video``: what the user sees, with no traceback."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a caf\u00e9\n".encode("latin-1"))
    argv = tiny_argv(demo_paths, "cogvideox_5b") + ["--input-type", "txt", "--input-file", str(prompts),
                                                    "--output-dir", str(out)]
    env = dict(os.environ, SAT_COGVIDEO_DEMO=demo_paths["folder"], PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "sat_cogvideo.sample_video", *argv], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == \
        f"error: {prompts} line 1: byte 0xe9 at column 6 is not UTF-8: save the file as UTF-8 text"
    assert files_under(out) == []


def test_launch_prompt_file_that_is_not_utf8(tmp_path, capsys):
    from sat_cogvideo import launch

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"one\ntwo\n\x80three\n")
    with pytest.raises(SystemExit) as exc:
        launch.main(["--pending", str(prompts), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.strip() == f"error: {prompts} line 3: byte 0x80 at column 1 is not UTF-8: save the file as UTF-8 text"


# ---------------------------------------------------------------------------------------------- 4. blank and empty


def test_blank_lines_are_skipped_and_line_numbers_stay(demo_paths, no_weights, tmp_path, out, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n\n   \na blue bird\n")
    argv = tiny_argv(demo_paths, "cogvideox_5b") + ["--input-type", "txt", "--input-file", str(prompts),
                                                    "--output-dir", str(out), "--batch-size", "1"]
    err, plan = expect_accepted(argv, capsys)
    assert f"note: skipping 2 blank lines of {prompts}" in err
    jobs = plan.jobs
    # "a blue bird" is line 4: counter 3, as without the skipping (output folder and seed follow the counter)
    assert [(j.text, j.cnt) for j in jobs] == [("a red fox", 0), ("a blue bird", 3)]
    assert jobs[1].outputs == [str(out / "3_a_blue_bird" / "0" / "000000.mp4")]


def test_blank_stdin_lines_are_skipped(monkeypatch):
    import io
    from types import SimpleNamespace

    from sat_cogvideo.sample_video import read_prompt_lines

    monkeypatch.setattr("sys.stdin", io.StringIO("a dog\n\n  \na cat\n"))
    args = SimpleNamespace(prompt=None, input_type="cli")
    assert list(read_prompt_lines(args)) == [("a dog", 0), ("a cat", 3)]


@pytest.mark.parametrize("model,prompt,message", [
    ("cogvideox_5b", "", "--prompt: the prompt is empty: give the text the video should show"),
    ("cogvideox_5b", "  \t ", "--prompt: the prompt is empty: give the text the video should show"),
    ("cogvideox_5b_i2v", "@@IMAGE", "--prompt: the prompt before '@@' is empty: write 'prompt@@path'"),
])
def test_empty_prompt_is_refused(model, prompt, message, demo_paths, no_weights, tmp_path, out, capsys):
    from PIL import Image

    image = str(tmp_path / "img.png")
    Image.new("RGB", (96, 64), (10, 20, 30)).save(image)
    argv = tiny_argv(demo_paths, model) + ["--prompt", prompt.replace("IMAGE", image), "--output-path",
                                           str(out / "a.mp4")]
    assert expect_error(argv, capsys, out) == "error: " + message


@pytest.mark.parametrize("model", ["cogvideox_5b", "cogvideox_5b_i2v"])
def test_prompt_file_line_with_only_a_path_is_refused(model, demo_paths, no_weights, tmp_path, out, capsys):
    from PIL import Image

    image = str(tmp_path / "img.png")
    Image.new("RGB", (96, 64), (10, 20, 30)).save(image)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a cat@@{image}\n@@{image}\n")
    argv = tiny_argv(demo_paths, model) + ["--input-type", "txt", "--input-file", str(prompts), "--output-dir",
                                           str(out)]
    msg = expect_error(argv, capsys, out)
    assert msg == f"error: {prompts} line 2: the prompt before '@@' is empty: write 'prompt@@path'", msg


# ---------------------------------------------------------------------------------------------- 5. numeric ranges


@pytest.mark.parametrize("extra,message", [
    (["--guidance-scale", "-1"], "--guidance-scale -1.0 must be a number >= 0 (the configs use 6)"),
    (["--guidance-scale", "nan"], "--guidance-scale nan must be a number >= 0 (the configs use 6)"),
    (["--num-steps", "3000"], "--num-steps 3000 is outside 1..1000 (the noise schedule has 1000 steps): the configs "
                              "use 50"),
    (["--num-steps", "0"], "--num-steps 0 is outside 1..1000"),
    (["--strength", "1.5"], "--strength 1.5 is outside [0, 1]"),
    (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
    (["--sampling-fps", "0"], "--sampling-fps 0 must be at least 1"),
    (["--lora-scale", "inf"], "--lora-scale inf is not a finite number"),
    (["--vae-tiling", "--vae-tile-size", "100,100"], "--vae-tile-size: a tile height of 100 px does not tile evenly"),
])
def test_numeric_ranges_are_checked_up_front(extra, message, demo_paths, no_weights, out, capsys):
    argv = tiny_argv(demo_paths, "cogvideox_5b") + one_video(out)
    msg = expect_error(argv + extra, capsys, out)
    assert msg.startswith("error: " + message), msg


def test_the_most_steps_are_accepted(demo_paths, no_weights, out, capsys):
    argv = tiny_argv(demo_paths, "cogvideox_5b") + one_video(out)
    expect_accepted(argv + ["--num-steps", "1000", "--guidance-scale", "0", "--vae-tiling", "--vae-tile-size",
                            "96,80"], capsys)


def test_step_limit_comes_from_the_schedule_in_the_config(demo_paths, no_weights, tmp_path, out, capsys):
    yaml_file = tmp_path / "schedule.yaml"
    yaml_file.write_text("model:\n  sampler_config:\n    params:\n      discretization_config:\n        params:\n"
                         "          num_timesteps: 500\n")
    argv = tiny_argv(demo_paths, "cogvideox_5b")
    argv.insert(argv.index("--base") + 2, str(yaml_file))
    msg = expect_error(argv + one_video(out) + ["--num-steps", "600"], capsys, out)
    assert msg.startswith("error: --num-steps 600 is outside 1..500"), msg


@pytest.mark.parametrize("variables,message", [
    ({"NUM_STEPS": "3000"}, "NUM_STEPS=3000 is outside 1..1000 (the noise schedule has 1000 steps)"),
    ({"GUIDANCE_SCALE": "-1"}, "GUIDANCE_SCALE=-1.0 must be a number >= 0"),
    ({"GUIDANCE_SCALE": "nan"}, "GUIDANCE_SCALE=nan must be a number >= 0"),
    ({"PROMPT": "   "}, "PROMPT is empty"),
    ({"PROMPT_FILE": "@@"}, "line 2: the prompt before '@@' is empty"),
])
def test_cluster_rules_check_the_same_ranges(variables, message, tmp_path, monkeypatch, capsys):
    from sat_cogvideo import launch
    from helpers import make_image, make_sat_folder

    folder = make_sat_folder(tmp_path / "m", "cogvideox-5b")
    if variables.get("PROMPT_FILE") == "@@":
        prompts = tmp_path / "p.txt"
        prompts.write_text(f"a cat\n@@{make_image(tmp_path / 'i.png')}\n")
        variables = {"PROMPT_FILE": str(prompts)}
    for key in launch.VARIABLES:
        monkeypatch.delenv(key, raising=False)
    for key, value in dict({"MODEL_PATH": folder, "PROMPT": "a cat"}, **variables).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exc:
        launch.main(["--check"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and message in lines[0], err


# ---------------------------------------------------------------------------------------------- 6. tools' packages


BLOCK = "import runpy, sys; sys.modules[{module!r}] = None; sys.argv = {argv!r}; runpy.run_path(sys.argv[0], " \
        "run_name='__main__')"


@pytest.mark.parametrize("tool,module,args", [
    ("convert_weight_sat2hf.py", "diffusers", ["--transformer_ckpt_path", "T", "--output_path", "OUT"]),
    ("convert_weight_hf2sat.py", "torch", ["--input_path", "T", "--output_path", "OUT"]),
    ("export_sat_lora_weight.py", "safetensors", ["--sat_pt_path", "T", "--lora_save_directory", "OUT"]),
])
def test_tool_with_a_missing_package_says_what_to_install(tool, module, args, tmp_path):
    out = str(tmp_path / "converted")
    argv = [os.path.join(ROOT, "tools", tool)] + [out if a == "OUT" else str(tmp_path) if a == "T" else a
                                                  for a in args]
    proc = subprocess.run([sys.executable, "-c", BLOCK.format(module=module, argv=argv)], capture_output=True,
                          text=True, timeout=300, cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.fullmatch(rf"error: tools/{re.escape(tool)} needs the Python package '{module}', which is not "
                        rf"installed: pip install '{module}[^']*' \(or set up with `bash inference.sh`\)", lines[0]), \
        lines[0]
    assert not os.path.exists(out)


def test_set_up_installs_the_converter_dependency():
    """diffusers is a runtime requirement (the converter is a user command), and the set-up checks for it."""
    import ast

    tree = ast.parse(open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    requires = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "install_requires"))
    assert any(re.fullmatch(r"diffusers==[\d.]+", r) for r in requires), requires
    env_sh = open(os.path.join(ROOT, "scripts", "env.sh"), encoding="utf-8").read()
    base_modules = re.search(r'local mods="([^"]*)"', env_sh).group(1).split()
    assert "diffusers" in base_modules


# ---------------------------------------------------------------------------------------------- 7. TensorBoard


def test_finetune_keeps_tensorboard_files_in_the_run_folder(demo_paths, tmp_path):
    from sat_cogvideo.demo import build_demo_dataset

    folder = demo_paths["folder"]
    build_demo_dataset(folder)
    save = tmp_path / "ckpts"
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = dict(os.environ, SAT_COGVIDEO_DEMO=folder, OMP_NUM_THREADS="2", PYTHONPATH=ROOT)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "sat_cogvideo.train_video", "--base",
                           os.path.join(CONFIGS, "tiny", "cogvideox_2b_lora.yaml"),
                           os.path.join(CONFIGS, "tiny", "sft.yaml"), "--save", str(save), "--train-iters", "1",
                           "--save-interval", "1"], env=env, cwd=str(cwd), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert os.listdir(cwd) == [], os.listdir(cwd)  # no ./runs where the run was started
    runs = [d for d in glob.glob(str(save / "*")) if os.path.isdir(d)]
    assert len(runs) == 1, runs
    events = glob.glob(os.path.join(runs[0], "runs", "*", "events.out.tfevents.*"))
    assert events, files_under(save)
