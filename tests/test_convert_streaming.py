"""Streaming conversion: safetensors files written tensor by tensor, sharding, atomic output, and peak memory.

The peak-RSS test converts a synthetic SAT checkpoint of ~300 MB (a RoPE model with hidden 1024, made from a
random diffusers transformer through our key map) in a subprocess and reads its peak resident memory
(``VmHWM`` of ``/proc/self/status``; ``resource.getrusage``'s ``ru_maxrss`` is kept across ``execve``, so in
a child of pytest it reports pytest's own peak): the growth over the interpreter's memory after imports must stay under 1.5x the
checkpoint file (the tensors are memory-mapped and written one at a time; a dict-based conversion needs >= 2x).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from sat_cogvideo.convert.safetensors_io import (StreamingShardWriter, PlannedTensor, open_safetensors,
                                                 open_weights_folder, parse_size, write_streaming)
from sat_cogvideo.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=gen),
        "b.bias": torch.randn(3, generator=gen).to(torch.bfloat16),
        "c.half": torch.randn(2, 2, 2, generator=gen).half(),
        "d.int": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.scalar": torch.tensor(1.5),
        "f.empty": torch.zeros(0, 4),
    }


def test_streaming_writer_is_read_back_by_safetensors(tmp_path):
    ts = _tensors()
    files = write_streaming(str(tmp_path), [(ts, lambda d: {k: v.clone() for k, v in d.items()})], prefix="m",
                            max_shard_size="1GB")
    assert files == ["m.safetensors"]
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(ts)
        for k, v in ts.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and torch.equal(got, v), k
    raw = (tmp_path / "m.safetensors").read_bytes()
    assert int.from_bytes(raw[:8], "little") % 8 == 0  # header padded to 8 bytes
    back = open_safetensors(str(tmp_path / "m.safetensors"))  # our zero-copy reader
    assert all(torch.equal(back[k], v) for k, v in ts.items())


def test_sharding_index_and_cast(tmp_path):
    ts = {f"layer.{i}.weight": torch.full((10, 10), float(i)) for i in range(5)}  # 400 bytes each in float32
    ts["small"] = torch.ones(3)
    # cast to fp16 -> 200 bytes each; 450-byte shards hold two layers
    files = write_streaming(str(tmp_path), [(ts, dict)], prefix="diffusion_pytorch_model", max_shard_size=450,
                            dtype=torch.float16)
    assert files == [f"diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.load(open(tmp_path / "diffusion_pytorch_model.safetensors.index.json"))
    assert index["metadata"]["total_size"] == 5 * 200 + 6
    assert set(index["weight_map"]) == set(ts) and set(index["weight_map"].values()) == set(files)
    back = open_weights_folder(str(tmp_path), "diffusion_pytorch_model")
    assert all(back[k].dtype == torch.float16 and torch.equal(back[k], v.half()) for k, v in ts.items())
    for name in files:  # every shard is a valid file on its own
        with safe_open(str(tmp_path / name), framework="pt") as f:
            assert all(index["weight_map"][k] == name for k in f.keys())


def test_writer_checks_plan_order_and_sizes(tmp_path):
    w = StreamingShardWriter(str(tmp_path), [PlannedTensor("x", (2,), torch.float32)], prefix="p")
    with pytest.raises(RuntimeError, match="expected x"):
        w.write("y", torch.zeros(2))
    assert parse_size("5GB") == 5 * 10 ** 9 and parse_size("200KB") == 200_000 and parse_size(123) == 123
    with pytest.raises(UserError, match="not a size"):
        parse_size("lots")
    with pytest.raises(UserError, match="not a safetensors file"):
        (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
        open_safetensors(str(tmp_path / "bad.safetensors"))


def test_atomic_folder_keeps_existing_output_on_failure(tmp_path):
    from sat_cogvideo.convert.pipeline import AtomicFolder

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(UserError, match="already exists"):
        AtomicFolder(str(out))
    with pytest.raises(ZeroDivisionError):
        with AtomicFolder(str(out), overwrite=True) as tmp:
            open(os.path.join(tmp, "new.txt"), "w").write("new")
            1 / 0
    assert (out / "keep.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # temporary removed
    with AtomicFolder(str(out), overwrite=True) as tmp:
        open(os.path.join(tmp, "new.txt"), "w").write("new")
    assert sorted(os.listdir(out)) == ["new.txt"] and sorted(os.listdir(tmp_path)) == ["out"]


_CHILD = r"""
import json, resource, sys, time
import torch
from sat_cogvideo.convert import pipeline  # noqa: imports done before the baseline
from diffusers import CogVideoXTransformer3DModel, CogVideoXDDIMScheduler  # noqa (diffusers imports lazily)
import sat_cogvideo.convert.transformer, sat_cogvideo.families, sat_cogvideo.checkpoint  # noqa
def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
base = status_mb("VmRSS")
t = time.time()
pipeline.convert_sat_to_diffusers(sys.argv[2], transformer_ckpt_path=sys.argv[1], max_shard_size="100MB",
                                  log=lambda m: None)
# getrusage's ru_maxrss survives execve (it would report the pytest parent's peak): use the kernel's per-process
# high-water mark VmHWM, and report ru_maxrss beside it
print(json.dumps({"base_mb": base, "peak_mb": status_mb("VmHWM"), "seconds": time.time() - t,
                  "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _synthetic_checkpoint(path, hidden=1024, layers=4):
    from diffusers import CogVideoXTransformer3DModel
    from sat_cogvideo.convert.transformer import SAT_PREFIX, diffusers_to_sat_transformer

    heads = hidden // 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CogVideoXTransformer3DModel(num_attention_heads=heads, attention_head_dim=64, num_layers=layers,
                                            use_rotary_positional_embeddings=True, text_embed_dim=1024)
    hf = {k: v.detach().clone() for k, v in model.state_dict().items()}
    del model
    sd = diffusers_to_sat_transformer(hf, prefix=SAT_PREFIX)
    sd[SAT_PREFIX + "transformer.position_embeddings.weight"] = torch.zeros(64, hidden)
    torch.save({"module": sd}, path)
    return hf


def test_peak_rss_of_streaming_conversion(tmp_path):
    ckpt = tmp_path / "synthetic.pt"
    hf = _synthetic_checkpoint(ckpt)
    size_mb = os.path.getsize(ckpt) / 2 ** 20
    assert 200 < size_mb < 600, size_mb
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(ckpt), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = stats["peak_mb"] - stats["base_mb"]
    print(f"checkpoint {size_mb:.0f} MB, peak RSS {stats['peak_mb']:.0f} MB, after imports {stats['base_mb']:.0f} MB,"
          f" growth {growth:.0f} MB = {growth / size_mb:.2f}x, {stats['seconds']:.1f} s")
    assert growth < 1.5 * size_mb, stats
    # the output is sharded at 100 MB and equals the transformer the checkpoint was made from, bit for bit
    out = tmp_path / "out" / "transformer"
    assert len([n for n in os.listdir(out) if n.endswith(".safetensors")]) >= 3
    back = open_weights_folder(str(out), "diffusion_pytorch_model")
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)
    cfg = json.load(open(out / "config.json"))
    assert (cfg["num_attention_heads"], cfg["num_layers"], cfg["text_embed_dim"]) == (16, 4, 1024)
