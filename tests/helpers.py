"""Helpers shared by the tests (fixtures defined here are registered for every module by conftest.py)."""
from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
DEMO_FAMILIES = ("cogvideox_2b", "cogvideox_5b", "cogvideox_5b_i2v", "cogvideox1.5_5b", "cogvideox1.5_5b_i2v")
# launcher / SLURM / torch.distributed variables of the test process must not leak into child processes
LEAK = ("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "OMPI_", "PROMPT", "MODEL_PATH",
        "OUTPUT_", "NUM_", "DTYPE", "FPS", "FAMILY", "GENERATE_TYPE", "IMAGE_OR_VIDEO_PATH", "LAUNCHER", "NPROC")


# ------------------------------------------------------------------------------------------------ numbers


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Every parameter and floating buffer random and non-zero (``scale * N(0, 1)`` moved 1% away from zero),
    deterministic for ``seed``: the demo's :func:`sat_cogvideo.demo.randomize_` with buffers, no unit norms."""
    from sat_cogvideo.demo import randomize_ as randomize

    return randomize(module, seed, scale, buffers=True, unit_norms=False, away_from_zero=True)


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest reference magnitude."""
    ours, ref = ours.detach().double(), ref.detach().double()
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------ the tiny demo model


@pytest.fixture(scope="session")
def demo_paths(dist_cpu):
    """The tiny random-weight models of the demo (T5 folder, 3d-vae.pt, SAT transformer folders of all five
    families), built once per session in the session's cache (``$SAT_COGVIDEO_DEMO``, set by conftest.py)."""
    from sat_cogvideo import demo

    return demo.build_demo(os.environ["SAT_COGVIDEO_DEMO"], models=demo.DEMO_MODELS)


def model_config(name: str):
    from omegaconf import OmegaConf

    from sat_cogvideo.demo import tiny_config_path

    cfg = OmegaConf.load(tiny_config_path(name)).model
    OmegaConf.resolve(cfg)
    return cfg


def make_engine(name: str, paths, dtype: str = "fp32", load: bool = True, num_steps: int | None = None,
                sampler: str | None = None, **overrides):
    from omegaconf import open_dict

    from sat_cogvideo.diffusion_video import SATVideoDiffusionEngine
    from sat_cogvideo.sample_video import SAMPLERS, load_transformer_checkpoint

    cfg = model_config(name)
    with open_dict(cfg):
        if num_steps is not None:
            cfg.sampler_config.params.num_steps = num_steps
            cfg.sampler_config.params.guider_config.params.num_steps = num_steps
        if sampler is not None:
            cfg.sampler_config.target = SAMPLERS[sampler]
        cfg.sampler_config.params.verbose = False
        for k, v in overrides.items():
            cfg[k] = v
    args = SimpleNamespace(model_config=cfg, fp16=dtype == "fp16", bf16=dtype == "bf16", device="cpu")
    engine = SATVideoDiffusionEngine(args)
    if load:
        load_transformer_checkpoint(engine, paths[name])
    return engine.eval()


def text_cond(engine, text="a cat"):
    from sat_cogvideo.sample_video import conditionings

    return conditionings(engine, text, torch.device("cpu"))


def sample_argv(paths, name="cogvideox_5b", steps=2):
    """``sample_video`` arguments for the tiny ``name`` without --prompt/--output-path (each test adds its own)."""
    from sat_cogvideo.demo import demo_argv

    argv = demo_argv(paths, name, "unused.mp4", steps=steps)
    out, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
            continue
        if a in ("--prompt", "--output-path"):
            skip = 1
            continue
        out.append(a)
    return out


def write_image(path, height, width, seed=0) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(str(path))
    return str(path)


# ------------------------------------------------------------------------------------------------ diffusers pipelines


