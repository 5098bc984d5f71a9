"""``--load`` / ``MODEL_PATH`` given a diffusers pipeline folder or a Hugging Face id (issue 14).

* Tiny pipelines written by diffusers itself (``save_pretrained``, random weights, the tiny T5) run t2v / i2v / v2v
  through the SAT engine, and their videos equal, bit for bit, those of the same weights converted with
  ``tools/convert_weight_hf2sat.py`` and loaded as a SAT folder with the model YAML the tool writes (1.0 and 1.5).
* The SAT model config derived from the diffusers configs equals the hand-written ``configs/tiny`` file the
  weights were made from; for the five released sizes (header-only files: sparse, nothing is stored) the family's
  configs/ file is chosen as it is, with the family's frames, fps and dtype.
* A Hugging Face cache laid out as huggingface_hub lays it out resolves an id with ``HF_HUB_OFFLINE=1``; an empty
  cache, a partial one and a repository that is not CogVideoX are each one line.
* Loading a ~300 MB diffusers transformer into the SAT DiT grows the resident memory by <= 1.3x the file.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import PY, ROOT, clean_env, model_config, read_frames, save_tiny_pipeline, write_image

STEPS = 2


@pytest.fixture(scope="session")
def pipelines(tmp_path_factory, demo_paths):
    """{tiny family: (diffusers pipeline folder, its SAT conversion by the tool)}, built on first use."""
    root = tmp_path_factory.mktemp("pipelines")
    made = {}

    def get(family):
        if family not in made:
            pipe = save_tiny_pipeline(root / family, family, t5=demo_paths["t5"])
            sat = root / f"{family}-sat"
            try:
                _tool_main()(["--input_path", pipe, "--output_path", str(sat)])
            except SystemExit as exc:  # run_cli may exit 0 on success
                assert exc.code in (0, None), exc.code
            made[family] = (pipe, str(sat))
        return made[family]

    return get


def _tool_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_weight_hf2sat", os.path.join(ROOT, "tools",
                                                                                          "convert_weight_hf2sat.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _options(family, kind, tmp_path):
    """The run's options, the same for both sides (size, frames, fps, seed, media)."""
    frames = 9  # allowed for the tiny 1.0 (3 latents) and 1.5 (4 latents with the padding frame) models
    opts = ["--prompt", "a red fox runs through snow", "--num-steps", str(STEPS), "--device", "cpu", "--seed", "7",
            "--num-frames", str(frames), "--sampling-fps", "8", "--generate-type", kind]
    if kind == "i2v":
        opts += ["--image-or-video-path", write_image(tmp_path / "first.png", 64, 96, seed=3)]
    else:
        opts += ["--sampling-image-size", "64,96"]
    if kind == "v2v":
        from sat_cogvideo.media import write_video

        rng = np.random.default_rng(5)
        video = rng.integers(0, 255, (frames, 64, 96, 3), dtype=np.uint8)
        write_video(str(tmp_path / "in.mp4"), video, fps=8)
        opts += ["--image-or-video-path", str(tmp_path / "in.mp4"), "--strength", "0.7"]
    return opts


CASES = [("cogvideox_5b", "t2v"), ("cogvideox1.5_5b_i2v", "i2v"),
         pytest.param("cogvideox_5b", "v2v", marks=pytest.mark.slow(reason="one run per family by default")),
         pytest.param("cogvideox_5b_i2v", "i2v", marks=pytest.mark.slow(reason="one run per family by default")),
         pytest.param("cogvideox1.5_5b", "t2v", marks=pytest.mark.slow(reason="one run per family by default")),
         pytest.param("cogvideox1.5_5b", "v2v", marks=pytest.mark.slow(reason="one run per family by default")),
         pytest.param("cogvideox_2b", "t2v", marks=pytest.mark.slow(reason="one run per family by default"))]


