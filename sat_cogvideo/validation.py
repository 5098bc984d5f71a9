"""Validation videos and the loss curve while finetuning (``--validation-prompts FILE``; the curve always).

Every ``eval_interval`` iterations the engine samples one video per prompt of ``FILE`` (one prompt a line) with
the training size and frame count (``data.params.video_size`` / ``max_num_frames``), ``--validation-steps``
sampler steps (default: the config's) and seed ``--validation-seed + prompt index``, through the same path as
the original's ``log_video`` (T5 conditioning with the all-zero unconditional context, ``engine.sample``,
``decode_video``), and writes ``<run>/validation/<iteration>/<k>.mp4`` with a ``<k>.png`` preview strip
(:func:`sat_cogvideo.media.write_video` / ``write_preview``) and ``prompts.txt``.  Every rank takes part (under
ZeRO-3 the DiT's weights are gathered collectively); rank ``r`` samples prompts ``r, r+world, ...``, in rounds
of equal count on every rank.  Validation leaves the training RNG untouched (it draws from its own generator
inside ``torch.random.fork_rng``), so a run with validation trains exactly as one without, and resume stays
bit-exact.

``<run>/loss_curve.png`` (drawn with PIL: matplotlib is not a dependency and a line plot needs no more) is
redrawn at every log interval from ``<run>/loss_history.json`` (iteration, loss of rank 0), which a resumed run
continues.
"""
from __future__ import annotations

import json
import os
import random
from typing import List, Optional, Sequence

import numpy as np
import torch

from sat_cogvideo.errors import UserError


def add_validation_args(parser):
    group = parser.add_argument_group("validation", "videos sampled while finetuning (sat_cogvideo.validation)")
    group.add_argument("--validation-prompts", type=str, default=None, metavar="FILE",
                       help="every eval_interval iterations sample one video per line of FILE into <run>/validation/")
    group.add_argument("--validation-steps", type=int, default=None, help="sampler steps (default: the config's)")
    group.add_argument("--validation-seed", type=int, default=42, help="seed of prompt k is this + k")
    return parser


