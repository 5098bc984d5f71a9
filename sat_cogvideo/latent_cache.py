"""Cached VAE latents and T5 embeddings for finetuning (``--cache-latents DIR`` or ``args: cache_latents: DIR``).

The original (and our default path) encodes every video with the VAE and every caption with T5 at every step.
With a cache, :func:`prepare_cache` runs once before training: every video of ``train_data``/``valid_data`` is
decoded, cropped and VAE-encoded once, every caption T5-encoded once, and the results are stored as safetensors::

    DIR/latents/<k[:2]>/<k>.safetensors   "moments": [2*16, T, h, w]  (posterior mean and log-variance)
    DIR/text/<k[:2]>/<k>.safetensors      "emb": [L, D]               (the T5 output for the caption)
    DIR/fingerprints.json                 content hashes of files, memoised by (path, size, mtime)

A latent key is the SHA-256 of the video file's content and every setting that changes the result: frames
(``max_num_frames``, ``skip_frms_num``, ``fps``), ``video_size``, the crop, the training dtype, the VAE weights
(content hash of ``ckpt_path``) and the VAE's encoder config.  A text key covers the caption, the T5 folder
(content hash of its config and weight files), ``max_length`` and the dtype.  A changed setting is a new key (a
miss); old entries stay until the folder is deleted.

**Which posterior draw is stored.**  Neither: the entry holds the posterior itself (mean and log-variance, the
VAE's ``unregularized`` output).  While training, the engine's first stage is :class:`CachedPosterior`, which draws
``mean + std * randn_like(mean)`` from the global RNG exactly where the VAE's regularizer would (or returns the
mean when the config's ``regularizer_config.params.sample`` is false), so a run on the cache consumes the same
random numbers and computes the same loss as the on-the-fly run (bit-equal in float32 when videos are encoded one
per round, i.e. batch 1 or ``en_and_decode_n_samples_a_time: 1``; otherwise equal up to float reordering), and
each epoch gets a fresh draw (a stored seeded sample would repeat one draw every epoch).  The text conditioner
becomes a :class:`CachedTextEmbedder` inside the usual ``GeneralConditioner``, so caption dropout (``ucg_rate``)
draws the same numbers too.

With a complete cache the VAE and T5 are never built (the stand-ins build them on first use only when sampling
needs them: ``log_video`` decodes with the VAE, validation prompts need T5).  Entries are written to a temporary
name and renamed; each holds a SHA-256 of its tensor bytes, checked on every read: a damaged or truncated entry is
reported with a warning, deleted and encoded again (by the next :func:`prepare_cache`; during a run the item is
replaced by the next one, as a bad video is).

Written here (no library does this for SAT's engine): the keys, the safetensors store and the two stand-ins.
Not supported (refused with one line): image-to-video models (their first frame is noised in pixel space before
encoding, every step), ``latent_input`` configs, ``reshape_mode: random`` crops, model parallelism.
"""
from __future__ import annotations

import copy
import gc
import hashlib
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from sat_cogvideo.errors import UserError
from sgm.modules.encoders.modules import AbstractEmbModel

VERSION = 1
T5_TARGET_SUFFIX = "FrozenT5Embedder"
_PREPARED: Dict[str, "CachedVideoDataset"] = {}  # data folder -> dataset, filled by prepare_cache for make_loaders


def add_cache_args(parser):
    group = parser.add_argument_group("latent cache",
                                      "cached VAE latents and T5 embeddings (sat_cogvideo.latent_cache)")
    group.add_argument("--cache-latents", type=str, default=None, metavar="DIR",
                       help="encode each video (VAE) and caption (T5) once into DIR and train from there")
    return parser