@pytest.mark.parametrize("family,kind", CASES)
def test_pipeline_folder_runs_like_its_sat_conversion(pipelines, family, kind, tmp_path, capsys):
    from sat_cogvideo import sample_video

    pipe, sat = pipelines(family)
    opts = _options(family, kind, tmp_path)
    ours = sample_video.main(["--load", pipe, "--output-path", str(tmp_path / "hf.mp4")] + opts)
    assert "diffusers pipeline, SAT model config: derived from the diffusers configs" in capsys.readouterr().err
    ref = sample_video.main(["--base", os.path.join(sat, "model.yaml"), "--load", os.path.join(sat, "transformer"),
                             "--output-path", str(tmp_path / "sat.mp4")] + opts)
    a, b = read_frames(ours[0]), read_frames(ref[0])
    assert a.shape == b.shape and a.shape[0] == 9
    assert a.std() > 1.0  # a real (noisy) video, not a constant frame
    assert np.array_equal(a, b)


def test_derived_config_is_the_tiny_yaml_the_weights_came_from(pipelines):
    """The SAT model config read off the diffusers configs equals configs/tiny/<family>.yaml (1.0 and 1.5; RoPE,
    sincos, learned table, ofs), except the T5/VAE paths, which point into the pipeline."""
    from omegaconf import OmegaConf

    from sat_cogvideo.convert.diffusers_source import DiffusersSource
    from sat_cogvideo.hub import resolve

    for family in ("cogvideox_5b", "cogvideox1.5_5b_i2v"):
        pipe, sat = pipelines(family)
        mc = DiffusersSource(resolve(pipe)).model_config()
        assert mc.pop("_source").startswith("derived from the diffusers configs")
        want = OmegaConf.to_container(model_config(family), resolve=True)
        emb = mc["conditioner_config"]["params"]["emb_models"][0]["params"]
        assert (emb.pop("model_dir"), emb.pop("tokenizer_dir")) == (f"{pipe}/text_encoder", f"{pipe}/tokenizer")
        want["conditioner_config"]["params"]["emb_models"][0]["params"].pop("model_dir")
        assert mc["first_stage_config"]["params"].pop("ckpt_path") is None
        want["first_stage_config"]["params"].pop("ckpt_path")
        for cfg in (mc, want):  # the released files checkpoint activations for training, the tiny ones do not
            cfg["network_config"]["params"]["transformer_args"].pop("checkpoint_activations")
        assert mc == want
        written = OmegaConf.load(os.path.join(sat, "model.yaml")).model  # the tool's YAML: same, pointed at sat/
        assert written.first_stage_config.params.ckpt_path == os.path.join(sat, "vae", "3d-vae.pt")
        written.network_config.params.transformer_args.pop("checkpoint_activations")
        assert OmegaConf.to_container(written.network_config) == want["network_config"]


# ------------------------------------------------------------------------------------------------ released sizes


