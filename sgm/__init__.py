"""The subset of Stability AI's generative-models (``sgm``) that CogVideoX uses, rebuilt."""