def _warn(msg: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------------
# keys


class Fingerprints:
    """SHA-256 of file contents, memoised in ``DIR/fingerprints.json`` by (real path, size, mtime) so that a big
    dataset or a 9 GB T5 folder is read once, not at every run."""

    def __init__(self, root: str):
        self.path = os.path.join(root, "fingerprints.json")
        self.memo: Dict[str, str] = {}
        self.dirty = False
        try:
            with open(self.path) as f:
                self.memo = dict(json.load(f))
        except (OSError, ValueError):
            self.memo = {}

    def file(self, path: str) -> str:
        st = os.stat(path)
        memo_key = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
        if memo_key not in self.memo:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            self.memo[memo_key] = h.hexdigest()
            self.dirty = True
        return self.memo[memo_key]

    def folder(self, path: str) -> str:
        """Hash of every file in a folder (names and contents), e.g. a T5 folder."""
        parts = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                parts.append(f"{os.path.relpath(full, path)}={self.file(full)}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def save(self) -> None:
        if self.dirty:
            from sat_cogvideo.atomic import atomic_write_text

            atomic_write_text(self.path, json.dumps(self.memo, indent=0, sort_keys=True))
            self.dirty = False


def digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _plain(cfg):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else copy.deepcopy(cfg)


def latent_settings(model_config, data_params: dict, dtype: str, prints: Fingerprints,
                    vae_files: Optional[Sequence[str]] = None) -> dict:
    """Everything besides the video bytes that changes a video's latents.  ``vae_files``: where the VAE weights
    come from when not from ``ckpt_path`` (a diffusers pipeline's ``vae/`` files)."""
    fs = _plain(model_config.first_stage_config)
    params = dict(fs.get("params") or {})
    ckpt = params.get("ckpt_path")
    if vae_files:
        vae = [prints.file(f) for f in vae_files]
    else:
        vae = prints.file(ckpt) if ckpt and os.path.isfile(ckpt) else None
    return {"v": VERSION, "kind": "latents", "dtype": dtype, "vae_weights": vae,
            "vae": {k: params.get(k) for k in ("encoder_config", "regularizer_config", "cp_size")},
            "target": fs.get("target"), "autocast": not bool(model_config.get("disable_first_stage_autocast", False)),
            "video_size": [int(v) for v in data_params["video_size"]], "fps": int(data_params["fps"]),
            "max_num_frames": int(data_params["max_num_frames"]),
            "skip_frms_num": float(data_params.get("skip_frms_num", 3)),
            "reshape_mode": data_params.get("reshape_mode", "center")}


def text_settings(embedder_config, dtype: str, prints: Fingerprints) -> dict:
    cfg = _plain(embedder_config)
    params = dict(cfg.get("params") or {})
    model_dir = params.get("model_dir")
    t5 = prints.folder(model_dir) if model_dir and os.path.isdir(model_dir) else model_dir
    return {"v": VERSION, "kind": "text", "dtype": dtype, "target": cfg.get("target"), "t5": t5,
            "max_length": params.get("max_length")}


# ------------------------------------------------------------------------------------------------------------
# the store


class CacheStore:
    """safetensors entries under ``root/<kind>/<k[:2]>/<k>.safetensors``, atomic writes, checked reads."""

    def __init__(self, root: str):
        self.root = os.fspath(root)

    def path(self, kind: str, key: str) -> str:
        return os.path.join(self.root, kind, key[:2], f"{key}.safetensors")

    def write(self, kind: str, key: str, tensors: Dict[str, torch.Tensor], meta: Optional[dict] = None) -> str:
        from safetensors.torch import save_file

        from sat_cogvideo.atomic import atomic_path

        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {k: str(v) for k, v in (meta or {}).items()}
        meta["sha256"] = _tensor_digest(tensors)
        path = self.path(kind, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file(tensors, tmp, metadata=meta)
        return path

    def read(self, kind: str, key: str):
        """``(tensors, metadata)``, or None when absent; a damaged entry is reported, deleted and None returned."""
        from safetensors import safe_open

        path = self.path(kind, key)
        if not os.path.isfile(path):
            return None
        try:
            with safe_open(path, framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if meta.get("sha256") != _tensor_digest(tensors):
                raise ValueError("content does not match its checksum")
        except Exception as err:  # truncated file, bad header, flipped bits
            _warn(f"latent cache entry {path} is damaged ({str(err).splitlines()[0][:120]}); encoding it again")
            try:
                os.remove(path)
            except OSError:
                pass
            return None
        return tensors, meta


def _tensor_digest(tensors: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------------
# the engine's stand-ins


class CachedPosterior(nn.Module):
    """Stands in for the VAE (``first_stage_model``) when training on cached latents.

    ``encode(moments)`` draws from the stored posterior as the VAE's ``DiagonalGaussianRegularizer`` does (global
    RNG; the mean when ``sample`` is false).  ``decode`` builds the real VAE from ``vae_config`` on first use
    (sampling in ``log_video``/validation) in the dtype and on the device of its input; it is not a submodule, so
    it is never in a checkpoint or an optimizer.
    """

    def __init__(self, vae_config=None, sample: bool = True):
        super().__init__()
        self.vae_config = vae_config
        self.sample = bool(sample)
        self.__dict__["_vae"] = None
        self.__dict__["_loaders"] = []

    def defer_load(self, load) -> None:
        """Call ``load(vae)`` when the real VAE is built (its weights from elsewhere than ``ckpt_path``)."""
        self.__dict__["_loaders"].append(load)

    @property
    def vae(self):
        if self.__dict__["_vae"] is None:
            from sgm.util import instantiate_from_config

            vae = instantiate_from_config(self.vae_config, where="model.first_stage_config").eval()
            for load in self.__dict__["_loaders"]:
                load(vae)
            for p in vae.parameters():
                p.requires_grad_(False)
            self.__dict__["_vae"] = vae
        return self.__dict__["_vae"]

    def encode(self, moments: torch.Tensor, **kwargs) -> torch.Tensor:
        from sat_cogvideo.vae_modules.regularizers import DiagonalGaussianDistribution

        posterior = DiagonalGaussianDistribution(moments)
        return posterior.sample() if self.sample else posterior.mode()

    def decode(self, z: torch.Tensor, **kwargs) -> torch.Tensor:
        vae = self.vae.to(device=z.device, dtype=z.dtype)
        return vae.decode(z, **kwargs)


class CachedTextEmbedder(AbstractEmbModel):
    """Stands in for ``FrozenT5Embedder`` inside ``GeneralConditioner`` (batch key ``txt_emb``): a tensor of cached
    embeddings ``[B, L, D]`` passes through; a list of strings (validation prompts) goes to the real T5, built from
    ``t5_config`` on first use."""

    def __init__(self, t5_config=None):
        super().__init__()
        self.t5_config = t5_config
        self.__dict__["_t5"] = None
        # follows the engine's device and dtype (SAT's get_model casts the engine); not in any state dict
        self.register_buffer("probe", torch.zeros(0), persistent=False)

    def forward(self, x):
        if isinstance(x, torch.Tensor):
            return x
        if self.__dict__["_t5"] is None:
            from sgm.util import instantiate_from_config

            t5 = instantiate_from_config(self.t5_config, where="model.conditioner_config").eval()
            for p in t5.parameters():
                p.requires_grad_(False)
            self.__dict__["_t5"] = t5
        t5 = self.__dict__["_t5"].to(device=self.probe.device, dtype=self.probe.dtype)
        return t5([x] if isinstance(x, str) else list(x))


def check_supported(args) -> None:
    mc = args.model_config
    if bool(mc.get("noised_image_input", False)):
        raise UserError("--cache-latents: image-to-video models cannot train on cached latents (their first frame is "
                        "noised in pixel space before encoding at every step); drop cache_latents")
    if bool(mc.get("latent_input", False)):
        raise UserError("--cache-latents: this model config has latent_input: true (its data are latents "
                        "already); drop cache_latents or set model.latent_input: false")
    if int(getattr(args, "model_parallel_size", 1) or 1) > 1:
        raise UserError("--cache-latents needs model_parallel_size 1")
    params = args.data_config.get("params") or {}
    if params.get("reshape_mode", "center") != "center":
        raise UserError("--cache-latents needs data.params.reshape_mode: center (a random crop differs each epoch)")
    embedders = list((mc.conditioner_config.get("params") or {}).get("emb_models") or [])
    if len(embedders) != 1 or not str(embedders[0].get("target", "")).endswith(T5_TARGET_SUFFIX):
        raise UserError("--cache-latents supports a conditioner with exactly one FrozenT5Embedder (the CogVideoX "
                        "configs); this config has a different conditioner_config")


def cached_model_config(model_config):
    """A copy of ``model:`` whose first stage and text embedder are the stand-ins above."""
    from omegaconf import OmegaConf, open_dict

    mc = copy.deepcopy(model_config)
    with open_dict(mc):
        fs = mc.first_stage_config
        reg = (fs.get("params") or {}).get("regularizer_config") or {}
        sample = bool((reg.get("params") or {}).get("sample", True))
        mc.first_stage_config = OmegaConf.create({"target": f"{__name__}.CachedPosterior",
                                                  "params": {"vae_config": _plain(fs), "sample": sample}})
        emb = mc.conditioner_config.params.emb_models[0]
        stub = {"target": f"{__name__}.CachedTextEmbedder", "params": {"t5_config": _plain(emb)},
                "input_key": "txt_emb", "is_trainable": False, "ucg_rate": float(emb.get("ucg_rate", 0.0) or 0.0)}
        if emb.get("legacy_ucg_value", None) is not None:
            stub["legacy_ucg_value"] = emb.get("legacy_ucg_value")
        mc.conditioner_config.params.emb_models[0] = OmegaConf.create(stub)
    return mc


# ------------------------------------------------------------------------------------------------------------
# the dataset on the cache


class CachedVideoDataset(torch.utils.data.Dataset):
    """The items of an ``SFTDataset`` read from the cache: ``{"mp4": moments [T, 32, h, w], "txt": caption,
    "txt_emb": [L, D], "num_frames", "fps"}`` (``mp4`` keeps its name: the engine's ``shared_step`` permutes it
    and hands it to the first stage, here :class:`CachedPosterior`).  ``reads`` counts entries read."""

    def __init__(self, base, store: CacheStore, latent_keys: Sequence[Optional[str]], text_keys: Sequence[str]):
        self.base = base
        self.store = store
        self.latent_keys = list(latent_keys)  # None: the video failed to decode while encoding
        self.text_keys = list(text_keys)
        self.reads = 0
        self._bad: set = set()

    def __len__(self) -> int:
        return len(self.base)

    @property
    def bucket_keys(self):
        """The base dataset's buckets: a cached run batches as the run on the fly does."""
        return getattr(self.base, "bucket_keys", None)

    def load_item(self, index: int) -> Optional[dict]:
        key = self.latent_keys[index]
        latent = self.store.read("latents", key) if key else None
        text = self.store.read("text", self.text_keys[index]) if latent is not None else None
        if latent is None or text is None:
            return None
        self.reads += 1
        (tensors, meta), (text_tensors, _) = latent, text
        return {"mp4": tensors["moments"].permute(1, 0, 2, 3).contiguous(), "txt": self.base.captions[index],
                "txt_emb": text_tensors["emb"], "num_frames": int(meta["num_frames"]), "fps": self.base.fps}

    def __getitem__(self, index: int) -> dict:
        n = len(self.base)
        for offset in range(n):
            i = (int(index) + offset) % n
            if i in self._bad:
                continue
            item = self.load_item(i)
            if item is not None:
                return item
            self._bad.add(i)  # damaged since prepare_cache (reported by the store) or undecodable video
        raise UserError(f"no cached item of {self.base.data_dir} can be read (run again to re-encode them)")


# ------------------------------------------------------------------------------------------------------------
# filling the cache


def _dtype(args) -> torch.dtype:
    return torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32


class _Encoders:
    """The VAE and T5 of the config, built on first need, cast to the training dtype as SAT's ``get_model`` casts
    the engine; ``built`` lists what was built."""

    def __init__(self, args):
        self.args, self.vae, self.t5, self.built = args, None, None, []

    def _make(self, config, where):
        from sgm.util import instantiate_from_config

        module = instantiate_from_config(config, where=where).eval()
        for p in module.parameters():
            p.requires_grad_(False)
        self.built.append(where)
        return module.to(device=self.args.device, dtype=_dtype(self.args))

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[F, 3, H, W]`` pixels -> posterior moments ``[32, T, h, w]``, as ``encode_pixels`` would encode them."""
        mc = self.args.model_config
        if self.vae is None:
            self.vae = self._make(mc.first_stage_config, "model.first_stage_config")
            source = getattr(self.args, "model_source", None)
            if source is not None:  # --load <diffusers pipeline>: its VAE (the config names no 3d-vae.pt)
                source.load_vae_into(self.vae)
        x = pixels[None].to(device=self.args.device, dtype=_dtype(self.args)).permute(0, 2, 1, 3, 4).contiguous()
        enabled = not bool(mc.get("disable_first_stage_autocast", False))
        with torch.autocast(torch.device(self.args.device).type, enabled=enabled):
            moments, _ = self.vae.encode(x, unregularized=True)
        return moments[0]

    @torch.no_grad()
    def text(self, caption: str) -> torch.Tensor:
        if self.t5 is None:
            self.t5 = self._make(self.args.model_config.conditioner_config.params.emb_models[0],
                                 "model.conditioner_config.params.emb_models[0]")
        return self.t5([caption])[0]


def _dataset_keys(ds, lat: dict, txt: dict, prints: Fingerprints):
    # an item's own size and length (its bucket's) replace the dataset's
    settings = getattr(ds, "item_settings", lambda _i: {})
    lkeys = [digest({**lat, **settings(i), "video": prints.file(p)}) for i, p in enumerate(ds.video_paths)]
    tkeys = [digest({**txt, "caption": c}) for c in ds.captions]
    return lkeys, tkeys


def _fill(ds, store: CacheStore, lkeys: List[Optional[str]], tkeys: List[str], mine, enc: _Encoders) -> int:
    """Encode the items ``mine`` whose entries are missing; returns how many entries were written."""
    from sat_cogvideo.data_video import BadVideo

    written = 0
    for i in mine:
        if store.read("latents", lkeys[i]) is None:
            try:
                item = ds.load_item(i)
            except BadVideo as err:
                ds._skip(ds.video_paths[i], str(err))
                continue
            store.write("latents", lkeys[i], {"moments": enc.latents(item["mp4"])},
                        {"num_frames": item["num_frames"], "source": ds.video_paths[i]})
            written += 1
        if store.read("text", tkeys[i]) is None:
            store.write("text", tkeys[i], {"emb": enc.text(ds.captions[i])}, {"caption": ds.captions[i]})
            written += 1
    return written


def prepare_cache(args, data_class, params: dict) -> dict:
    """:func:`_prepare` with every global RNG restored afterwards: building the VAE and T5 to encode draws random
    initial weights, and the engine built next (LoRA factors) must start from the same RNG state whether the
    cache was complete or not."""
    import random

    import numpy as np

    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            return _prepare(args, data_class, params)
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def _prepare(args, data_class, params: dict) -> dict:
    """Make every ``train_data``/``valid_data`` item's entries exist (each rank encodes its share of the missing
    ones), register the cached datasets for ``create_dataset_function`` and switch ``args.model_config`` to the
    stand-ins.  Returns counts: ``videos``, ``found``, ``written``, ``built`` (what was built to encode)."""
    check_supported(args)
    dist = torch.distributed
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    root = os.path.abspath(args.cache_latents)
    os.makedirs(root, exist_ok=True)
    store, prints = CacheStore(root), Fingerprints(root)
    dtype = str(_dtype(args)).replace("torch.", "")
    source = getattr(args, "model_source", None)
    lat = latent_settings(args.model_config, params, dtype, prints, source.vae_files() if source else None)
    txt = text_settings(args.model_config.conditioner_config.params.emb_models[0], dtype, prints)
    enc, found, written, total, datasets = _Encoders(args), 0, 0, 0, {}
    for folder in dict.fromkeys(list(args.train_data or []) + list(args.valid_data or [])):
        ds = data_class(data_dir=folder, **params)
        lkeys, tkeys = _dataset_keys(ds, lat, txt, prints)
        present = [os.path.isfile(store.path("latents", a)) and os.path.isfile(store.path("text", b))
                   for a, b in zip(lkeys, tkeys)]
        if dist.is_initialized():
            dist.barrier()  # every rank has looked before any rank writes
        # each rank checks (reads, verifies) and if needed encodes every world-th item
        written += _fill(ds, store, lkeys, tkeys, range(rank, len(ds), world), enc)
        found += sum(present)
        total += len(ds)
        if dist.is_initialized():
            dist.barrier()
        bad = {i for i, k in enumerate(lkeys) if not os.path.isfile(store.path("latents", k))}
        datasets[folder] = CachedVideoDataset(ds, store, [None if i in bad else k for i, k in enumerate(lkeys)], tkeys)
    if rank == 0:
        prints.save()
    built = list(enc.built)
    del enc
    gc.collect()
    _PREPARED.clear()
    _PREPARED.update(datasets)
    args.model_config = cached_model_config(args.model_config)
    note = "; VAE and T5 not built" if not built else f"; built {', '.join(built)} to encode"
    if rank == 0:
        print(f"latent cache {root}: {found} of {total} videos found, {written} entries written by rank 0{note}",
              flush=True)
    return {"videos": total, "found": found, "written": written, "built": built}


def prepared_dataset(path) -> Optional[CachedVideoDataset]:
    return _PREPARED.get(path)
