"""Speed and memory options of inference, applied to a built engine from outside the model code.

``options`` (arguments, checks, ``apply``), ``compile`` (regional torch.compile), ``lowbit`` (fp8 / int8 weights),
``offload`` (model / group / sequential placement), ``attention_backends`` (sdpa / flash / sage), ``step_cache``
(TeaCache, First Block Cache) and ``layer_hooks`` (the per-layer entry point they share).  See docs/speed.md.
"""
