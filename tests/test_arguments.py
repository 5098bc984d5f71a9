"""get_args: the shipped configs load, YAML merge order, command-line overrides, bad input by message."""
import glob
import os
import subprocess
import sys

import pytest
from omegaconf import DictConfig

from sat_cogvideo.arguments import get_args, iter_targets, str2bool
from sat_cogvideo.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")) +
                       glob.glob(os.path.join(ROOT, "configs", "tiny", "*.yaml")))
MODEL_CONFIGS = [p for p in MODEL_CONFIGS if "inference" not in os.path.basename(p) and "sft" not in os.path.basename(p)]


def cfg(name):
    return os.path.join(ROOT, "configs", name)


def test_every_model_config_is_shipped():
    names = {os.path.relpath(p, os.path.join(ROOT, "configs")) for p in MODEL_CONFIGS}
    for fam in ("cogvideox_2b", "cogvideox_5b", "cogvideox_5b_i2v", "cogvideox1.5_5b", "cogvideox1.5_5b_i2v"):
        for suffix in ("", "_lora"):
            assert f"{fam}{suffix}.yaml" in names
            assert f"tiny/{fam}{suffix}.yaml" in names


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_model_config_with_inference_loads(path):
    inference = cfg("tiny/inference.yaml" if "/tiny/" in path else
                    ("inference_1.5.yaml" if "1.5" in os.path.basename(path) else "inference.yaml"))
    args = get_args(["--base", path, inference])
    assert isinstance(args.model_config, DictConfig)
    assert args.mode == "inference"
    assert args.latent_channels == 16
    net = args.model_config.network_config.params
    assert net.out_channels == 16
    assert args.model_config.first_stage_config.target == "vae_modules.autoencoder.VideoAutoencoderInferenceWrapper"
    if path.endswith("_lora.yaml"):
        assert list(args.model_config.not_trainable_prefixes) == ["all"]
        assert net.modules.lora_config.target == "sat.model.finetune.lora2.LoraMixin"


@pytest.mark.parametrize("path", [p for p in MODEL_CONFIGS if p.endswith("_lora.yaml")][:2])
def test_model_config_with_sft_loads(path):
    sft = cfg("tiny/sft.yaml" if "/tiny/" in path else "sft.yaml")
    args = get_args(["--base", path, sft])
    assert args.mode == "finetune"
    assert args.deepspeed is True
    assert args.deepspeed_config["zero_optimization"]["stage"] == 2
    assert isinstance(args.data_config, DictConfig)
    assert args.data_config.target == "data_video.SFTDataset"


def test_original_values_of_released_configs():
    a = get_args(["--base", cfg("cogvideox_2b.yaml"), cfg("inference.yaml")])
    m = a.model_config
    assert m.scale_factor == pytest.approx(1.15258426)
    assert m.network_config.params.hidden_size == 1920 and m.network_config.params.num_layers == 30
    assert m.denoiser_config.params.discretization_config.params.shift_scale == 3.0
    assert m.conditioner_config.params.emb_models[0].params.max_length == 226
    assert a.sampling_num_frames == 13 and a.sampling_fps == 8 and a.bf16 is True
    b = get_args(["--base", cfg("cogvideox1.5_5b_i2v.yaml"), cfg("inference_1.5.yaml")])
    n = b.model_config.network_config.params
    assert list(n.patch_size) == [2, 2, 2] and n.in_channels == 32 and n.ofs_embed_dim == 512
    assert b.model_config.conditioner_config.params.emb_models[0].params.max_length == 224
    assert b.sampling_num_frames == 22 and b.sampling_fps == 16 and b.sampling_image_size == [768, 1360]
    c = get_args(["--base", cfg("cogvideox_5b_i2v_lora.yaml"), cfg("sft.yaml")])
    assert c.model_config.network_config.params.modules.lora_config.params.r == 256
    assert c.lr == pytest.approx(1e-5) and c.weight_decay == pytest.approx(1e-4)
    assert c.batch_size == 2 and c.bf16 and not c.fp16 and c.train_iters == 1000


