"""The diffusion engine: ``SATVideoDiffusionEngine`` (original ``sat/diffusion_video.py``).

One ``nn.Module`` built from the ``model:`` section of the YAML config that holds the DiT (``model``,
wrapped by ``OpenAIWrapper``; state-dict prefix ``model.diffusion_model.``), the denoiser, the sampler
(a plain object), the text conditioner (``conditioner.embedders.0.transformer.`` for T5), the frozen VAE
(``first_stage_model.``) and the training loss.  Both code generations run through it: the 1.0 models
(2B, 5B, 5B-I2V; integer ``patch_size``) and the 1.5 models (list ``patch_size``; a padding latent frame
dropped before decoding, the ``ofs`` input of the I2V model).

Differences from the original: no hard-coded CUDA (devices follow ``args.device`` and the tensors), and the
1.5 decode keeps the causal first-frame path (21 latents -> 81 frames, as v1.0 and diffusers) instead of the
HEAD behaviour that upsamples every latent frame (CogVideo issue 614).  ``sample`` and ``sample_from`` accept
an optional ``generator`` for the initial noise; without it the CPU default generator is used as the original.
"""
from __future__ import annotations

import gc
import random
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from sat_cogvideo.families import DecodePlan, get_generation
from sgm.util import default, disabled_train, get_obj_from_str, instantiate_from_config

OPENAI_WRAPPER = "sgm.modules.diffusionmodules.wrappers.OpenAIWrapper"


def _cfg_get(cfg, key, fallback=None):
    if cfg is None:
        return fallback
    try:
        value = cfg.get(key, fallback)
    except AttributeError:
        value = getattr(cfg, key, fallback)
    return fallback if value is None else value


def code_generation(model_config) -> str:
    """"1.5" when the DiT patches time (list ``patch_size`` with a temporal patch > 1), else "1.0"."""
    params = _cfg_get(_cfg_get(model_config, "network_config"), "params", {})
    patch = _cfg_get(params, "patch_size", 2)
    if isinstance(patch, int):
        return "1.0"
    patch = list(patch)
    return "1.5" if len(patch) == 3 and int(patch[0]) > 1 else "1.0"


def engine_device(args) -> str:
    """``args.device`` as a device string; an unresolved one (missing, -1, auto) is resolved and written back,
    as SAT's ``get_model`` fills in a missing ``args.device`` before ``model.to(args.device)``."""
    from sat_cogvideo.distributed import resolve_device

    device = getattr(args, "device", None)
    if device is None or device == -1 or device in ("-1", "auto"):
        args.device = str(resolve_device(None, getattr(args, "local_rank", None) or 0))
        return args.device
    return str(resolve_device(device, getattr(args, "local_rank", None) or 0))


