"""Conditioning embedders (only the T5 text encoder is used by CogVideoX)."""
