"""Declarative two-way key maps between SAT checkpoints and diffusers models.

* :mod:`sat_cogvideo.convert.transformer` — the DiT (``DiffusionTransformer`` <-> ``CogVideoXTransformer3DModel``);
* :mod:`sat_cogvideo.convert.vae` — the 3D VAE.

Submodules are imported on use, so importing this package stays cheap.
"""
