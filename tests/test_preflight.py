"""Checkpoint problems are found before any weight loads: ``sample_video`` reads the transformer checkpoint first
(memory-mapped, weights-only), checks its model against the config, then the LoRA run, ``3d-vae.pt`` and the T5
folder; each problem is one ``error:`` line and exit code 2, and no engine is built.  The converter names a
truncated T5 file the same way."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from helpers import sample_argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_engine(monkeypatch):
    """Fail the test if the engine (and with it T5, VAE and DiT weights) would be built."""
    from sat_cogvideo import sample_video

    def refuse(args):
        raise AssertionError("the engine was built: the problem was not found before the weights load")

    monkeypatch.setattr(sample_video, "build_engine", refuse)


def _main_error(argv, capsys) -> str:
    from sat_cogvideo import sample_video

    with pytest.raises(SystemExit) as exc:
        sample_video.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _argv(paths, model, load, tmp_path, *extra):
    argv = sample_argv(paths, model, steps=1)
    argv[argv.index("--load") + 1] = str(load)
    return argv + ["--prompt", "a cat", "--output-path", str(tmp_path / "v.mp4"), *extra]


@pytest.mark.parametrize("ckpt, config, says", [
    ("cogvideox_5b", "cogvideox_2b", "position embedding 3D RoPE, the config says 3D sincos table"),
    ("cogvideox_2b", "cogvideox_5b", "position embedding 3D sincos table (the 2B's), the config says 3D RoPE"),
    ("cogvideox_5b_i2v", "cogvideox_5b", "in_channels 32, the config says 16"),
    ("cogvideox1.5_5b", "cogvideox_5b", "code generation 1.5, the config says 1.0"),
])
def test_checkpoint_of_another_model_is_refused_first(demo_paths, tmp_path, capsys, no_engine, ckpt, config, says):
    err = _main_error(_argv(demo_paths, config, demo_paths[ckpt], tmp_path), capsys)
    assert "does not fit the model config" in err and says in err, err
    assert not (tmp_path / "v.mp4").exists()


def test_broken_checkpoint_files_are_named(demo_paths, tmp_path, capsys, no_engine):
    good = demo_paths["cogvideox_5b"]
    empty = tmp_path / "empty"
    shutil.copytree(good, empty)
    tag = (empty / "latest").read_text().strip()
    (empty / tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    err = _main_error(_argv(demo_paths, "cogvideox_5b", empty, tmp_path), capsys)
    assert "mp_rank_00_model_states.pt is empty (0 bytes)" in err, err

    cut = tmp_path / "cut"
    shutil.copytree(good, cut)
    data = (cut / tag / "mp_rank_00_model_states.pt").read_bytes()
    (cut / tag / "mp_rank_00_model_states.pt").write_bytes(data[: len(data) // 2])
    err = _main_error(_argv(demo_paths, "cogvideox_5b", cut, tmp_path), capsys)
    assert "is truncated or damaged" in err and str(cut) in err, err

    (cut / "latest").write_text("77")
    err = _main_error(_argv(demo_paths, "cogvideox_5b", cut, tmp_path), capsys)
    assert "names iteration '77'" in err, err
    (cut / "latest").unlink()
    err = _main_error(_argv(demo_paths, "cogvideox_5b", cut, tmp_path), capsys)
    assert "is not a SAT checkpoint: expected" in err, err


def test_diffusers_folders_and_hub_ids_are_checked_first(demo_paths, tmp_path, capsys, no_engine, monkeypatch):
    """Hub ids and pipeline folders load (tests/test_hub_loading.py); missing or incomplete ones are one line."""
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache, offline
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    err = _main_error(_argv(demo_paths, "cogvideox_5b", "THUDM/CogVideoX-5b", tmp_path), capsys)
    assert "THUDM/CogVideoX-5b is not in the Hugging Face cache" in err and "HF_HUB_OFFLINE=1" in err, err
    pipe = tmp_path / "CogVideoX-5b"
    (pipe / "transformer").mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXPipeline"}))
    (pipe / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    err = _main_error(_argv(demo_paths, "cogvideox_5b", pipe, tmp_path), capsys)
    assert "is an incomplete diffusers pipeline: missing transformer/config.json, vae/config.json" in err, err
    err = _main_error(_argv(demo_paths, "cogvideox_5b", pipe / "transformer", tmp_path), capsys)
    assert "is a diffusers model folder" in err, err


def _truncated_t5(paths, tmp_path):
    t5 = tmp_path / "t5"
    shutil.copytree(paths["t5"], t5)
    weights = sorted(t5.glob("*.safetensors"))
    assert weights, list(t5.iterdir())
    data = weights[0].read_bytes()
    weights[0].write_bytes(data[: len(data) - 100])
    return t5, weights[0]


def test_truncated_t5_is_one_line(demo_paths, tmp_path, capsys, no_engine, monkeypatch):
    demo = tmp_path / "demo"  # the tiny configs find t5/ and vae/ through $SAT_COGVIDEO_DEMO
    demo.mkdir()
    t5, cut = _truncated_t5(demo_paths, demo)
    os.symlink(os.path.dirname(demo_paths["vae"]), demo / "vae")
    monkeypatch.setenv("SAT_COGVIDEO_DEMO", str(demo))
    err = _main_error(_argv(demo_paths, "cogvideox_5b", demo_paths["cogvideox_5b"], tmp_path), capsys)
    assert f"{cut} is truncated" in err and "fetch it again" in err, err

    import importlib.util

    spec = importlib.util.spec_from_file_location("sat2hf", os.path.join(ROOT, "tools", "convert_weight_sat2hf.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(SystemExit) as exc:
        tool.main(["--transformer_ckpt_path", demo_paths["cogvideox_5b"], "--text_encoder_path", str(t5),
                   "--output_path", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err and f"{cut} is truncated" in err, err
    assert not (tmp_path / "hf").exists()


def test_good_checkpoint_passes_the_preflight(demo_paths, tmp_path):
    """The checks accept what they should: every demo model with its own config."""
    from sat_cogvideo.arguments import get_args
    from sat_cogvideo.sample_video import add_inference_args, preflight_weights

    for model in ("cogvideox_2b", "cogvideox_5b", "cogvideox_5b_i2v", "cogvideox1.5_5b", "cogvideox1.5_5b_i2v"):
        args = get_args(_argv(demo_paths, model, demo_paths[model], tmp_path), extra=[add_inference_args])
        preflight_weights(args)