def diffusers_pipeline(engine, kind: str):
    """The diffusers pipeline (t2v / i2v / v2v) holding ``engine``'s weights, converted by our key maps."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXImageToVideoPipeline,
                           CogVideoXPipeline, CogVideoXTransformer3DModel, CogVideoXVideoToVideoPipeline)

    from sat_cogvideo.convert.transformer import diffusers_transformer_config, sat_to_diffusers_transformer
    from sat_cogvideo.convert.vae import convert_vae_sat_to_diffusers, diffusers_vae_config

    mc = engine.model_config
    net = mc.network_config.params
    cfg = diffusers_transformer_config(mc.network_config, sample_size=(int(net.latent_height), int(net.latent_width)))
    transformer = CogVideoXTransformer3DModel(**cfg).eval()
    sd = sat_to_diffusers_transformer(engine.state_dict(),
                                      learned_positional_embeddings=cfg["use_learned_positional_embeddings"])
    transformer.load_state_dict(sd, strict=True)
    transformer.norm_out.norm.eps = 1e-6  # SAT's final-norm eps
    vae = AutoencoderKLCogVideoX(**diffusers_vae_config(mc.first_stage_config, scaling_factor=engine.scale_factor,
                                                        version=engine.generation)).eval()
    vae_sd = {k[len("first_stage_model."):]: v for k, v in engine.state_dict().items()
              if k.startswith("first_stage_model.")}
    vae.load_state_dict(convert_vae_sat_to_diffusers(vae_sd), strict=True)
    shift = float(mc.denoiser_config.params.discretization_config.get("params", {}).get("shift_scale", 1.0))
    scheduler = CogVideoXDPMScheduler(snr_shift_scale=shift, beta_start=0.00085, beta_end=0.012,
                                      beta_schedule="scaled_linear", prediction_type="v_prediction",
                                      rescale_betas_zero_snr=True, set_alpha_to_one=True,
                                      timestep_spacing="trailing", clip_sample=False)
    emb = engine.conditioner.embedders[0]
    cls = {"t2v": CogVideoXPipeline, "i2v": CogVideoXImageToVideoPipeline, "v2v": CogVideoXVideoToVideoPipeline}[kind]
    pipe = cls(tokenizer=emb.tokenizer, text_encoder=emb.transformer, vae=vae, transformer=transformer,
               scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def use_diffusers_schedule(engine, scheduler):
    """Give our denoiser table and sampling schedule diffusers' ᾱ table (same timesteps 999, 899, …, 99)."""
    table = scheduler.alphas_cumprod.to(torch.float64).sqrt().to(torch.float32)
    engine.denoiser.sigmas = table.clone()
    original = engine.sampler.discretization

    class DiffusersTable:
        def __call__(self, n, do_append_zero=True, device="cpu", flip=False, return_idx=False):
            _, ts = original(n, device=device, return_idx=True, do_append_zero=False)
            idx = torch.as_tensor(np.array(ts, dtype=np.int64))
            s = table[idx].flip(0).to(device)
            return (s, ts) if return_idx else s

    engine.sampler.discretization = DiffusersTable()


def run_diffusers(pipe, kind, c, uc, size, seed, steps, image=None, video=None, strength=0.8, dynamic=True):
    """Latents ``[1, T, C, h, w]`` (scaled) and the decoded video ``[F, 3, H, W]`` of a diffusers pipeline run
    with our prompt embeddings (``c``, and SAT's all-zero ``uc`` as the negative prompt)."""
    num_frames, H, W = size
    kwargs = dict(prompt_embeds=c["crossattn"], negative_prompt_embeds=uc["crossattn"], height=H, width=W,
                  num_inference_steps=steps, guidance_scale=6.0, use_dynamic_cfg=dynamic, output_type="latent",
                  return_dict=False)
    if kind == "v2v":
        kwargs.update(video=video, strength=strength)
    else:
        kwargs.update(num_frames=num_frames)
    if kind == "i2v":
        kwargs.update(image=image)
    torch.manual_seed(seed)
    latents = pipe(**kwargs)[0]
    # decode the way the pipelines do for output_type="pt" (1.5: the padding latent frame dropped)
    t_latent = (num_frames - 1) // 4 + 1
    extra = latents.shape[1] - t_latent
    frames = pipe.decode_latents(latents[:, extra:])
    video_out = pipe.video_processor.postprocess_video(frames, output_type="pt")
    return latents, video_out[0]


# ------------------------------------------------------------------------------------------------ tiny DiTs


def network_config(family: str, tiny: bool = True):
    """``model.network_config`` of a family's YAML (tiny or full size)."""
    from omegaconf import OmegaConf

    path = os.path.join(ROOT, "configs", "tiny" if tiny else "", f"{family}.yaml")
    return OmegaConf.load(path).model.network_config