def ensure_distributed(args) -> None:
    """Start torch.distributed and SAT's model-parallel groups on ``args.device`` unless already started.

    The original's ``get_args`` started them (``initialize_distributed``) and SAT's model code needs them; here
    ``get_args`` is free of side effects, so an engine built right after it (code ported from the original)
    starts them itself, with the backend that suits the device, rather than SAT's fallback start.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return
    from sat_cogvideo.distributed import init_distributed

    init_distributed(device=args.device, backend=getattr(args, "distributed_backend", None),
                     model_parallel_size=int(getattr(args, "model_parallel_size", 1) or 1))


class SATVideoDiffusionEngine(nn.Module):
    """CogVideoX diffusion engine (original ``diffusion_video.SATVideoDiffusionEngine``).

    Constructed from ``args`` with ``args.model_config`` (the ``model:`` YAML section), ``args.fp16`` /
    ``args.bf16`` and ``args.device``.  Extra keyword arguments (SAT's ``params_dtype``) are ignored.
    As in the original, the engine is built on the CPU: move it with ``model.to(args.device)``, or build it
    with SAT's ``get_model(args, SATVideoDiffusionEngine)``, which casts it to the model dtype and moves it.
    """

    def __init__(self, args, **kwargs):
        super().__init__()
        self.device = engine_device(args)
        ensure_distributed(args)
        model_config = args.model_config
        self.model_config = model_config
        self.log_keys = _cfg_get(model_config, "log_keys", None)
        self.input_key = _cfg_get(model_config, "input_key", "mp4")
        self.not_trainable_prefixes = list(_cfg_get(model_config, "not_trainable_prefixes",
                                                    ["first_stage_model", "conditioner"]))
        self.en_and_decode_n_samples_a_time = _cfg_get(model_config, "en_and_decode_n_samples_a_time", None)
        self.lr_scale = _cfg_get(model_config, "lr_scale", None)
        self.lora_train = bool(_cfg_get(model_config, "lora_train", False))
        self.use_pd = bool(_cfg_get(model_config, "use_pd", False))
        self.noised_image_input = bool(_cfg_get(model_config, "noised_image_input", False))
        self.noised_image_all_concat = bool(_cfg_get(model_config, "noised_image_all_concat", False))
        self.noised_image_dropout = float(_cfg_get(model_config, "noised_image_dropout", 0.0))
        self.gen = get_generation(code_generation(model_config))  # what the 1.0 and 1.5 code do differently

        if getattr(args, "fp16", False):
            dtype, dtype_str = torch.float16, "fp16"
        elif getattr(args, "bf16", False):
            dtype, dtype_str = torch.bfloat16, "bf16"
        else:
            dtype, dtype_str = torch.float32, "fp32"
        self.dtype = dtype
        self.dtype_str = dtype_str

        network_config = model_config.network_config
        network_config.params.dtype = dtype_str  # mutates the config, as the original
        network_wrapper = _cfg_get(model_config, "network_wrapper", OPENAI_WRAPPER)
        compile_model = bool(_cfg_get(model_config, "compile_model", False))
        model = instantiate_from_config(network_config, where="model.network_config")
        wrapper_cls = get_obj_from_str(network_wrapper, where="model.network_wrapper")
        self.model = wrapper_cls(model, compile_model=compile_model, dtype=dtype)

        self.denoiser = instantiate_from_config(model_config.denoiser_config, where="model.denoiser_config")
        sampler_config = _cfg_get(model_config, "sampler_config", None)
        self.sampler = (instantiate_from_config(sampler_config, where="model.sampler_config")
                        if sampler_config is not None else None)
        conditioner_config = _cfg_get(model_config, "conditioner_config", None)
        if conditioner_config is None:
            conditioner_config = {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": []}}
        self.conditioner = instantiate_from_config(conditioner_config, where="model.conditioner_config")

        self._init_first_stage(model_config.first_stage_config)

        loss_fn_config = _cfg_get(model_config, "loss_fn_config", None)
        self.loss_fn = (instantiate_from_config(loss_fn_config, where="model.loss_fn_config")
                        if loss_fn_config is not None else None)

        self.latent_input = bool(_cfg_get(model_config, "latent_input", False))
        self.scale_factor = float(_cfg_get(model_config, "scale_factor", 1.0))
        self.disable_first_stage_autocast = bool(_cfg_get(model_config, "disable_first_stage_autocast", False))
        # The original reads this from the wrong key (`disable_first_stage_autocast`); conditioning logging
        # is not implemented here, so the flag only documents that.
        self.no_cond_log = bool(_cfg_get(model_config, "disable_first_stage_autocast", False))

    @property
    def generation(self) -> str:
        """The code generation, "1.0" or "1.5" (the original has one engine per generation)."""
        return self.gen.name

    # ------------------------------------------------------------------------------------------ set-up

    def _init_first_stage(self, config):
        model = instantiate_from_config(config, where="model.first_stage_config").eval()
        model.train = disabled_train.__get__(model)
        for param in model.parameters():
            param.requires_grad = False
        self.first_stage_model = model

    def disable_untrainable_params(self):
        """Freeze what the config says is not trainable (LoRA factors ``matrix_A``/``matrix_B`` stay trainable)."""
        total_trainable = 0
        if self.lora_train:
            for name, param in self.named_parameters():
                if param.requires_grad is False:
                    continue
                if "lora_layer" not in name:
                    param.lr_scale = 0
                else:
                    total_trainable += param.numel()
        else:
            for name, param in self.named_parameters():
                if param.requires_grad is False:
                    continue
                frozen = "all" in self.not_trainable_prefixes or any(
                    name.startswith(prefix) for prefix in self.not_trainable_prefixes)
                if frozen and "matrix_A" not in name and "matrix_B" not in name:
                    param.requires_grad_(False)
                else:
                    total_trainable += param.numel()
        print(f"***** Total trainable parameters: {total_trainable} *****")
        return total_trainable

    def reinit(self, parent_model=None):
        """SAT calls this for mixins with missing keys at load time; nothing to re-initialise here."""

    # ------------------------------------------------------------------------------------------ VAE

    def _autocast(self, x: torch.Tensor):
        if self.disable_first_stage_autocast:
            return torch.autocast(x.device.type, enabled=False)
        return torch.autocast(x.device.type, enabled=True)

    def _rounds(self, n: int) -> List[slice]:
        per = int(default(self.en_and_decode_n_samples_a_time, n)) or n
        return [slice(i, min(i + per, n)) for i in range(0, n, per)]

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor, batch=None) -> torch.Tensor:
        """``[B, 3, F, H, W]`` pixels in [-1, 1] -> ``scale_factor · z``, ``[B, 16, f, h, w]``.

        With ``latent_input`` and ``F > 1`` the input already holds latents ``[B, F, 16, h, w]``.
        The VAE samples its posterior (consumes the RNG), as the original.
        """
        frame = x.shape[2]
        if frame > 1 and self.latent_input:
            return x.permute(0, 2, 1, 3, 4).contiguous() * self.scale_factor
        return self.encode_pixels(x)

    @torch.no_grad()
    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """VAE-encode pixels ``[B, 3, F, H, W]`` -> ``scale_factor · z`` whatever ``latent_input`` says
        (inference: image and video conditioning)."""
        outs = []
        with self._autocast(x):
            for sl in self._rounds(x.shape[0]):
                outs.append(self.first_stage_model.encode(x[sl]))
        return self.scale_factor * torch.cat(outs, dim=0)

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``[B, 16, T, h, w]`` -> pixels ``[B, 3, F, H, W]`` (unclamped), original
        ``decode_first_stage`` of each generation (``Generation.stage_decode``).

        1.5: the padding latent frame 0 is dropped and the rest decoded in ≤10 consecutive pieces that
        carry the causal-convolution cache (21 latents -> 81 frames).  1.0: one pass over all frames
        (training-time logging; the sampling script decodes as :meth:`decode_video`).
        """
        return self._decode(z, self.gen.stage_decode)

    @torch.no_grad()
    def decode_video(self, samples_z: torch.Tensor) -> torch.Tensor:
        """Sampled latents ``[B, T, C, h, w]`` -> video ``[B, F, 3, H, W]`` float32 in [0, 1], the way the
        sampling script of each generation does it (``Generation.sample_decode``): 1.0 in pieces [0, 3),
        [3, 5), … one video at a time (13 -> 49 frames; equals diffusers' decode), 1.5 as
        :meth:`decode_first_stage`."""
        z = samples_z.permute(0, 2, 1, 3, 4).contiguous()
        x = self._decode(z, self.gen.sample_decode)
        x = x.to(torch.float32).permute(0, 2, 1, 3, 4).contiguous()
        return torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0)

    def _decode(self, z: torch.Tensor, plan: DecodePlan) -> torch.Tensor:
        """``z / scale_factor`` decoded by ``plan``: videos one at a time or in rounds, the padding latents
        dropped, each video's latent ranges decoded in turn with the VAE's frame cache carried across them."""
        z = z / self.scale_factor
        rounds = [slice(i, i + 1) for i in range(z.shape[0])] if plan.per_video else self._rounds(z.shape[0])
        outs = []
        with self._autocast(z):
            for sl in rounds:
                chunk = z[sl][:, :, plan.drop_leading:]
                ranges = plan.ranges(chunk.shape[2])
                pieces = [self.first_stage_model.decode(
                    chunk[:, :, a:b].contiguous(), clear_fake_cp_cache=(i == len(ranges) - 1),
                    use_cp=(i == 0 or not plan.use_cp_first_only)) for i, (a, b) in enumerate(ranges)]
                outs.append(torch.cat(pieces, dim=2))
        return torch.cat(outs, dim=0)

    # ------------------------------------------------------------------------------------------ training

    def get_input(self, batch: Dict[str, Any]) -> torch.Tensor:
        return batch[self.input_key].to(self.dtype)

    def add_noise_to_first_frame(self, image: torch.Tensor) -> torch.Tensor:
        """I2V training: ``image + exp(n)·ε`` with one ``n ~ N(-3, 0.5)`` per sample (drawn on the CPU)."""
        sigma = torch.normal(mean=-3.0, std=0.5, size=(image.shape[0],)).to(image.device)
        sigma = torch.exp(sigma).to(image.dtype)
        return image + torch.randn_like(image) * sigma[:, None, None, None, None]

    def shared_step(self, batch: Dict[str, Any]):
        x = self.get_input(batch)
        if self.lr_scale is not None:
            raise NotImplementedError("lr_scale (low-resolution conditioning) is not supported")
        x = x.permute(0, 2, 1, 3, 4).contiguous()  # [B, 3, F, H, W]
        if self.noised_image_input:
            image = x[:, :, 0:1]
            image = self.add_noise_to_first_frame(image)
            image = self.encode_first_stage(image, batch)
        x = self.encode_first_stage(x, batch)
        x = x.permute(0, 2, 1, 3, 4).contiguous()  # [B, T, C, h, w]
        if self.noised_image_input:
            image = image.permute(0, 2, 1, 3, 4).contiguous()
            if self.noised_image_all_concat:
                image = image.repeat(1, x.shape[1], 1, 1, 1)
            else:
                image = torch.cat([image, torch.zeros_like(x[:, 1:])], dim=1)
            if random.random() < self.noised_image_dropout:
                image = torch.zeros_like(image)
            batch["concat_images"] = image
        if x.is_cuda:
            # the original frees the VAE's activations before the DiT's forward; a full collection costs ~0.3 s in a
            # process holding DeepSpeed and SAT, so it is done only where the memory goes back to a GPU
            gc.collect()
            torch.cuda.empty_cache()
        return self(x, batch)

    def _has_ofs(self) -> bool:
        return getattr(self.model.diffusion_model, "ofs_embed_dim", None) is not None

    def forward(self, x: torch.Tensor, batch: Dict[str, Any]):
        if self.loss_fn is None:
            raise RuntimeError("this engine has no loss (model.loss_fn_config is missing)")
        if "ofs" not in batch and self._has_ofs():
            # CogVideoX1.5-I2V: the ofs input at its inference value (the original passed none in training:
            # KeyError 'ofs', CogVideo issues 489/526, whose fix is this value)
            batch["ofs"] = torch.full((x.shape[0],), 2.0, device=x.device)
        if "ofs" in batch:
            self.loss_fn.batch2model_keys.add("ofs")
        loss = self.loss_fn(self.model, self.denoiser, self.conditioner, x, batch)
        loss_mean = loss.mean()
        return loss_mean, {"loss": loss_mean}

    # ------------------------------------------------------------------------------------------ sampling

    def _require_on_device(self, part: str) -> None:
        """One line instead of a device-mismatch traceback when ``part`` is not on ``self.device`` (an engine
        built directly and never moved; SAT's ``get_model`` moves it)."""
        param = next(getattr(self, part).parameters(), None)
        if param is None or param.device.type == torch.device(self.device).type:
            return
        from sat_cogvideo.errors import UserError

        raise UserError(f"the engine's {part} is on {param.device} but args.device is {self.device}: move the "
                        f"engine with model.to(args.device) (SAT's get_model(args, SATVideoDiffusionEngine) does)")

    def _initial_noise(self, batch_size: int, shape: Sequence[int], generator=None) -> torch.Tensor:
        # CPU float32 draw, then moved, as the original (so seeded runs agree across devices).
        noise = torch.randn(batch_size, *shape, generator=generator, dtype=torch.float32)
        return noise.to(self.device)

    def _broadcast_model_parallel(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not dist.is_initialized():
            return x
        try:
            from sat import mpu
        except ImportError:
            return x
        if mpu.model_parallel_is_initialized() and mpu.get_model_parallel_world_size() > 1:
            dist.broadcast(x, src=mpu.get_model_parallel_src_rank(), group=mpu.get_model_parallel_group())
        return x

    def _denoiser_closure(self, concat_images=None):
        def denoiser(x, sigma, c, **extra):
            return self.denoiser(self.model, x, sigma, c, concat_images=concat_images, **extra)

        return denoiser

    @torch.no_grad()
    def sample(self, cond: Dict, uc: Optional[Dict] = None, batch_size: int = 16, shape=None, prefix=None,
               concat_images=None, ofs=None, generator: Optional[torch.Generator] = None, **kwargs):
        """Draw ``[batch_size, *shape]`` noise and run the sampler; returns ``[B, T, C, h, w]`` in the model dtype."""
        if self.sampler is None:
            raise RuntimeError("this engine has no sampler (model.sampler_config is missing)")
        self._require_on_device("model")
        x = self._initial_noise(batch_size, shape, generator)
        if prefix is not None:
            x = torch.cat([prefix, x[:, prefix.shape[1]:]], dim=1)
        x = self._broadcast_model_parallel(x)
        extra = {"ofs": ofs} if ofs is not None else {}
        samples = self.sampler(self._denoiser_closure(concat_images), x, cond, uc=uc, scale=None,
                               scale_emb=None, **extra)
        return samples.to(self.dtype)

    def start_step(self, strength: float, num_steps: Optional[int] = None) -> int:
        """The sampler step a video-to-video run starts from: diffusers' rule
        ``n - min(int(n · strength), n)`` (strength 1 -> 0, pure noise; strength 0 -> n, no change)."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        n = int(num_steps or self.sampler.num_steps)
        return max(n - min(int(n * strength), n), 0)

    @torch.no_grad()
    def sample_from(self, z0: torch.Tensor, cond: Dict, uc: Optional[Dict] = None, strength: float = 0.8,
                    concat_images=None, ofs=None, generator: Optional[torch.Generator] = None,
                    noise: Optional[torch.Tensor] = None):
        """Video-to-video: noise the scaled latents ``z0`` ``[B, T, C, h, w]`` to the sampler step that
        ``strength`` selects and denoise from there (SDEdit).

        At start step ``k`` with sampling schedule value ``s_k`` (``sqrt(ᾱ)``, 0 = pure noise) the input is
        ``s_k · z0 + sqrt(1 - s_k²) · ε`` (ε drawn like the initial noise of :meth:`sample`); the loop then
        runs steps ``k … n-1`` of the configured sampler, the first of them without a previous prediction.
        """
        sampler = self.sampler
        if sampler is None:
            raise RuntimeError("this engine has no sampler (model.sampler_config is missing)")
        self._require_on_device("model")
        n = int(sampler.num_steps)
        k = self.start_step(strength, n)
        if noise is None:
            noise = self._initial_noise(z0.shape[0], z0.shape[1:], generator)
        noise = self._broadcast_model_parallel(noise.to(self.device))
        z0 = z0.to(device=noise.device, dtype=torch.float32)
        if k >= n:
            return z0.to(self.dtype)
        s_k = sampler.schedule(n, noise.device)[0][k].to(torch.float32)
        x = s_k * z0 + torch.sqrt(1.0 - s_k ** 2) * noise
        x = sampler(self._denoiser_closure(concat_images), x, cond, uc=uc, num_steps=n, ofs=ofs, start=k)
        return x.to(self.dtype)

    # ------------------------------------------------------------------------------------------ logging

    @torch.no_grad()
    def log_video(self, batch: Dict, N: int = 8, ucg_keys: Optional[List[str]] = None,
                  only_log_video_latents: bool = False, **kwargs) -> Dict[str, torch.Tensor]:
        """Training-time visualisation: inputs, reconstructions and samples (original ``log_video``)."""
        conditioner_input_keys = [e.input_key for e in self.conditioner.embedders]
        if ucg_keys:
            assert all(k in conditioner_input_keys for k in ucg_keys), (
                f"ucg_keys {ucg_keys} must be a subset of the conditioner keys {conditioner_input_keys}")
        else:
            ucg_keys = conditioner_input_keys
        log = {}
        x = self.get_input(batch)
        c, uc = self.conditioner.get_unconditional_conditioning(
            batch, force_uc_zero_embeddings=ucg_keys if len(self.conditioner.embedders) > 0 else [])
        n = min(x.shape[0], N)
        x = x.to(self.device)[:n]
        if not self.latent_input:
            log["inputs"] = x.to(torch.float32)
        x = x.permute(0, 2, 1, 3, 4).contiguous()
        z = self.encode_first_stage(x, batch)
        if not only_log_video_latents:
            log["reconstructions"] = self.decode_first_stage(z).to(torch.float32).permute(0, 2, 1, 3, 4).contiguous()
        z = z.permute(0, 2, 1, 3, 4).contiguous()
        for k in c:
            if isinstance(c[k], torch.Tensor):
                c[k], uc[k] = (y[k][:n].to(self.device) for y in (c, uc))
        if self.noised_image_input:
            image = x[:, :, 0:1]
            image = self.add_noise_to_first_frame(image)
            image = self.encode_first_stage(image, batch).permute(0, 2, 1, 3, 4).contiguous()
            image = torch.cat([image, torch.zeros_like(z[:, 1:])], dim=1)
            c["concat"] = image
            uc["concat"] = image
        if "ofs" not in kwargs and self._has_ofs():
            kwargs["ofs"] = torch.tensor([2.0], device=self.device)  # as sample_video (1.5-I2V)
        samples = self.sample(c, shape=z.shape[1:], uc=uc, batch_size=n, **kwargs)
        samples = samples.permute(0, 2, 1, 3, 4).contiguous()
        if only_log_video_latents:
            log["latents"] = 1.0 / self.scale_factor * samples
        else:
            log["samples"] = self.decode_first_stage(samples).to(torch.float32).permute(0, 2, 1, 3, 4).contiguous()
        return log