def _header_only_pipeline(folder, family):
    """A pipeline folder of a released family whose weight files hold only headers (sparse files of full size:
    nothing is stored), with the configs the converter writes for it."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from omegaconf import OmegaConf

    from sat_cogvideo.convert.pipeline import model_index, scheduler_config, write_json, write_model_config
    from sat_cogvideo.convert.safetensors_io import DTYPE_NAMES, PlannedTensor, _header_bytes
    from sat_cogvideo.convert.transformer import diffusers_transformer_config
    from sat_cogvideo.convert.vae import diffusers_vae_config
    from sat_cogvideo.families import get_family

    fam = get_family(family)
    mc = OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, fam.config)).model)
    parts = {"transformer": ("CogVideoXTransformer3DModel", CogVideoXTransformer3DModel,
                             diffusers_transformer_config(mc["network_config"])),
             "vae": ("AutoencoderKLCogVideoX", AutoencoderKLCogVideoX,
                     diffusers_vae_config(mc["first_stage_config"], fam.scale_factor, fam.generation))}
    for part, (name, cls, cfg) in parts.items():
        os.makedirs(folder / part)
        write_model_config(str(folder / part), name, cfg)
        with torch.device("meta"):
            sd = cls(**cfg).state_dict()
        plan = [PlannedTensor(k, tuple(v.shape), torch.bfloat16) for k, v in sd.items()]
        head = _header_bytes(plan)
        with open(folder / part / "diffusion_pytorch_model.safetensors", "wb") as f:
            f.write(head)
            f.truncate(len(head) + sum(p.nbytes for p in plan))
    assert DTYPE_NAMES[torch.bfloat16] == "BF16"
    os.makedirs(folder / "text_encoder")
    os.makedirs(folder / "tokenizer")
    os.makedirs(folder / "scheduler")
    write_json(str(folder / "scheduler" / "scheduler_config.json"), scheduler_config(fam.shift_scale))
    write_json(str(folder / "model_index.json"), model_index(fam.i2v, dict.fromkeys(parts, True)))
    return fam


@pytest.mark.parametrize("family", [
    "cogvideox1.5-5b",
    pytest.param("cogvideox-2b", marks=pytest.mark.slow(reason="one released size in the default run")),
    pytest.param("cogvideox-5b", marks=pytest.mark.slow(reason="one released size in the default run")),
    pytest.param("cogvideox-5b-i2v", marks=pytest.mark.slow(reason="one released size in the default run")),
    pytest.param("cogvideox1.5-5b-i2v", marks=pytest.mark.slow(reason="one released size in the default run"))])
def test_released_sizes_get_their_family_config(tmp_path, family):
    from omegaconf import OmegaConf

    from sat_cogvideo.convert.diffusers_source import DiffusersSource
    from sat_cogvideo.hub import PipelineFolder

    fam = _header_only_pipeline(tmp_path, family)
    source = DiffusersSource(PipelineFolder(str(tmp_path), "CogVideoXPipeline"))
    assert source.detected.family is fam
    mc = source.model_config()
    assert mc.pop("_source") == fam.name
    ref = OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, fam.config)).model)
    assert mc["network_config"] == ref["network_config"] and mc["scale_factor"] == ref["scale_factor"]
    args = source.default_args(mc)
    assert (args["sampling_fps"], args["dtype"], args["image2video"]) == (fam.fps, fam.dtype, fam.i2v)
    assert args["sampling_num_frames"] == fam.latent_frames(fam.num_frames)
    source.preflight(OmegaConf.create(mc))  # headers fit the family's config
    from sat_cogvideo.errors import UserError

    mc["network_config"]["params"]["num_attention_heads"] = 24  # a --base of another head count
    heads = fam.num_attention_heads
    with pytest.raises(UserError, match=f"config.json has num_attention_heads {heads}, the model config gives 24"):
        source.preflight(OmegaConf.create(mc))


def test_base_that_does_not_fit_the_pipeline_is_one_line(pipelines, tmp_path, capsys):
    """--base wins over the pipeline's own config; a config of another model fails before any weight loads."""
    from sat_cogvideo import sample_video

    pipe, _ = pipelines("cogvideox_5b")
    with pytest.raises(SystemExit) as exc:
        sample_video.main(["--base", os.path.join(ROOT, "configs", "tiny", "cogvideox1.5_5b.yaml"), "--load", pipe,
                           "--prompt", "x", "--output-path", str(tmp_path / "o.mp4"), "--device", "cpu",
                           "--num-frames", "9", "--sampling-image-size", "64,96"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: transformer of diffusers pipeline") and "code generation 1.0" in err[0]


# ------------------------------------------------------------------------------------------------ the Hub cache


def _hub_cache(home, repo_id, source, files=None, revision="0123456789abcdef0123456789abcdef01234567"):
    """``$HF_HOME/hub/models--org--name`` as huggingface_hub writes it: blobs, snapshots/<rev>/ of symlinks to
    them, refs/main naming <rev>.  ``files``: the relative names to include (default all)."""
    repo = os.path.join(home, "hub", "models--" + repo_id.replace("/", "--"))
    snap = os.path.join(repo, "snapshots", revision)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(revision)
    for dirpath, _, names in os.walk(source):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), source)
            if files is not None and rel not in files:
                continue
            import hashlib

            data = open(os.path.join(dirpath, name), "rb").read()
            blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
            shutil.copyfile(os.path.join(dirpath, name), blob)
            os.makedirs(os.path.dirname(os.path.join(snap, rel)), exist_ok=True)
            os.symlink(os.path.relpath(blob, os.path.dirname(os.path.join(snap, rel))), os.path.join(snap, rel))
    return snap


