"""sample_video: input validation (before any weight is loaded), output layout, resume with --skip-existing,
seeding, latents-only output, prompt sharding, offload."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from helpers import model_config, read_frames, sample_argv


def base_argv(paths, name="cogvideox_5b", steps=2):
    return sample_argv(paths, name, steps)


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if sample_video gets as far as building the model."""
    from sat_cogvideo import sample_video

    def refuse(args):
        raise AssertionError("validation should have stopped before any weight is loaded")

    monkeypatch.setattr(sample_video, "build_engine", refuse)


def run_expect_error(argv, capsys):
    from sat_cogvideo import sample_video

    with pytest.raises(SystemExit) as exc:
        sample_video.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no message"
    return err[-1]


@pytest.fixture(scope="module")
def media_files(tmp_path_factory):
    from PIL import Image

    from sat_cogvideo import media

    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    img = str(d / "img.png")
    Image.fromarray(rng.integers(0, 255, (70, 100, 3), dtype=np.uint8)).save(img)
    bad = str(d / "broken.png")
    with open(bad, "wb") as f:
        f.write(b"this is not a png")
    short = str(d / "short.mp4")
    media.write_video(short, rng.integers(0, 255, (4, 64, 96, 3), dtype=np.uint8), fps=8)
    vid = str(d / "vid.mp4")
    media.write_video(vid, rng.integers(0, 255, (12, 64, 96, 3), dtype=np.uint8), fps=8)
    return {"img": img, "bad": bad, "short": short, "vid": vid, "dir": str(d)}


@pytest.mark.parametrize("case", [
    "i2v_model_t2v", "i2v_no_image", "v2v_with_i2v_model", "image_missing", "image_broken", "i2v_on_t2v_model",
    "video_short", "frames_not_4n1", "frames_not_allowed", "size_not_16", "size_too_big", "out_not_writable",
    "output_exists", "input_file_missing", "bad_output_ext"])
def test_bad_inputs_one_line_exit_2_before_loading(case, demo_paths, media_files, no_weights, tmp_path, capsys):
    out = str(tmp_path / "o.mp4")
    t2v = base_argv(demo_paths, "cogvideox_5b")
    i2v = base_argv(demo_paths, "cogvideox_5b_i2v")
    t2v15 = base_argv(demo_paths, "cogvideox1.5_5b")
    argv, expect = {
        "i2v_model_t2v": (i2v + ["--prompt", "a", "--output-path", out, "--generate-type", "t2v"],
                          "image-to-video model and cannot do t2v"),
        "i2v_no_image": (i2v + ["--prompt", "a", "--output-path", out], "i2v needs an image"),
        "v2v_with_i2v_model": (i2v + ["--prompt", "a", "--output-path", out, "--generate-type", "v2v",
                                      "--image-or-video-path", media_files["vid"]], "cannot do v2v"),
        "image_missing": (i2v + ["--prompt", "a", "--output-path", out, "--image-or-video-path",
                                 media_files["dir"] + "/nope.png"], "does not exist"),
        "image_broken": (i2v + ["--prompt", "a", "--output-path", out, "--image-or-video-path", media_files["bad"]],
                         "cannot be decoded"),
        "i2v_on_t2v_model": (t2v + ["--prompt", "a", "--output-path", out, "--image-or-video-path", media_files["img"]],
                             "i2v needs an I2V model"),
        "video_short": (t2v + ["--prompt", "a", "--output-path", out, "--image-or-video-path", media_files["short"]],
                        "has 4 frames but 9 are needed"),
        "frames_not_4n1": (t2v + ["--prompt", "a", "--output-path", out, "--num-frames", "10"],
                           "--num-frames 10 is not of the form 4N+1"),
        "frames_not_allowed": (t2v + ["--prompt", "a", "--output-path", out, "--num-frames", "13"],
                               "--num-frames 13 is not allowed for this 1.0 model: use 9"),
        "size_not_16": (t2v15 + ["--prompt", "a", "--output-path", out, "--sampling-image-size", "120,128"],
                        "not a multiple of 16"),
        "size_too_big": (t2v15 + ["--prompt", "a", "--output-path", out, "--sampling-image-size", "256,128"],
                         "exceeds the model's maximum 128x128"),
        "out_not_writable": (t2v + ["--prompt", "a", "--output-path", media_files["img"] + "/sub/o.mp4"],
                             "is not writable"),
        "output_exists": (t2v + ["--prompt", "a", "--output-path", media_files["vid"]], "exists: pass --skip-existing"),
        "input_file_missing": (t2v + ["--input-type", "txt", "--input-file", str(tmp_path / "none.txt"),
                                      "--output-dir", str(tmp_path)], "does not exist"),
        "bad_output_ext": (t2v + ["--prompt", "a", "--output-path", str(tmp_path / "o.avi")], "must end in .mp4"),
    }[case]
    msg = run_expect_error(argv, capsys)
    assert msg.startswith("error: ") and expect in msg, msg


