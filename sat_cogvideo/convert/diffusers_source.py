"""The SAT engine on a diffusers CogVideoX pipeline folder: the SAT model config from its configs, and its
transformer and VAE mapped into the SAT modules while the files are read (no conversion on disk).

* :meth:`DiffusersSource.model_config` is the SAT ``model:`` section of the pipeline.  The template is the
  configs/ file of the released family of the same kind (generation, I2V, RoPE or sincos); for the five released
  sizes it is used as it is (only the T5 and VAE paths change); for other sizes (fine-tuned variants, tiny test
  models) the network, VAE, text length, VAE scale factor and SNR shift are derived from ``transformer/config.json``,
  ``vae/config.json``, ``tokenizer/tokenizer_config.json`` and ``scheduler/scheduler_config.json`` (the inverse of
  :func:`sat_cogvideo.convert.transformer.diffusers_transformer_config` and
  :func:`sat_cogvideo.convert.vae.diffusers_vae_config`).
* :meth:`DiffusersSource.preflight` checks the weight files against a model config from their headers only
  (key sets and shapes against a meta-device diffusers model of that config): nothing is loaded.
* :meth:`DiffusersSource.load_into` fills the engine's DiT and VAE from the safetensors files tensor by tensor:
  each file tensor is a view of a memory map whose pages are released after it is copied
  (:func:`~sat_cogvideo.convert.safetensors_io.iter_safetensors`), and fused SAT tensors (q/k/v, the 12-way AdaLN
  modulation) are written piece by piece into their rows (:func:`~sat_cogvideo.convert.transformer.
  diffusers_key_placement`), so the peak resident memory is the model plus one tensor.  We stream ourselves
  because ``safetensors``' loaders return whole state dicts (or keep every mapped page resident), which doubles
  the peak.
* :func:`use_pipeline_load` is what the CLIs call: ``--load`` (or ``MODEL_PATH``) that is a pipeline folder or
  a Hub id becomes a :class:`DiffusersSource` on ``args.model_source``.  The T5 comes from ``text_encoder/`` +
  ``tokenizer/`` (FrozenT5Embedder's ``model_dir`` / ``tokenizer_dir``).
"""
from __future__ import annotations

import copy
import os
import sys
from typing import Callable, Iterable, Mapping, Optional

import torch

from sat_cogvideo.errors import UserError

WEIGHTS = "diffusion_pytorch_model"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _read_json(path: str, what: str) -> dict:
    from sat_cogvideo.hub import _read_json as read

    if not os.path.isfile(path):
        raise UserError(f"{what} has no {os.path.basename(path)} ({path})")
    return read(path)


def _template_family(det):
    """The released family whose configs/ file is the template for a model of ``det``'s kind."""
    from sat_cogvideo.families import FAMILIES

    for fam in FAMILIES.values():
        if fam.generation == det.generation and fam.i2v == det.i2v and (det.i2v or fam.rotary == det.rotary):
            return fam
    raise UserError(f"no CogVideoX family is a {det.generation} {'I2V' if det.i2v else 'T2V'} model with "
                    f"{'RoPE' if det.rotary else 'a sincos table'}: pass its SAT model YAML with --base")