def build(family: str, tiny: bool = True, **overrides):
    from omegaconf import OmegaConf

    from sgm.util import instantiate_from_config

    cfg = network_config(family, tiny)
    for key, value in overrides.items():
        OmegaConf.update(cfg, f"params.{key}", value, merge=False)
    return instantiate_from_config(cfg), cfg


def reset_fixed_tables(model):
    """Recompute the tables that are not weights (sincos / RoPE) after ``randomize_``."""
    pos = model.mixins["pos_embed"]
    if hasattr(pos, "reset_tables"):
        pos.reset_tables()
    else:
        pos.reset_table()


def random_model(family: str, seed: int = 0, **overrides):
    model, cfg = build(family, **overrides)
    randomize_(model, seed)
    reset_fixed_tables(model)
    return model.eval(), cfg


def inputs(model, cfg, batch=2, seed=1, scale=1.0):
    """Latents, timesteps, context (and ofs) of the shapes the model's config implies."""
    p = cfg.params
    pos = p.modules.pos_embed_config.params
    gen = torch.Generator().manual_seed(seed)
    if model.is_v15:
        t, h, w = 2 * min(2, model.compressed_num_frames // 2), min(p.latent_height, 8), min(p.latent_width, 12)
    else:
        t, h, w = model.compressed_num_frames, p.latent_height, p.latent_width
    x = torch.randn(batch, t, p.in_channels, h, w, generator=gen) * scale
    ctx = torch.randn(batch, pos.text_length, p.modules.patch_embed_config.params.text_hidden_size,
                      generator=gen) * scale
    ts = torch.tensor([999.0, 417.0][:batch])
    extra = {"ofs": torch.tensor([2.0])} if p.get("ofs_embed_dim") else {}
    return x, ts, ctx, extra


def diffusers_model(cfg, sat_state_dict, final_eps=1e-6):
    from diffusers import CogVideoXTransformer3DModel

    from sat_cogvideo.convert.transformer import diffusers_transformer_config, sat_to_diffusers_transformer

    p = cfg.params
    conf = diffusers_transformer_config(cfg, sample_size=(p.latent_height, p.latent_width))
    hf = CogVideoXTransformer3DModel(**conf).eval()
    # By construction diffusers uses norm_eps (1e-5) in the final adaLN LayerNorm, SAT 1e-6 (spec transformer.md
    # §15).  SAT's value is what we ship; the test sets diffusers to it to compare everything else.
    hf.norm_out.norm.eps = final_eps
    converted = sat_to_diffusers_transformer(
        sat_state_dict, learned_positional_embeddings=conf["use_learned_positional_embeddings"])
    hf.load_state_dict(converted, strict=True)
    return hf, conf


def diffusers_rope(conf, x):
    """The RoPE tables diffusers' pipelines compute for latents ``x`` (1.0 crop grid / 1.5 slice grid)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    if not conf["use_rotary_positional_embeddings"]:
        return None
    p, pt = conf["patch_size"], conf["patch_size_t"]
    _, t, _, h, w = x.shape
    gh, gw = h // p, w // p
    base_h, base_w = conf["sample_height"] // p, conf["sample_width"] // p
    if pt is None:
        crops = get_resize_crop_region_for_grid((gh, gw), base_w, base_h)
        return get_3d_rotary_pos_embed(conf["attention_head_dim"], crops, (gh, gw), t)
    return get_3d_rotary_pos_embed(conf["attention_head_dim"], None, (gh, gw), t // pt, grid_type="slice",
                                   max_size=(base_h, base_w))


def run_both(model, hf, conf, x, ts, ctx, extra):
    with torch.no_grad():
        ours = model(x, ts, ctx, **extra)
        ref = hf(x, ctx, ts, ofs=extra.get("ofs"), image_rotary_emb=diffusers_rope(conf, x), return_dict=False)[0]
    return ours, ref


# ------------------------------------------------------------------------------------------------ subprocesses


def clean_env(**kw):
    """``os.environ`` without launcher / SLURM / torch.distributed variables, plus ``kw``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LEAK)}
    env.update({k: str(v) for k, v in kw.items()})
    return env


def read_frames(path):
    import imageio.v3 as iio

    return np.stack(list(iio.imiter(str(path), plugin="FFMPEG")))