def test_merge_order_later_file_wins(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("args:\n  sampling_fps: 5\n  sampling_num_frames: 9\nmodel:\n  scale_factor: 1.0\n  x: {y: 1, z: 2}\n")
    b.write_text("args:\n  sampling_fps: 7\nmodel:\n  x: {z: 3}\n")
    args = get_args(["--base", str(a), str(b)])
    assert args.sampling_fps == 7 and args.sampling_num_frames == 9
    assert args.model_config.x.y == 1 and args.model_config.x.z == 3
    args = get_args(["--base", str(b), str(a)])
    assert args.sampling_fps == 5 and args.model_config.x.z == 2


def test_command_line_overrides_yaml(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("args:\n  sampling_fps: 5\n  output_dir: from_yaml\n  bf16: true\n  seed: 3\n")
    args = get_args(["--base", str(a), "--sampling-fps", "12", "--seed", "9"])
    assert args.sampling_fps == 12 and args.seed == 9
    assert args.output_dir == "from_yaml" and args.bf16 is True
    # a default that the user did not type does not override the YAML
    args = get_args(["--base", str(a)])
    assert args.sampling_fps == 5 and args.seed == 3


def test_command_line_overrides_deepspeed_section():
    args = get_args(["--base", cfg("tiny/cogvideox_2b_lora.yaml"), cfg("tiny/sft.yaml"), "--lr", "0.5",
                     "--batch-size", "3"])
    assert args.lr == 0.5 and args.deepspeed_config["optimizer"]["params"]["lr"] == 0.5
    assert args.batch_size == 3 and args.deepspeed_config["train_micro_batch_size_per_gpu"] == 3


def test_bool_options_parse_false():
    assert str2bool("False") is False and str2bool("true") is True and str2bool("0") is False
    args = get_args(["--only-save-latents", "false", "--log-image", "no"])
    assert args.only_save_latents is False and args.log_image is False


def test_device_and_image_size_options():
    import torch

    args = get_args(["--device", "cpu", "--sampling-image-size", "64,96"])
    assert args.device == "cpu" and args.sampling_image_size == [64, 96]
    assert get_args(["--device", "-1"]).device == ("cuda:0" if torch.cuda.is_available() else "cpu")  # resolved


# ---- bad input: one line each, naming the file and key ----

def test_missing_yaml():
    with pytest.raises(UserError, match=r"config file .*nope\.yaml does not exist"):
        get_args(["--base", "nope.yaml"])


def test_base_is_a_folder(tmp_path):
    with pytest.raises(UserError, match=r"is a folder"):
        get_args(["--base", str(tmp_path)])


def test_yaml_syntax_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("args:\n  sampling_fps: [1, 2\n  x: 3\n")
    with pytest.raises(UserError, match=r"bad\.yaml: YAML syntax error at line \d+"):
        get_args(["--base", str(bad)])


def test_wrong_type(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("args:\n  sampling_num_frames: thirteen\n")
    with pytest.raises(UserError, match=r"t\.yaml: args\.sampling_num_frames must be an integer, got 'thirteen'"):
        get_args(["--base", str(bad)])
    bad.write_text("args:\n  input_type: csv\n")
    with pytest.raises(UserError, match=r"args\.input_type must be one of cli, txt"):
        get_args(["--base", str(bad)])
    bad.write_text("model: 3\n")
    with pytest.raises(UserError, match=r"t\.yaml: section 'model:' must be a mapping"):
        get_args(["--base", str(bad)])


def test_unknown_args_key_warns(tmp_path):
    f = tmp_path / "u.yaml"
    f.write_text("args:\n  sampling_fsp: 3\n")
    with pytest.warns(UserWarning, match="sampling_fsp"):
        get_args(["--base", str(f)])


def test_cli_error_is_one_line_exit_2(tmp_path):
    """Through a real entry point: one line on stderr, exit code 2, no traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("args: [\n")
    code = ("import sys; from sat_cogvideo.errors import run_cli; from sat_cogvideo.arguments import get_args\n"
            "run_cli(get_args)(sys.argv[1:])\n")
    for argv, expect in (([str(bad)], "YAML syntax error"), (["missing.yaml"], "does not exist"),
                         ([str(tmp_path)], "is a folder")):
        proc = subprocess.run([sys.executable, "-c", code, "--base", *argv], capture_output=True, text=True,
                              cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
        assert proc.returncode == 2, proc.stderr
        lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and expect in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr


def test_help_works(capsys):
    with pytest.raises(SystemExit) as exc:
        get_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--sampling-num-frames" in out and "--base" in out and "--train-iters" in out