def _plain(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else copy.deepcopy(dict(cfg))


class DiffusersSource:
    """A diffusers CogVideoX pipeline folder seen as the SAT engine's weights (maps to the original's released SAT
    folder: ``transformer/`` checkpoint, ``vae/3d-vae.pt``, ``t5-v1_1-xxl/``)."""

    def __init__(self, folder):
        self.folder = folder
        where = f"diffusers pipeline {folder.source}"
        self.where = where
        self.transformer_config = _read_json(folder.part("transformer") + "/config.json", where)
        self.vae_config = _read_json(folder.part("vae") + "/config.json", where)
        for cfg, cls, part in ((self.transformer_config, "CogVideoXTransformer3DModel", "transformer"),
                               (self.vae_config, "AutoencoderKLCogVideoX", "vae")):
            if cfg.get("_class_name", cls) != cls:
                raise UserError(f"{where}: {part}/config.json describes a {cfg.get('_class_name')}, not a {cls}")
        sched = folder.part("scheduler") + "/scheduler_config.json"
        self.scheduler_config = _read_json(sched, where) if os.path.isfile(sched) else {}
        tok = folder.part("tokenizer") + "/tokenizer_config.json"
        self.tokenizer_config = _read_json(tok, where) if os.path.isfile(tok) else {}
        self._detected = None

    # ---------------------------------------------------------------------------------------------- description

    def transformer_header(self) -> dict:
        """Meta tensors of the transformer files (diffusers names), from the headers."""
        from sat_cogvideo.convert.safetensors_io import header_tensors

        return header_tensors(self.folder.part("transformer"), WEIGHTS)

    def sat_meta(self) -> dict:
        """The SAT DiT keys and shapes the transformer files give (meta tensors); 1.0 RoPE models get SAT's
        unused absolute table too, as the released SAT files have it (detection reads it)."""
        from sat_cogvideo.convert.transformer import diffusers_to_sat_transformer

        sd = diffusers_to_sat_transformer(self.transformer_header())
        tc = self.transformer_config
        if tc.get("use_rotary_positional_embeddings") and tc.get("patch_size_t") is None:
            hidden = int(tc["num_attention_heads"]) * int(tc["attention_head_dim"])
            sd["transformer.position_embeddings.weight"] = torch.empty(64, hidden, device="meta")
        return sd

    @property
    def detected(self):
        """:class:`sat_cogvideo.families.Detected` of the transformer (from its header)."""
        if self._detected is None:
            from sat_cogvideo.families import detect_from_state_dict

            self._detected = detect_from_state_dict(self.sat_meta())
        return self._detected

    def _text_length(self, rope_unlearned: bool, default: int) -> int:
        """SAT's T5 length: the transformer's when its position table holds the text, else the tokenizer's."""
        if not rope_unlearned and self.transformer_config.get("max_text_seq_length"):
            return int(self.transformer_config["max_text_seq_length"])
        n = self.tokenizer_config.get("model_max_length")
        return int(n) if isinstance(n, (int, float)) and 0 < n < 100000 else default

    def _network_params(self, params: dict, released: bool) -> None:
        """Write the transformer config's sizes into SAT ``network_config.params`` (in place)."""
        tc = self.transformer_config
        heads, head_dim = int(tc["num_attention_heads"]), int(tc["attention_head_dim"])
        p, pt = int(tc.get("patch_size", 2)), tc.get("patch_size_t")
        params.update(hidden_size=heads * head_dim, num_attention_heads=heads, num_layers=int(tc["num_layers"]),
                      in_channels=int(tc["in_channels"]), out_channels=int(tc["out_channels"]),
                      time_embed_dim=int(tc.get("time_embed_dim", 512)),
                      time_compressed_rate=int(tc.get("temporal_compression_ratio", 4)),
                      patch_size=[int(pt), p, p] if pt else p,
                      elementwise_affine=bool(tc.get("norm_elementwise_affine", True)))
        if not released:  # the released families keep their SAT position grids
            params.update(num_frames=int(tc["sample_frames"]), latent_height=int(tc["sample_height"]),
                          latent_width=int(tc["sample_width"]))
        if tc.get("ofs_embed_dim"):
            params["ofs_embed_dim"] = int(tc["ofs_embed_dim"])
        else:
            params.pop("ofs_embed_dim", None)
        modules = params["modules"]
        modules["patch_embed_config"].setdefault("params", {})["text_hidden_size"] = int(tc.get("text_embed_dim",
                                                                                               4096))
        pos = modules["pos_embed_config"].setdefault("params", {})
        if "Rotary" in str(modules["pos_embed_config"].get("target", "")):
            pos["hidden_size_head"] = head_dim
        else:
            pos["height_interpolation"] = pos["width_interpolation"] = float(
                tc.get("spatial_interpolation_scale", 1.875))

    def _vae_params(self, fsc: dict) -> None:
        vc = self.vae_config
        boc = [int(c) for c in vc["block_out_channels"]]
        values = dict(ch=boc[0], ch_mult=[c // boc[0] for c in boc], num_res_blocks=int(vc["layers_per_block"]),
                      z_channels=int(vc.get("latent_channels", 16)), in_channels=int(vc.get("in_channels", 3)),
                      out_ch=int(vc.get("out_channels", 3)))
        for part in ("encoder_config", "decoder_config"):
            fsc["params"][part].setdefault("params", {}).update(values)

    def model_config(self) -> dict:
        """The SAT ``model:`` section (plain dict): the family's configs/ file for a released size, else that file
        with the sizes of the diffusers configs (module docstring)."""
        from omegaconf import OmegaConf

        det = self.detected
        fam = _template_family(det)
        mc = _plain(OmegaConf.load(os.path.join(ROOT, fam.config)).model)
        released = det.family is not None
        net = mc["network_config"]["params"]
        rope_unlearned = det.rotary and not det.learnable_pos_embed
        text_length = fam.text_length if released else self._text_length(rope_unlearned, fam.text_length)
        self._network_params(net, released)
        net["modules"]["pos_embed_config"]["params"]["text_length"] = text_length
        for emb in mc["conditioner_config"]["params"]["emb_models"]:
            if str(emb.get("target", "")).endswith("FrozenT5Embedder"):
                emb["params"]["max_length"] = text_length
        self._vae_params(mc["first_stage_config"])
        mc["scale_factor"] = float(self.vae_config.get("scaling_factor", mc.get("scale_factor", 1.0)))
        shift = self.scheduler_config.get("snr_shift_scale")
        if shift is not None:
            for path in ("denoiser_config.params.discretization_config", "sampler_config.params.discretization_config",
                         "loss_fn_config.params.sigma_sampler_config.params.discretization_config"):
                node = _at(mc, path)
                if node is not None and float((node.get("params") or {}).get("shift_scale", 1.0)) != float(shift):
                    node.setdefault("params", {})["shift_scale"] = float(shift)  # (1.0: the class default)
        self.point(mc)
        mc["_source"] = fam.name if self._same_as(fam, mc) else f"derived from the diffusers configs ({fam.name} " \
                                                                 f"template)"
        return mc

    def _same_as(self, fam, mc: dict) -> bool:
        from omegaconf import OmegaConf

        ref = _plain(OmegaConf.load(os.path.join(ROOT, fam.config)).model)
        self.point(ref)
        return ref == {k: v for k, v in mc.items() if k != "_source"}

    def point(self, model_config) -> None:
        """Point a model config at this pipeline: the T5 at ``text_encoder/`` + ``tokenizer/``, no ``3d-vae.pt``
        (the VAE is filled by :meth:`load_into`)."""
        from omegaconf import OmegaConf, open_dict

        cfg = model_config
        ctx = open_dict(cfg) if OmegaConf.is_config(cfg) else _nullcontext()
        with ctx:
            cfg["first_stage_config"]["params"]["ckpt_path"] = None
            for emb in cfg["conditioner_config"]["params"]["emb_models"]:
                if str(emb.get("target", "")).endswith("FrozenT5Embedder"):
                    emb["params"]["model_dir"] = self.folder.part("text_encoder")
                    emb["params"]["tokenizer_dir"] = self.folder.part("tokenizer")

    def default_args(self, model_config) -> dict:
        """Sampling options of this model for runs without a ``--base`` inference file: the family's frames, fps,
        size and dtype; for other sizes what their config allows."""
        from sat_cogvideo.families import detect_from_model_config, get_generation

        det = detect_from_model_config(model_config)
        gen = get_generation(det.generation)
        net = model_config["network_config"]["params"]
        fam = self.detected.family
        if fam is not None:
            frames, fps, size, dtype = fam.num_frames, fam.fps, [fam.height, fam.width], fam.dtype
        else:
            allowed = gen.allowed_video_frames((int(net["num_frames"]) - 1) // int(net["time_compressed_rate"]) + 1)
            frames = int(net["num_frames"]) if int(net["num_frames"]) in allowed else max(allowed or [1])
            fps, dtype = _template_family(det).fps, None
            size = [8 * int(net["latent_height"]), 8 * int(net["latent_width"])]
        return dict(sampling_num_frames=gen.latent_frames(frames), sampling_fps=fps, sampling_image_size=size,
                    latent_channels=int(net["out_channels"]), image2video=det.i2v, dtype=dtype)

    # ---------------------------------------------------------------------------------------------- checks

    def preflight(self, model_config) -> None:
        """The pipeline's files and configs against ``model_config``, before anything loads: every file tensor has
        a SAT place, the headers agree with the pipeline's config.json, and its sizes with the config (compared as
        the diffusers configs the model config would give; diffusers itself is not imported, its model modules take
        seconds to import).  :func:`stream_load` checks every shape again while loading."""
        from sat_cogvideo.convert.transformer import diffusers_transformer_config
        from sat_cogvideo.convert.vae import diffusers_to_sat_key, diffusers_vae_config
        from sat_cogvideo.convert.safetensors_io import header_tensors
        from sat_cogvideo.families import check_checkpoint_fits_config, detect_from_model_config

        mc, tc, where = _plain(model_config), self.transformer_config, f"transformer of {self.where}"
        det = self.detected  # every transformer tensor mapped (UserError otherwise)
        for name, have, want in (("hidden size", det.hidden_size, int(tc["num_attention_heads"]) *
                                  int(tc["attention_head_dim"])), ("num_layers", det.num_layers, tc["num_layers"])):
            if have != int(want):
                raise UserError(f"{where}: the weight files have {name} {have} but transformer/config.json says "
                                f"{want}: the folder mixes two models; download it again")
        config_det = detect_from_model_config(mc)
        check_checkpoint_fits_config(det, config_det, where)
        _same_sizes(tc, diffusers_transformer_config(mc["network_config"]), _TRANSFORMER_SIZES, where)
        levels = len(self.vae_config["block_out_channels"])
        for key in header_tensors(self.folder.part("vae"), WEIGHTS):
            diffusers_to_sat_key(key, levels)
        vae = diffusers_vae_config(mc["first_stage_config"], version=config_det.generation)
        _same_sizes(self.vae_config, vae, _VAE_SIZES, f"VAE of {self.where}")

    # ---------------------------------------------------------------------------------------------- loading

    def load_into(self, engine) -> None:
        """Fill the engine's DiT and VAE from the pipeline's files (streamed, module docstring)."""
        from sat_cogvideo.convert.safetensors_io import weight_files
        from sat_cogvideo.convert.transformer import diffusers_key_placement

        dit = engine.model.diffusion_model
        known = dit.known_unused_keys() if hasattr(dit, "known_unused_keys") else set()
        stream_load(dit, weight_files(self.folder.part("transformer"), WEIGHTS), diffusers_key_placement,
                    known_unused=known, source=f"transformer of {self.where}")
        first = engine.first_stage_model
        if hasattr(first, "defer_load"):  # training on cached latents: the VAE is built only to decode
            first.defer_load(self.load_vae_into)
        else:
            self.load_vae_into(first)

    def vae_files(self) -> list:
        """The pipeline's VAE weight files (what a latent cache entry's key fingerprints)."""
        from sat_cogvideo.convert.safetensors_io import weight_files

        return list(weight_files(self.folder.part("vae"), WEIGHTS))

    def load_vae_into(self, first_stage_model) -> None:
        """Fill a SAT first-stage module (``first_stage_config``'s class) from the pipeline's VAE files."""
        from sat_cogvideo.convert.vae import diffusers_to_sat_key

        levels = len(self.vae_config["block_out_channels"])
        stream_load(first_stage_model, self.vae_files(), lambda key: (diffusers_to_sat_key(key, levels), 1, (0,)),
                    source=f"VAE of {self.where}")


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _at(tree: dict, dotted: str) -> Optional[dict]:
    node = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or node.get(key) is None:
            return None
        node = node[key]
    return node


_TRANSFORMER_SIZES = ("num_attention_heads", "attention_head_dim", "num_layers", "in_channels", "out_channels",
                      "time_embed_dim", "text_embed_dim", "ofs_embed_dim", "patch_size", "patch_size_t",
                      "use_rotary_positional_embeddings", "use_learned_positional_embeddings")
_VAE_SIZES = ("block_out_channels", "layers_per_block", "latent_channels", "in_channels", "out_channels")


def _same_sizes(have: Mapping, want: Mapping, keys, where: str) -> None:
    """A pipeline's config.json against the diffusers config a SAT model config gives, on the keys that size the
    weights."""
    for key in keys:
        a, b = have.get(key), want.get(key)
        if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            raise UserError(f"{where} does not fit the model config: its config.json has {key} {a}, the model "
                            f"config gives {b}; drop --base to use the pipeline's own configs, or pass the model "
                            f"YAML of these weights")


def _target(key: str, own: Mapping) -> str:
    """``key``, or its LoRA-wrapped name ``X.original.weight`` when the model wraps that layer."""
    if key in own:
        return key
    for suffix in ("weight", "bias"):
        if key.endswith("." + suffix):
            alias = key[: -len(suffix)] + "original." + suffix
            if alias in own:
                return alias
    return key


def _copy_rows(dst: torch.Tensor, src: torch.Tensor, n: int, idx: tuple) -> Optional[str]:
    """Copy ``src`` (the SAT chunks ``idx`` of ``n``, concatenated) into ``dst``; a problem text or None."""
    if n == 1:
        if tuple(src.shape) != tuple(dst.shape):
            return f"{list(src.shape)} in the file, {list(dst.shape)} in the model"
        dst.copy_(src)
        return None
    rows = dst.shape[0] // n
    want = (rows * len(idx),) + tuple(dst.shape[1:])
    if dst.shape[0] % n or tuple(src.shape) != want:
        return f"{list(src.shape)} in the file, {list(want)} expected from the model's {list(dst.shape)}"
    for k, j in enumerate(idx):
        dst[j * rows:(j + 1) * rows].copy_(src[k * rows:(k + 1) * rows])
    return None


def stream_load(module: torch.nn.Module, files: Iterable[str], placement: Callable, *,
                known_unused: Iterable[str] = (), source: str = "weights") -> None:
    """Copy the tensors of safetensors ``files`` into ``module`` one at a time; ``placement(name)`` gives
    ``(module key, chunks, chunk indices)`` (None: unknown).  Strict: every module tensor except ``known_unused``
    (and LoRA factors, which keep their initial values) must be filled completely, every file tensor used."""
    from sat_cogvideo.checkpoint import _LORA_FACTOR
    from sat_cogvideo.convert.safetensors_io import iter_safetensors

    own, known = module.state_dict(), set(known_unused)
    filled: dict = {}
    unknown, wrong = [], []
    with torch.no_grad():
        for path in files:
            for name, tensor in iter_safetensors(path):
                place = placement(name)
                key = _target(place[0], own) if place else None
                if key in known:
                    continue
                if key not in own:
                    unknown.append(name)
                    continue
                problem = _copy_rows(own[key], tensor, place[1], place[2])
                if problem:
                    wrong.append(f"{name}: {problem}")
                    continue
                filled.setdefault(key, [place[1], set()])[1].update(place[2])
    missing = [k for k in own if k not in known and not _LORA_FACTOR.search(k)
               and (k not in filled or filled[k][1] != set(range(filled[k][0])))]
    if wrong or unknown or missing:
        first = [f"{len(wrong)} shape mismatches (first: {wrong[0]})"] if wrong else []
        first += [f"{len(unknown)} tensors the model has no place for (e.g. {sorted(unknown)[0]})"] if unknown else []
        first += [f"{len(missing)} model tensors not in the files (e.g. {sorted(missing)[0]})"] if missing else []
        raise UserError(f"{source} does not fit the model: {'; '.join(first)}")


# --------------------------------------------------------------------------------------------------------------
# the CLIs' entry points


def sat_meta_of(pipeline_root: str) -> dict:
    """SAT DiT keys and shapes (meta tensors) of a pipeline folder's transformer, for detection."""
    from sat_cogvideo.hub import PipelineFolder, pipeline_class

    return DiffusersSource(PipelineFolder(pipeline_root, pipeline_class(pipeline_root, pipeline_root))).sat_meta()


def _yaml_args(args) -> set:
    return set(((getattr(args, "config", None) or {}).get("args") or {}).keys())


def apply_default_args(args, defaults: Mapping) -> None:
    """Set each default the user did not give (command line or ``--base`` ``args:``)."""
    given = set(getattr(args, "explicit", ())) | _yaml_args(args)
    for key, value in defaults.items():
        if key == "dtype":
            if value and not given & {"dtype", "fp16", "bf16"}:
                args.fp16, args.bf16 = value == "float16", value == "bfloat16"
        elif key not in given:
            setattr(args, key, value)


def use_pipeline_load(args, what: str = "--load") -> Optional[DiffusersSource]:
    """When ``args.load`` is a diffusers pipeline folder or a Hub id: resolve it (download if needed), use the
    pipeline's SAT model config unless ``--base`` gave one (``--base`` wins), point the T5 and VAE at the pipeline
    and set ``args.model_source`` (what :func:`sat_cogvideo.sample_video.build_engine` loads from).  Runs before
    any weight is read; returns the source (None for SAT checkpoints)."""
    from omegaconf import OmegaConf

    from sat_cogvideo import hub

    args.model_source = None
    load = getattr(args, "load", None)
    if not load or not hub.is_pipeline_path(load):
        return None
    source = DiffusersSource(hub.resolve(load, getattr(args, "revision", None), what))
    if args.model_config is None:
        mc = source.model_config()
        note = mc.pop("_source")
        args.model_config = OmegaConf.create(mc)
        if getattr(args, "mode", "inference") == "inference":  # training takes its settings from --base files
            apply_default_args(args, source.default_args(mc))
        print(f"{what} {source.folder.source}: diffusers pipeline, SAT model config: {note}", file=sys.stderr,
              flush=True)
    else:
        source.point(args.model_config)
    args.load = source.folder.root
    args.model_source = source
    return source
