"""The CogVideoX 3D causal VAE (original ``sat/vae_modules``): see :mod:`.autoencoder` for the public use.

Modules: ``autoencoder`` (VideoAutoencoderInferenceWrapper and its bases, checkpoint I/O), ``cp_enc_dec``
(encoder, decoder and their blocks), ``regularizers`` (DiagonalGaussianRegularizer), ``context_parallel``
(CP group state and time-axis communication), ``tiling`` (slicing, tiling, frame batching).
"""
from sat_cogvideo.vae_modules.autoencoder import (  # noqa: F401
    VideoAutoencoderInferenceWrapper,
    read_vae_checkpoint,
    save_vae_checkpoint,
)