def test_frames_conversion_and_allowed_lists(demo_paths):
    from sat_cogvideo.families import detect_from_model_config
    from sat_cogvideo.sample_video import (allowed_video_frames, check_num_frames, latent_to_video_frames,
                                           video_to_latent_frames)

    assert video_to_latent_frames(49, "1.0") == 13 and latent_to_video_frames(13, "1.0") == 49
    assert video_to_latent_frames(81, "1.5") == 22 and latent_to_video_frames(42, "1.5") == 161
    for name, expect in (("cogvideox_5b", [9]), ("cogvideox1.5_5b", [33, 25, 17, 9])):
        mc = model_config(name)
        assert allowed_video_frames(mc, detect_from_model_config(mc)) == expect
    from omegaconf import OmegaConf
    real = OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "configs", "cogvideox1.5_5b.yaml")).model
    det = detect_from_model_config(real)
    assert check_num_frames(81, real, det) == 22 and check_num_frames(161, real, det) == 42
    from sat_cogvideo.errors import UserError
    with pytest.raises(UserError, match="use 161 or 81"):
        check_num_frames(49, real, det)


def test_i2v_resize_rules():
    from PIL import Image

    from sat_cogvideo import media
    from sat_cogvideo.sample_video import i2v15_pixel_size

    assert media.i2v_15_latent_size(1920, 1080) == (96, 170)
    assert media.i2v_15_latent_size(1080, 1920) == (170, 96)
    assert media.i2v_15_latent_size(1000, 1000) == (96, 96)
    assert media.nearest_multiple_of_16(1352) == 1360 and media.nearest_multiple_of_16(1336) == 1344  # tie -> up
    # tiny model (max 128x128 px): the short side shrinks until the size fits
    assert i2v15_pixel_size((150, 100), model_config("cogvideox1.5_5b_i2v")) == (80, 128)
    # v1.0: cover-resize + centre crop
    img = torch.zeros(3, 100, 300)
    img[:, :, 140:160] = 1.0  # a bright band in the centre survives the crop
    out = media.resize_cover_crop_bicubic(img, 48, 72)
    assert out.shape == (3, 48, 72) and out[:, :, 30:42].mean() > 0.5 and out[:, :, :5].abs().max() < 1e-6


