"""``python tests/train_seeded_per_sample.py ARGS`` = ``python tests/train_final_state.py ARGS``, except that the
random draws of each training sample's loss (timestep, noise) are seeded from its caption.

Then a sample's loss and gradient do not depend on which process, micro-batch or batch position it is in, and
runs that split the same global batch differently (2 processes × batch 1, 1 process × batch 2, 1 process × batch 1
× 2 accumulation steps) must end with the same weights: test_train.py compares them.  Each sample's caption and
the process rank are printed (``sample rank=R: caption``).
"""
import os
import random
import sys
import zlib

import numpy as np
import torch


def seeded_shared_step(real):
    def shared_step(self, batch):
        texts = list(batch["txt"])
        n = len(texts)
        losses = []
        for i, text in enumerate(texts):
            sub = {}
            for key, value in batch.items():
                if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == n:
                    sub[key] = value[i:i + 1]
                elif isinstance(value, (list, tuple)) and len(value) == n:
                    sub[key] = [value[i]]
                else:
                    sub[key] = value
            seed = zlib.crc32(text.encode("utf-8"))
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            print(f"sample rank={os.environ.get('RANK', '0')}: {text}", flush=True)
            loss, _ = real(self, sub)
            losses.append(loss)
        loss = torch.stack(losses).mean()
        return loss, {"loss": loss}

    return shared_step


if __name__ == "__main__":
    from sat_cogvideo import diffusion_video
    from train_final_state import main  # this folder; dumps SAT_COGVIDEO_FINAL_STATE

    engine = diffusion_video.SATVideoDiffusionEngine
    engine.shared_step = seeded_shared_step(engine.shared_step)
    sys.exit(main(sys.argv[1:]))