def read_prompts(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise UserError(f"--validation-prompts {path}: no such file (one prompt a line)")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise UserError(f"--validation-prompts {path} holds no prompt (one prompt a line)")
    return prompts


# ------------------------------------------------------------------------------------------------------------
# videos


class Validator:
    """Samples the validation prompts with the training engine (see the module docstring)."""

    def __init__(self, args):
        self.prompts = read_prompts(args.validation_prompts)
        params = args.data_config.get("params") or {}
        self.height, self.width = (int(v) for v in params["video_size"])
        self.frames = int(params["max_num_frames"])
        self.fps = int(params.get("fps", 8))
        self.steps = args.validation_steps
        self.seed = int(args.validation_seed)
        self.interval = int(args.eval_interval or 0)

    def due(self, iteration: int) -> bool:
        return self.interval > 0 and iteration % self.interval == 0

    def run(self, model, folder: str, iteration: int) -> List[str]:
        """Sample every prompt (this rank's share) and write the files; returns the paths this rank wrote."""
        module = model.module if hasattr(model, "module") else model
        dist = torch.distributed
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        out = os.path.join(folder, "validation", f"{iteration:06d}")
        written = []
        was_training = module.training
        module.eval()
        try:
            with torch.random.fork_rng(devices=[]), _python_rng_kept():
                rounds = -(-len(self.prompts) // world)
                for r in range(rounds):
                    k = r * world + rank
                    video = self.sample(module, self.prompts[k % len(self.prompts)], self.seed + k)
                    if k < len(self.prompts):
                        written += self.write(out, k, video)
        finally:
            module.train(was_training)
        if rank == 0:
            from sat_cogvideo.atomic import atomic_write_text

            atomic_write_text(os.path.join(out, "prompts.txt"), "\n".join(self.prompts) + "\n")
        return written

    @torch.no_grad()
    def sample(self, engine, prompt: str, seed: int) -> torch.Tensor:
        """One video ``[F, 3, H, W]`` in [0, 1]."""
        key = engine.conditioner.embedders[0].input_key
        c, uc = engine.conditioner.get_unconditional_conditioning({key: [prompt]}, batch_uc={key: [""]},
                                                                  force_uc_zero_embeddings=[key])
        device = torch.device(engine.device)
        for name in list(c):
            if isinstance(c[name], torch.Tensor):
                c[name], uc[name] = c[name][:1].to(device), uc[name][:1].to(device)
        net = engine.model_config.network_config.params
        shape = (engine.gen.latent_frames(self.frames), int(net.get("out_channels", 16)), self.height // 8,
                 self.width // 8)
        saved_steps = self._set_steps(engine.sampler, self.steps)
        try:
            torch.manual_seed(seed)  # any noise the sampler draws per step (inside fork_rng)
            z = engine.sample(c, uc=uc, batch_size=1, shape=shape,
                              generator=torch.Generator().manual_seed(seed))
        finally:
            self._set_steps(engine.sampler, saved_steps)
        return engine.decode_video(z)[0].float().cpu()

    @staticmethod
    def _set_steps(sampler, steps: Optional[int]) -> Optional[int]:
        if steps is None:
            return None
        old = sampler.num_steps
        sampler.num_steps = int(steps)
        guider = getattr(sampler, "guider", None)
        if guider is not None and hasattr(guider, "num_steps"):
            guider.num_steps = int(steps)
        return old

    def write(self, out: str, k: int, video: torch.Tensor) -> List[str]:
        from sat_cogvideo.media import write_preview, write_video

        path = os.path.join(out, f"{k:02d}.mp4")
        write_video(path, video, fps=self.fps)
        write_preview(os.path.join(out, f"{k:02d}.png"), video)
        return [path, path[:-4] + ".png"]


class _python_rng_kept:
    """Python's and NumPy's global RNG states restored on exit (``fork_rng`` keeps torch's)."""

    def __enter__(self):
        self.py, self.np = random.getstate(), np.random.get_state()

    def __exit__(self, *exc):
        random.setstate(self.py)
        np.random.set_state(self.np)


# ------------------------------------------------------------------------------------------------------------
# the loss curve


class LossCurve:
    """``<run>/loss_history.json`` and ``<run>/loss_curve.png`` (rank 0)."""

    def __init__(self, folder: str, resume_iteration: Optional[int] = None):
        self.folder = folder
        self.history = os.path.join(folder, "loss_history.json")
        self.points: List[list] = []
        if resume_iteration is not None and os.path.isfile(self.history):
            with open(self.history) as f:
                self.points = [p for p in json.load(f) if p[0] <= resume_iteration]

    def add(self, iteration: int, loss: float) -> None:
        self.points.append([int(iteration), float(loss)])

    def flush(self) -> str:
        from sat_cogvideo.atomic import atomic_path, atomic_write_text

        atomic_write_text(self.history, json.dumps(self.points))
        path = os.path.join(self.folder, "loss_curve.png")
        with atomic_path(path, suffix=".png") as tmp:
            draw_curve([p[0] for p in self.points], [p[1] for p in self.points]).save(tmp, format="PNG")
        return path


def draw_curve(steps: Sequence[int], values: Sequence[float], width: int = 640, height: int = 360):
    """A PIL line plot of ``values`` over ``steps`` with min/max labels on both axes."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 70, width - 20, 30, height - 40
    d.rectangle([left, top, right, bottom], outline="black")
    d.text((left, 8), "training loss", fill="black")
    if not values:
        return img
    s0, s1 = min(steps), max(steps)
    v0, v1 = min(values), max(values)
    span_s, span_v = max(s1 - s0, 1), (v1 - v0) or max(abs(v1), 1e-12)

    def xy(s, v):
        return (left + (s - s0) / span_s * (right - left), bottom - (v - v0) / span_v * (bottom - top))

    points = [xy(s, v) for s, v in zip(steps, values)]
    if len(points) > 1:
        d.line(points, fill=(31, 119, 180), width=2)
    for p in points:
        d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=(31, 119, 180))
    d.text((4, top - 6), f"{v1:.4g}", fill="black")
    d.text((4, bottom - 6), f"{v0:.4g}", fill="black")
    d.text((left, bottom + 6), str(s0), fill="black")
    d.text((right - 40, bottom + 6), str(s1), fill="black")
    d.text(((left + right) // 2 - 25, bottom + 20), "iteration", fill="black")
    return img


# ------------------------------------------------------------------------------------------------------------
# the hook in SAT's loop


def after_train_step(state, model, args, loss) -> None:
    """Called by ``train_video`` after each optimizer step (``args.iteration`` not yet advanced): record the loss
    (rank 0), redraw the curve at log intervals, sample the validation videos when due."""
    iteration = int(args.iteration) + 1
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if rank0 and args.save:
        if state.curve is None:
            resume = state.resume
            state.curve = LossCurve(args.save, int(resume["iteration"]) if resume is not None else None)
        state.curve.add(iteration, float(loss))
        if args.log_interval and iteration % int(args.log_interval) == 0:
            state.curve.flush()
    validator = state.validator
    if validator is not None and args.save and validator.due(iteration):
        paths = validator.run(model, args.save, iteration)
        if rank0:
            print(f"validation at iteration {iteration}: {len(paths) // 2} video(s) in "
                  f"{os.path.join(args.save, 'validation', f'{iteration:06d}')}", flush=True)