def test_output_layout_interrupt_and_skip_existing(demo_paths, tmp_path, monkeypatch):
    """A prompt list interrupted mid-way and restarted with --skip-existing writes each output exactly once."""
    import imageio

    from sat_cogvideo import sample_video

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox / in snow\n\na blue bird\n", encoding="utf-8")
    out_dir = tmp_path / "out"
    argv = base_argv(demo_paths) + ["--input-type", "txt", "--input-file", str(prompts), "--output-dir",
                                    str(out_dir), "--batch-size", "1"]
    writes = []
    real_save = sample_video.save_outputs

    def counting_save(*a, **k):
        path = real_save(*a, **k)
        writes.append(path)
        return path

    monkeypatch.setattr(sample_video, "save_outputs", counting_save)
    real_generate = sample_video.generate
    calls = {"n": 0}

    def interrupting_generate(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_generate(*a, **k)

    monkeypatch.setattr(sample_video, "generate", interrupting_generate)
    with pytest.raises(SystemExit) as exc:
        sample_video.main(argv)
    assert exc.value.code == 130
    # the blank line 2 is skipped; "a blue bird" keeps its line counter 2
    expected = [out_dir / "0_a_red_fox__in_snow" / "0" / "000000.mp4", out_dir / "2_a_blue_bird" / "0" / "000000.mp4"]
    assert expected[0].exists() and not expected[1].exists()
    leftovers = [p for p in out_dir.rglob("*") if ".partial" in p.name]
    assert not leftovers
    # without --skip-existing the existing output is not overwritten
    monkeypatch.setattr(sample_video, "generate", real_generate)
    with pytest.raises(SystemExit) as exc:
        sample_video.main(argv)
    assert exc.value.code == 2
    result = sample_video.main(argv + ["--skip-existing"])
    assert sorted(map(str, result)) == sorted(map(str, expected))
    assert sorted(writes) == sorted(map(str, expected)) and len(writes) == len(set(writes)) == 2
    for p in expected:
        reader = imageio.get_reader(str(p))
        frames = [f for f in reader]
        assert len(frames) == 9 and frames[0].shape == (64, 96, 3)
        assert reader.get_meta_data()["fps"] == 8
    # nothing left to do: a third run writes nothing
    assert sorted(map(str, sample_video.main(argv + ["--skip-existing"]))) == sorted(map(str, expected))
    assert len(writes) == 2


def test_seed_decides_noise_and_latents_only(demo_paths, tmp_path):
    from sat_cogvideo import sample_video

    def latent(seed, name):
        out = tmp_path / f"{name}.mp4"
        sample_video.main(base_argv(demo_paths) + ["--prompt", "a cat", "--output-path", str(out),
                                                    "--only-save-latents", "true", "--seed", str(seed)])
        pt = tmp_path / f"{name}.pt"
        assert (tmp_path / f"{name}.txt").read_text() == "a cat"
        return torch.load(pt)

    a, b, c = latent(7, "a"), latent(7, "b"), latent(8, "c")
    assert a.shape == (1, 16, 3, 8, 12)  # [B, C, T, h, w], divided by the scale factor
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_prompt_sharding_over_data_parallel_ranks(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import sat_cogvideo.distributed as dist_mod
    from sat_cogvideo.sample_video import read_prompt_lines

    f = tmp_path / "p.txt"
    f.write_text("p0\np1\n\np3\np4\n")
    args = SimpleNamespace(prompt=None, input_type="txt", input_file=str(f))
    got = {}
    for rank in (0, 1):
        monkeypatch.setattr(dist_mod, "data_parallel_rank_and_size", lambda r=rank: (r, 2))
        got[rank] = list(read_prompt_lines(args))
    assert got[0] == [("p0", 0), ("p4", 4)]  # the blank line 2 is skipped, the others keep their numbers
    assert got[1] == [("p1", 1), ("p3", 3)]


PARTS = ("conditioner", "model", "first_stage_model")  # T5, DiT (in its wrapper), VAE


class WhereSpy:
    """Where every parameter of the engine was last sent (``Module.to/cpu/cuda``), by part, and snapshots of that
    taken when T5, the DiT and the VAE decoder start a forward.

    On a CPU-only machine the compute device and the offload device are both the CPU, so the test runs with
    ``--device cpu:0``: the same memory, but a device that ``.to()`` records as ``cpu:0`` while offloading records
    ``cpu``."""

    def __init__(self, monkeypatch, sample_video):
        self.where = {}      # id(param) -> device string it was last moved to
        self.names = {}      # part -> [id(param)]
        self.seen = []       # (stage, {part: set of devices})
        real_to, real_cpu, real_cuda = torch.nn.Module.to, torch.nn.Module.cpu, torch.nn.Module.cuda
        spy = self

        def record(module, device):
            if device is not None:
                for p in module.parameters():
                    spy.where[id(p)] = str(torch.device(device))

        def to(module, *args, **kwargs):
            record(module, torch._C._nn._parse_to(*args, **kwargs)[0])
            return real_to(module, *args, **kwargs)

        def cpu(module):
            record(module, "cpu")
            return real_cpu(module)

        def cuda(module, device=None):
            record(module, "cuda" if device is None else torch.device("cuda", device) if isinstance(device, int)
                   else device)
            return real_cuda(module, device)

        monkeypatch.setattr(torch.nn.Module, "to", to)
        monkeypatch.setattr(torch.nn.Module, "cpu", cpu)
        monkeypatch.setattr(torch.nn.Module, "cuda", cuda)
        real_build = sample_video.build_engine

        def build_engine(args):
            model = real_build(args)
            for part in PARTS:
                params = list(getattr(model, part).parameters())
                assert params, part
                spy.names[part] = [id(p) for p in params]
                for p in params:
                    spy.where.setdefault(id(p), "cpu")  # built on the CPU
            stages = [("T5", e) for e in model.conditioner.embedders] + [
                ("DiT", model.model.diffusion_model), ("VAE decoder", model.first_stage_model.decoder)]
            for stage, module in stages:
                module.register_forward_pre_hook(lambda m, a, stage=stage: spy.snapshot(stage))
            return model

        monkeypatch.setattr(sample_video, "build_engine", build_engine)

    def locations(self):
        return {part: {self.where[i] for i in ids} for part, ids in self.names.items()}

    def snapshot(self, stage):
        self.seen.append((stage, self.locations()))


def test_offload_parts_live_on_the_device_only_while_they_work(demo_paths, tmp_path, monkeypatch):
    """--offload: while T5 runs, the DiT and the VAE are on the CPU; while the DiT runs, T5 and the VAE are; while
    the VAE decodes, T5 and the DiT are; afterwards everything is back on the CPU.  Without --offload every part
    stays on the device.  The video is the same either way."""
    from sat_cogvideo import sample_video

    argv = base_argv(demo_paths) + ["--prompt", "a cat", "--device", "cpu:0"]
    on = {"T5": "conditioner", "DiT": "model", "VAE decoder": "first_stage_model"}
    videos = {}
    for offload in (False, True):
        spy = WhereSpy(monkeypatch, sample_video)
        out = tmp_path / f"offload{int(offload)}.mp4"
        sample_video.main(argv + ["--output-path", str(out)] + (["--offload"] if offload else []))
        videos[offload] = read_frames(out)
        stages = [stage for stage, _ in spy.seen]
        assert stages[0] == "T5" and "DiT" in stages and stages[-1] == "VAE decoder", stages
        for stage, where in spy.seen:
            for part, devices in where.items():
                if not offload:
                    expect = {"cpu:0"}
                else:
                    expect = {"cpu:0"} if part == on[stage] else {"cpu"}
                assert devices == expect, (offload, stage, part, devices)
        final = spy.locations()
        assert final == {p: ({"cpu"} if offload else {"cpu:0"}) for p in PARTS}, final
        monkeypatch.undo()
    np.testing.assert_array_equal(videos[False], videos[True])


def test_cli_options_edit_the_model_config(demo_paths):
    from sat_cogvideo.arguments import get_args
    from sat_cogvideo.sample_video import add_inference_args, apply_overrides

    argv = base_argv(demo_paths) + ["--prompt", "a", "--sampler", "ddim", "--num-steps", "7", "--guidance-scale", "4.5",
                                    "--vae-slicing"]
    args = get_args(["--mode", "inference"] + argv, extra=[add_inference_args])
    apply_overrides(args)
    s = args.model_config.sampler_config
    assert s.target == "sgm.modules.diffusionmodules.sampling.VideoDDIMSampler"
    assert s.params.num_steps == 7 and s.params.guider_config.params.num_steps == 7
    assert s.params.guider_config.params.scale == 4.5
    assert args.model_config.en_and_decode_n_samples_a_time == 1
    assert args.model_config.first_stage_config.params.cp_size == 1
    assert args.model_config.network_config.params.transformer_args.checkpoint_activations is False
    assert args.model_config.loss_fn_config.params.sigma_sampler_config.params.uniform_sampling is False


def test_real_configs_validate_without_weights(no_weights, tmp_path, capsys):
    """The released configs: family checks and frame rules apply before any T5/VAE/transformer file is read."""
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    i2v = ["--base", f"{root}/cogvideox_5b_i2v.yaml", f"{root}/inference.yaml", "--device", "cpu", "--load", str(tmp_path)]
    msg = run_expect_error(i2v + ["--prompt", "a", "--output-path", str(tmp_path / "a.mp4"), "--generate-type", "t2v"],
                           capsys)
    assert "cogvideox-5b-i2v is an image-to-video model and cannot do t2v" in msg, msg
    t2v15 = ["--base", f"{root}/cogvideox1.5_5b.yaml", f"{root}/inference_1.5.yaml", "--device", "cpu",
             "--load", str(tmp_path)]
    msg = run_expect_error(t2v15 + ["--prompt", "a", "--output-path", str(tmp_path / "a.mp4"), "--num-frames", "49"],
                           capsys)
    assert "--num-frames 49 is not allowed for cogvideox1.5-5b: use 161 or 81" in msg, msg


def test_vae_tiling_and_slicing_switches(demo_paths, tmp_path, monkeypatch):
    import imageio

    from sat_cogvideo import sample_video
    from sat_cogvideo.vae_modules.autoencoder import VideoAutoencoderInferenceWrapper

    tiled = []
    real = VideoAutoencoderInferenceWrapper._tiled_decode

    def spy(self, *a, **k):
        tiled.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(VideoAutoencoderInferenceWrapper, "_tiled_decode", spy)
    out = tmp_path / "t.mp4"
    sample_video.main(base_argv(demo_paths, "cogvideox1.5_5b") + [
        "--prompt", "a cat", "--output-path", str(out), "--vae-tiling", "--vae-tile-size", "96,80", "--vae-slicing"])
    assert tiled
    frames = [f for f in imageio.get_reader(str(out))]
    assert len(frames) == 17 and frames[0].shape == (128, 128, 3)


def test_cli_input_type_reads_stdin(demo_paths, tmp_path, monkeypatch):
    import io

    from sat_cogvideo import sample_video

    monkeypatch.setattr("sys.stdin", io.StringIO("a small dog\n"))
    out = sample_video.main(base_argv(demo_paths) + ["--input-type", "cli", "--output-dir", str(tmp_path),
                                                     "--batch-size", "1"])
    assert out == [str(tmp_path / "0_a_small_dog" / "0" / "000000.mp4")] and os.path.isfile(out[0])


def test_data_parallel_ranks_share_prompts_and_give_the_same_videos(demo_paths, tmp_path):
    """torchrun with 2 CPU ranks (gloo): lines are shared out by number, and each video equals the one a single
    process makes (the seed is per line, not per rank)."""
    import subprocess
    import sys

    from sat_cogvideo import sample_video

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\na blue bird\na green frog\n")
    common = base_argv(demo_paths) + ["--input-type", "txt", "--input-file", str(prompts), "--batch-size", "1",
                                      "--only-save-latents", "true"]
    env = dict(os.environ, SAT_COGVIDEO_DEMO=demo_paths["folder"], OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), "-m", "sat_cogvideo.sample_video", *common, "--output-dir",
                           str(tmp_path / "dp")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = ["0_a_red_fox", "1_a_blue_bird", "2_a_green_frog"]
    for n in names:
        assert (tmp_path / "dp" / n / "0" / "latent.pt").is_file()
    sample_video.main(common + ["--output-dir", str(tmp_path / "single")])
    for n in names:
        a = torch.load(tmp_path / "dp" / n / "0" / "latent.pt")
        b = torch.load(tmp_path / "single" / n / "0" / "latent.pt")
        assert torch.equal(a, b), n


def test_help_lists_the_cluster_options(capsys):
    from sat_cogvideo import sample_video

    with pytest.raises(SystemExit) as exc:
        sample_video.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--prompt", "--image-or-video-path", "--output-path", "--num-frames", "--num-steps",
                 "--guidance-scale", "--sampler", "--seed", "--dtype", "--device", "--lora-path", "--offload",
                 "--vae-tiling", "--skip-existing", "--sampling-num-frames", "--input-type"):
        assert flag in out, flag