def _hub_cli(home, *argv):
    env = clean_env(HF_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([PY, "-m", "sat_cogvideo.hub", *argv], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_offline_hub_cache_resolves_an_id_and_an_empty_cache_is_one_line(pipelines, tmp_path):
    pipe, _ = pipelines("cogvideox_5b")
    snap = _hub_cache(tmp_path / "home", "tiny-org/CogVideoX-tiny", pipe)
    ok = _hub_cli(tmp_path / "home", "tiny-org/CogVideoX-tiny")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.strip() == snap
    empty = _hub_cli(tmp_path / "empty", "tiny-org/CogVideoX-tiny")
    lines = empty.stderr.strip().splitlines()
    assert empty.returncode == 2 and len(lines) == 1, empty.stderr
    assert lines[0].startswith("error: model tiny-org/CogVideoX-tiny is not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE=1" in lines[0] and "HF_ENDPOINT" in lines[0] and "model_index.json" in lines[0]


def test_partial_cache_and_foreign_repository_are_one_line(pipelines, tmp_path, monkeypatch):
    """In-process, with huggingface_hub's cache and offline switch pointed at a test cache."""
    from huggingface_hub import constants

    from sat_cogvideo import hub
    from sat_cogvideo.errors import UserError

    pipe, _ = pipelines("cogvideox_5b")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    keep = {"model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"}
    _hub_cache(tmp_path, "org/partial", pipe, files=keep)
    with pytest.raises(UserError, match=r"lacks vae/config.json, vae/diffusion_pytorch_model.safetensors, "
                                        r"text_encoder/config.json, text_encoder/model.safetensors and 1 more and "
                                        r"HF_HUB_OFFLINE=1 forbids"):
        hub.resolve("org/partial")
    other = tmp_path / "sd"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    _hub_cache(tmp_path, "org/sd", str(other))
    with pytest.raises(UserError, match="--load org/sd is a StableDiffusionPipeline pipeline, not a CogVideoX one"):
        hub.resolve("org/sd")
    snap = _hub_cache(tmp_path, "org/full", pipe)
    assert hub.resolve("org/full").root == snap


def test_cluster_revision_pins_a_hub_id(pipelines, tmp_path):
    """REVISION (slurm_inference.sh) reaches the Hub lookup of MODEL_PATH: the cached commit resolves offline,
    another commit is one line naming it, and REVISION with a SAT folder is refused."""
    pipe, sat = pipelines("cogvideox_5b")
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = _hub_cache(tmp_path / "home", "tiny-org/CogVideoX-tiny", pipe, revision=rev)
    env = clean_env(HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, PROMPT="a cat",
                    MODEL_PATH="tiny-org/CogVideoX-tiny", JOB_YAML=str(tmp_path / "job.yaml"))
    env.pop("HF_HUB_CACHE", None)

    def check(**extra):
        return subprocess.run([PY, "-m", "sat_cogvideo.launch", "--check"], env={**env, **extra}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    ok = check(REVISION=rev)
    assert ok.returncode == 0 and snap in ok.stdout, ok.stderr[-2000:]  # the pinned snapshot is loaded
    other = check(REVISION="f" * 40)
    lines = other.stderr.strip().splitlines()
    assert other.returncode == 2 and len(lines) == 1 and "f" * 40 in lines[0], other.stderr[-2000:]
    from sat_cogvideo import launch
    from sat_cogvideo.errors import UserError

    with pytest.raises(UserError, match=f"REVISION {rev} applies to Hugging Face ids, but MODEL_PATH .* is a SAT"):
        launch.find_model_folder(sat, revision=rev)


def test_cluster_model_path_takes_a_pipeline_folder(pipelines, tmp_path):
    """MODEL_PATH = a diffusers folder: the family is detected from its transformer's header and the job's
    sample_video arguments load the pipeline."""
    from sat_cogvideo import launch

    pipe, _ = pipelines("cogvideox_5b")
    job = launch.resolve({"MODEL_PATH": pipe, "PROMPT": "a cat", "JOB_YAML": str(tmp_path / "job.yaml")})
    assert job.profile.name == "tiny cogvideox-5b" and job.num_frames == 9
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(tmp_path / "job.yaml")
    assert cfg.args.load == pipe


def test_streaming_load_fills_fused_tensors_across_shards(pipelines, tmp_path, dist_cpu):
    """Shards cut inside a layer (q, k, v and the two AdaLN halves in different files) still fill each fused SAT
    tensor completely; a file with a tensor the model has no place for is refused."""
    from diffusers import CogVideoXTransformer3DModel

    from sat_cogvideo.convert.diffusers_source import DiffusersSource, stream_load
    from sat_cogvideo.convert.safetensors_io import open_weights_folder, weight_files
    from sat_cogvideo.convert.transformer import diffusers_key_placement, diffusers_to_sat_transformer
    from sat_cogvideo.errors import UserError
    from sat_cogvideo.hub import resolve
    from sgm.util import instantiate_from_config

    pipe, _ = pipelines("cogvideox_5b")
    out = tmp_path / "sharded"
    CogVideoXTransformer3DModel.from_pretrained(pipe, subfolder="transformer").save_pretrained(
        str(out), max_shard_size="20KB")
    index = json.load(open(out / "diffusion_pytorch_model.safetensors.index.json"))["weight_map"]
    qkv = {index[f"transformer_blocks.1.attn1.to_{x}.weight"] for x in "qkv"}
    assert len(set(index.values())) > 5 and len(qkv) > 1
    net = DiffusersSource(resolve(pipe)).model_config()["network_config"]
    dit = instantiate_from_config(net)
    stream_load(dit, weight_files(str(out), "diffusion_pytorch_model"), diffusers_key_placement,
                known_unused=dit.known_unused_keys())
    want = diffusers_to_sat_transformer(open_weights_folder(str(out), "diffusion_pytorch_model"))
    got = dit.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items())
    assert set(got) - set(want) <= dit.known_unused_keys()
    from safetensors.torch import save_file

    save_file({"extra.weight": torch.zeros(2)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(UserError, match=r"does not fit the model: 1 tensors the model has no place for "
                                        r"\(e.g. extra.weight\)"):
        stream_load(dit, weight_files(str(out), "diffusion_pytorch_model") + [str(tmp_path / "extra.safetensors")],
                    diffusers_key_placement, known_unused=dit.known_unused_keys(), source="test")
    with pytest.raises(UserError, match=r"model tensors not in the files"):
        stream_load(dit, [weight_files(str(out), "diffusion_pytorch_model")[0]], diffusers_key_placement,
                    known_unused=dit.known_unused_keys(), source="test")


# ------------------------------------------------------------------------------------------------ memory


_CHILD = r"""
import json, sys, time
import torch
from sat_cogvideo.convert.diffusers_source import DiffusersSource, stream_load
from sat_cogvideo.convert.safetensors_io import weight_files
from sat_cogvideo.convert.transformer import diffusers_key_placement, sat_to_diffusers_transformer
from sat_cogvideo.distributed import init_distributed
from sat_cogvideo.hub import PipelineFolder
from sgm.util import instantiate_from_config
def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
init_distributed(device="cpu")
source = DiffusersSource(PipelineFolder(sys.argv[1], "CogVideoXPipeline"))
net = source.model_config()["network_config"]
base = status_mb("VmRSS")
t = time.time()
dit = instantiate_from_config(net)
stream_load(dit, weight_files(sys.argv[1] + "/transformer", "diffusion_pytorch_model"), diffusers_key_placement,
            known_unused=dit.known_unused_keys())
peak, seconds = status_mb("VmHWM"), time.time() - t
from safetensors.torch import load_file
ref = load_file(sys.argv[1] + "/transformer/diffusion_pytorch_model.safetensors")
back = sat_to_diffusers_transformer(dit.state_dict(), learned_positional_embeddings=False)
same = back.keys() == ref.keys() and all(torch.equal(back[k], ref[k]) for k in ref)
print(json.dumps({"base_mb": base, "peak_mb": peak, "seconds": seconds, "same": same}))
"""


@pytest.mark.slow(reason="builds and saves a 300 MB transformer, then loads it in a subprocess (~40 s on 2 cores)")
def test_peak_rss_of_loading_a_diffusers_transformer(tmp_path, pipelines):
    from diffusers import CogVideoXTransformer3DModel

    pipe, _ = pipelines("cogvideox_5b")
    folder = tmp_path / "big"
    shutil.copytree(pipe, folder, ignore=shutil.ignore_patterns("transformer"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CogVideoXTransformer3DModel(num_attention_heads=16, attention_head_dim=64, num_layers=4,
                                            use_rotary_positional_embeddings=True, text_embed_dim=1024)
    model.save_pretrained(str(folder / "transformer"))
    del model
    size_mb = os.path.getsize(folder / "transformer" / "diffusion_pytorch_model.safetensors") / 2 ** 20
    assert 200 < size_mb < 600, size_mb
    env = clean_env(PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(folder)], capture_output=True, text=True, timeout=600,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = stats["peak_mb"] - stats["base_mb"]
    print(f"transformer {size_mb:.0f} MB, peak RSS {stats['peak_mb']:.0f} MB, before the model "
          f"{stats['base_mb']:.0f} MB, growth {growth:.0f} MB = {growth / size_mb:.2f}x, {stats['seconds']:.1f} s")
    assert stats["same"]  # every tensor arrived in its place, bit for bit
    assert growth <= 1.3 * size_mb, stats


# ------------------------------------------------------------------------------------------------ finetuning


@pytest.mark.slow(reason="two tiny LoRA finetuning runs (~1 min each on 2 cores)")
def test_finetune_load_takes_a_pipeline_folder(demo_paths, tmp_path):
    """One LoRA iteration from a diffusers pipeline folder ends in the same engine state, bit for bit, as from the
    SAT folder it was converted from (T5 and VAE taken from the pipeline, DiT and VAE streamed in); so does a run
    on a latent cache filled from the pipeline (its VAE encodes: the config names no 3d-vae.pt)."""
    from helpers import run_train
    from sat_cogvideo.convert.pipeline import convert_sat_to_diffusers
    from sat_cogvideo.demo import build_demo_dataset

    build_demo_dataset(demo_paths["folder"])
    tiny = os.path.join(ROOT, "configs", "tiny")
    pipe = str(tmp_path / "pipe")
    convert_sat_to_diffusers(pipe, transformer_ckpt_path=demo_paths["cogvideox_5b"], vae_ckpt_path=demo_paths["vae"],
                             config=os.path.join(tiny, "cogvideox_5b.yaml"), text_encoder_path=demo_paths["t5"],
                             log=lambda m: None)
    states = []
    cached = ["--cache-latents", str(tmp_path / "cache")]
    for name, load, extra in (("sat", demo_paths["cogvideox_5b"], []), ("hf", pipe, []), ("cached", pipe, cached)):
        save, dump = tmp_path / name / "ckpts", tmp_path / name / "final.pt"
        save.parent.mkdir()
        out = run_train(demo_paths["folder"], ["--base", os.path.join(tiny, "cogvideox_5b_lora.yaml"),
                                               os.path.join(tiny, "sft.yaml"), "--load", load, "--save", save,
                                               "--train-iters", "1", "--save-interval", "1", "--seed", "4", "--lr",
                                               "0.05", *extra], SAT_COGVIDEO_FINAL_STATE=dump)
        states.append(torch.load(dump))
    assert "0 of 2 videos found, 4 entries written by rank 0" in out.stdout + out.stderr
    a, b, c = states
    lora = [k for k in a if ".matrix_" in k]
    assert lora and [k for k in lora if not torch.equal(a[k], c[k])] == []  # cached latents of the pipeline's VAE
    assert a.keys() == b.keys() and any(".matrix_A." in k for k in a)
    differ = sorted(k for k in a if not torch.equal(a[k], b[k]))
    # SAT's unused absolute position table: the demo's SAT file stores random values for it, a diffusers pipeline
    # has no such tensor (the model keeps its initial values); nothing reads it
    assert differ in ([], ["model.diffusion_model.transformer.position_embeddings.weight"]), differ[:5]
