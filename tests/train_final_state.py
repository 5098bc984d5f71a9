"""``python tests/train_final_state.py ARGS`` = ``python -m sat_cogvideo.train_video ARGS``, then, when the
environment names a file in ``SAT_COGVIDEO_FINAL_STATE``, rank 0 writes the trained engine's whole state dict
(VAE and T5 included) there: the tests compare runs by it (and ``SAT_COGVIDEO_BATCH_SHAPES`` records batch
shapes).  A test-only hook; the CLI knows nothing of it."""
import os
import sys

import torch

FINAL_STATE = "SAT_COGVIDEO_FINAL_STATE"


def dump_final_state(engine, path) -> None:
    """Rank 0 saves every tensor of ``engine`` (a DeepSpeed engine or the module itself) to ``path``."""
    if engine is None or torch.distributed.get_rank() != 0:
        return
    module = engine.module if hasattr(engine, "module") else engine
    torch.save({k: v.detach().cpu().clone() for k, v in module.state_dict().items()}, path)


def record_batch_shapes(path) -> None:
    """Append the pixel (or cached latent) shape of every training batch to ``path``, one JSON list per line."""
    import json

    from sat_cogvideo.diffusion_video import SATVideoDiffusionEngine

    shared_step = SATVideoDiffusionEngine.shared_step

    def recording(self, batch):
        with open(path, "a") as f:
            f.write(json.dumps(list(batch["mp4"].shape)) + "\n")
        return shared_step(self, batch)

    SATVideoDiffusionEngine.shared_step = recording


def main(argv=None) -> int:
    """Train as the CLI does (its error handling included) and dump the final state when asked to; with
    ``SAT_COGVIDEO_BATCH_SHAPES=FILE`` also record the shape of each training batch there."""
    from sat_cogvideo import train_video
    from sat_cogvideo.errors import run_cli

    if os.environ.get("SAT_COGVIDEO_BATCH_SHAPES"):
        record_batch_shapes(os.environ["SAT_COGVIDEO_BATCH_SHAPES"])

    @run_cli
    def train(args) -> int:
        engine = train_video.run(args)
        if os.environ.get(FINAL_STATE):
            dump_final_state(engine, os.environ[FINAL_STATE])
        return 0

    return train(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