# Waits of the tests that start processes: a hang shows within minutes (CI has 90 minutes for everything).
TRAIN_TIMEOUT = 300        # one tiny finetuning run (1-2 processes) on 2 cores: 20-60 s
SLURM_JOB_TIMEOUT = 300    # one sbatch --wait of the tiny model
SLURM_STATE_TIMEOUT = 180  # a job to reach a terminal state


def train_env(demo, threads=1, **extra):
    env = clean_env(SAT_COGVIDEO_DEMO=demo, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_train(demo, argv, nproc=1, script=None, **env):
    """Run the finetune CLI (``python -m sat_cogvideo.train_video``, ``torchrun`` for ``nproc`` > 1, or the Python
    file ``script`` in its place) in the folder above ``--save`` (SAT writes TensorBoard logs to ./runs); returns
    the completed process (asserts success).  With ``SAT_COGVIDEO_FINAL_STATE=FILE`` the CLI runs through
    ``tests/train_final_state.py``, which writes the final engine state there."""
    cwd = os.path.dirname(os.path.abspath(argv[argv.index("--save") + 1]))
    if script is None and env.get("SAT_COGVIDEO_FINAL_STATE"):
        script = os.path.join(ROOT, "tests", "train_final_state.py")
    target = [str(script)] if script else ["-m", "sat_cogvideo.train_video"]
    if nproc > 1:
        cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *target]
    else:
        cmd = [PY, *target]
    out = subprocess.run(cmd + [str(a) for a in argv], env=train_env(demo, threads=1 if nproc > 1 else 2, **env),
                         cwd=cwd, capture_output=True, text=True, timeout=TRAIN_TIMEOUT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def run_folder(save):
    import glob

    runs = [d for d in glob.glob(os.path.join(str(save), "*")) if os.path.isdir(d)]
    assert len(runs) == 1, runs
    return runs[0]


# ------------------------------------------------------------------------------------------------ SLURM


SLURM_LOCK = os.environ.get("SAT_COGVIDEO_SLURM_LOCK", "/tmp/sat-cogvideo-slurm-local.lock")


@contextlib.contextmanager
def slurm_cluster_lock(timeout: float = 1800.0, path: str = SLURM_LOCK, poll: float = 1.0):
    """Serialise the test runs that start the one-node SLURM of ``scripts/slurm_local.sh``: they share the
    machine's one munge daemon (the first run's ``down`` would stop it under the second) and slurmd's node name.
    Waits up to ``timeout`` seconds for a concurrent run to finish, then raises TimeoutError."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"another test run holds {path} (a local SLURM cluster is in use) for more "
                                       f"than {timeout:.0f} s") from None
                time.sleep(poll)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield path
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------ finetune.sh


@pytest.fixture(scope="session")
def finetune_sh_run(tmp_path_factory, session_cache):
    """``bash finetune.sh --base configs/tiny/cogvideox_2b_lora.yaml configs/tiny/sft.yaml --device cpu`` (4 LoRA
    iterations of the tiny random-weight CogVideoX-2B on CPU, on the 2-video demo dataset), run once per session in a
    folder of its own; its output and run folder (``outputs/tiny_ckpts/tiny-lora-*``)."""
    import glob

    from sat_cogvideo.demo import prepare_demo

    cwd = tmp_path_factory.mktemp("finetune_sh")
    demo = os.environ["SAT_COGVIDEO_DEMO"]
    prepare_demo(demo)
    env = clean_env(SAT_COGVIDEO_DEMO=demo, OMP_NUM_THREADS=2)
    tiny = os.path.join(ROOT, "configs", "tiny")
    argv = ["--base", os.path.join(tiny, "cogvideox_2b_lora.yaml"), os.path.join(tiny, "sft.yaml"), "--device", "cpu"]
    out = subprocess.run(["bash", os.path.join(ROOT, "finetune.sh"), *argv], cwd=str(cwd), env=env,
                         capture_output=True, text=True, timeout=TRAIN_TIMEOUT)
    runs = glob.glob(str(cwd / "outputs" / "tiny_ckpts" / "tiny-lora-*"))
    return SimpleNamespace(proc=out, cwd=cwd, demo=demo, runs=runs)


@pytest.fixture(scope="session")
def tiny_sat_folder(tmp_path_factory, session_cache):
    """A SAT model folder (transformer/, vae/3d-vae.pt, t5/) holding the tiny random-weight demo CogVideoX-5B."""
    from sat_cogvideo.demo import build_demo

    paths = build_demo(os.environ["SAT_COGVIDEO_DEMO"], models=("cogvideox_5b",))
    folder = tmp_path_factory.mktemp("tiny") / "CogVideoX-tiny-SAT"
    folder.mkdir()
    os.symlink(paths["cogvideox_5b"], folder / "transformer")
    os.symlink(os.path.dirname(paths["vae"]), folder / "vae")
    os.symlink(paths["t5"], folder / "t5")
    return str(folder)


# ------------------------------------------------------------------------------------------------ tiny parts


def tiny_vae_config(cp_size=1, ckpt_path=None, gather_norm_decoder=False, ch=32, ch_mult=(1, 1, 1, 2),
                    num_res_blocks=1):
    """first_stage_config of the CogVideoX YAML files, with tiny sizes (GroupNorm needs 32-channel multiples)."""
    params = dict(double_z=True, z_channels=16, resolution=256, in_channels=3, out_ch=3, ch=ch,
                  ch_mult=list(ch_mult), attn_resolutions=[], num_res_blocks=num_res_blocks, dropout=0.0)
    return {
        "target": "vae_modules.autoencoder.VideoAutoencoderInferenceWrapper",
        "params": {
            "cp_size": cp_size,
            "ckpt_path": ckpt_path,
            "ignore_keys": ["loss"],
            "loss_config": {"target": "torch.nn.Identity"},
            "regularizer_config": {"target": "vae_modules.regularizers.DiagonalGaussianRegularizer"},
            "encoder_config": {"target": "vae_modules.cp_enc_dec.ContextParallelEncoder3D",
                               "params": dict(params, gather_norm=True)},
            "decoder_config": {"target": "vae_modules.cp_enc_dec.ContextParallelDecoder3D",
                               "params": dict(params, gather_norm=gather_norm_decoder)},
        },
    }


def build_tiny_vae(seed=0, **kwargs):
    from sgm.util import instantiate_from_config

    vae = instantiate_from_config(tiny_vae_config(**kwargs)).eval()
    return randomize_(vae, seed)


def diffusers_scheduler(cls, shift):
    """The scheduler as the converter configures it (spec convert.md section 6)."""
    return cls.from_config(dict(
        snr_shift_scale=shift, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
        timestep_spacing="trailing"))


def table(shift):
    """The 1000-entry sqrt(alpha_bar) table of ZeroSNRDDPMDiscretization (index = DDPM timestep)."""
    from sgm.modules.diffusionmodules.discretizer import ZeroSNRDDPMDiscretization

    return ZeroSNRDDPMDiscretization(shift_scale=shift)(1000, do_append_zero=False, flip=True)


# the toy sampler problem: batch, frames, channels, height, width, context length and width
B, T, C, H, W, L, D = 1, 2, 4, 4, 4, 3, 8


class ToyDiT(nn.Module):
    """A fixed tiny nonlinear v-predictor with the DiT's call signature (x, timesteps, context, y, **kw)."""

    def __init__(self, in_channels=C, out_channels=C, seed=0):
        super().__init__()
        self.lin = nn.Linear(in_channels, out_channels)
        self.temb = nn.Linear(16, out_channels)
        self.ctx = nn.Linear(D, out_channels)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.seen = []

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        self.seen.append({"timesteps": timesteps.clone(), "kwargs": sorted(kwargs)})
        h = x.movedim(2, -1)  # [B, T, H, W, C]
        from sgm.modules.diffusionmodules.util import timestep_embedding

        cond = self.temb(timestep_embedding(timesteps, 16, dtype=x.dtype)) + self.ctx(context.mean(1))
        return (torch.tanh(self.lin(h) + cond[:, None, None, None]) + 0.1 * h[..., :self.lin.out_features]
                ).movedim(-1, 2)


# ------------------------------------------------------------------------------------------------ SAT folders

P = "model.diffusion_model."
# patch embedding and final layer shapes of the released checkpoints
SHAPES = {
    "cogvideox-2b": ([1920, 16, 2, 2], [64, 1920]),
    "cogvideox-5b": ([3072, 16, 2, 2], [64, 3072]),
    "cogvideox-5b-i2v": ([3072, 32, 2, 2], [64, 3072]),
    "cogvideox1.5-5b": ([3072, 128], [128, 3072]),
    "cogvideox1.5-5b-i2v": ([3072, 256], [128, 3072]),
}


def make_sat_folder(root, family: str, t5_name: str = "t5-v1_1-xxl", tag: str = "1000") -> str:
    """A SAT model folder whose checkpoint has ``family``'s shapes (only the tensors detection needs)."""
    proj, final = SHAPES[family]
    sd = {P + "mixins.patch_embed.proj.weight": torch.zeros(proj, dtype=torch.bfloat16),
          P + "mixins.final_layer.linear.weight": torch.zeros(final, dtype=torch.bfloat16),
          P + "transformer.layers.0.attention.dense.weight": torch.zeros(1, dtype=torch.bfloat16)}
    if family != "cogvideox-2b" and not family.startswith("cogvideox1.5"):
        sd[P + "transformer.position_embeddings.weight"] = torch.zeros(1, dtype=torch.bfloat16)
    if family == "cogvideox1.5-5b-i2v":
        sd[P + "ofs_embed.0.weight"] = torch.zeros(1, dtype=torch.bfloat16)
    root = str(root)
    os.makedirs(os.path.join(root, "transformer", tag))
    torch.save({"module": sd}, os.path.join(root, "transformer", tag, "mp_rank_00_model_states.pt"))
    with open(os.path.join(root, "transformer", "latest"), "w") as f:
        f.write(tag + "\n")
    os.makedirs(os.path.join(root, "vae"))
    open(os.path.join(root, "vae", "3d-vae.pt"), "wb").close()
    os.makedirs(os.path.join(root, t5_name))
    with open(os.path.join(root, t5_name, "config.json"), "w") as f:
        f.write("{}")
    return root


def make_image(path) -> str:
    from PIL import Image

    Image.new("RGB", (96, 64), (200, 30, 30)).save(path)
    return str(path)


# ------------------------------------------------------------------------------------------------ diffusers pipeline folders


def save_tiny_pipeline(folder, family: str = "cogvideox_5b", seed: int = 3, t5=None) -> str:
    """A diffusers pipeline folder written by diffusers itself (``CogVideoX[ImageToVideo]Pipeline.save_pretrained``):
    random transformer and VAE of the sizes of ``configs/tiny/<family>.yaml``, the tiny T5 (``t5``: its folder,
    default the session demo's) with ``model_max_length`` = the config's text length, the scheduler with the
    config's SNR shift."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXImageToVideoPipeline,
                           CogVideoXPipeline, CogVideoXTransformer3DModel)
    from omegaconf import OmegaConf
    from transformers import T5EncoderModel, T5Tokenizer

    from sat_cogvideo.convert.transformer import diffusers_transformer_config
    from sat_cogvideo.convert.vae import diffusers_vae_config
    from sat_cogvideo.demo import build_demo, randomize_ as randomize

    mc = OmegaConf.to_container(model_config(family), resolve=True)
    net = mc["network_config"]["params"]
    v15 = not isinstance(net["patch_size"], int)
    t5 = t5 or build_demo(models=(family,))["t5"]
    tok = T5Tokenizer.from_pretrained(t5)
    tok.model_max_length = int(net["modules"]["pos_embed_config"]["params"]["text_length"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tcfg = diffusers_transformer_config(mc["network_config"], sample_size=(net["latent_height"],
                                                                                net["latent_width"]))
        transformer = randomize(CogVideoXTransformer3DModel(**tcfg), seed, scale=0.05)
        vae = randomize(AutoencoderKLCogVideoX(**diffusers_vae_config(
            mc["first_stage_config"], scaling_factor=mc["scale_factor"], version="1.5" if v15 else "1.0")),
            seed + 1, scale=0.05)
    shift = mc["denoiser_config"]["params"]["discretization_config"].get("params", {}).get("shift_scale", 1.0)
    cls = CogVideoXImageToVideoPipeline if int(net["in_channels"]) == 2 * int(net["out_channels"]) else \
        CogVideoXPipeline
    pipe = cls(tokenizer=tok, text_encoder=T5EncoderModel.from_pretrained(t5), vae=vae, transformer=transformer,
               scheduler=diffusers_scheduler(CogVideoXDDIMScheduler, shift))
    pipe.save_pretrained(str(folder))
    return str(folder)
