"""sgm modules used by CogVideoX.  ``sgm.modules.GeneralConditioner`` is the name the configs use."""


def __getattr__(name):
    # imported lazily so that importing the diffusion modules does not import transformers
    if name == "GeneralConditioner":
        from sgm.modules.encoders.modules import GeneralConditioner

        return GeneralConditioner
    raise AttributeError(f"module 'sgm.modules' has no attribute {name!r}")


__all__ = ["GeneralConditioner"]
