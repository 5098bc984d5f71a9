"""benchmarks/gpu_check.sh and gpu_wheels.sh without a GPU: the dry run (same script, CPU, tiny sizes) with an
offline wheel install, the FLOP counts against the published floors, models built on the target device, the time
budget and out-of-memory rows; the real wheel download (slow: network)."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from helpers import PY, ROOT, clean_env

BENCH = os.path.join(ROOT, "benchmarks")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)


def make_wheel(folder, name="gpu_check_probe", version="1.0") -> str:
    """A minimal pure-Python wheel (one module, valid RECORD), as ``pip wheel`` would write it."""
    files = {f"{name}/__init__.py": b"VALUE = 42\n",
             f"{name}-{version}.dist-info/METADATA":
                 f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                  b"Tag: py3-none-any\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
              f"{len(data)}" for path, data in files.items()]
    files[f"{name}-{version}.dist-info/RECORD"] = ("\n".join(record + [f"{name}-{version}.dist-info/RECORD,,"])
                                                   + "\n").encode()
    path = os.path.join(folder, f"{name}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        for p, data in files.items():
            z.writestr(p, data)
    return path


def run_check(out, *extra, env=None, timeout=600):
    cmd = ["bash", os.path.join(BENCH, "gpu_check.sh"), "--dry-run", "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env or clean_env(PYTHON=PY), capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_with_offline_wheel_install(tmp_path):
    """The whole check at tiny sizes on the CPU, after installing a wheel offline into a temporary target: every part
    reports, ours equals diffusers (float32), the table is printed and written, the target is removed at exit."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(str(wheels))
    out = tmp_path / "report"
    proc = run_check(out, "--wheels", str(wheels))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "gpu_check.json").read_text())
    rows = data["rows"]
    by_part = {p: [r for r in rows if r["part"] == p] for p in ("tests", "dit", "vae", "accel", "multi")}
    assert by_part["tests"][0]["status"] == "ok" and "collected" in by_part["tests"][0]["note"]
    assert [r["status"] for r in by_part["dit"]] == ["ok"] * 3
    assert {r["check"].split()[0] for r in by_part["dit"]} == {"cogvideox-2b", "cogvideox-5b", "cogvideox1.5-5b"}
    assert [r["status"] for r in by_part["vae"]] == ["ok"] * 2
    for r in by_part["dit"] + by_part["vae"]:
        assert r["max_rel_err"] < 1e-5, r  # same weights, float32: ours and diffusers agree
        assert r["time_ratio"] > 0
    assert by_part["accel"] and all(r["status"] in ("ok", "skipped", "not available") for r in by_part["accel"])
    assert by_part["multi"][0]["status"] in ("not available", "skipped")
    assert data["meta"]["dry_run"] and data["meta"]["wheels_installed"] == ["gpu_check_probe-1.0-py3-none-any.whl"]
    target = data["meta"]["wheels_target"]
    assert data["meta"]["wheels_located"] == {"gpu_check_probe": target}
    assert not os.path.exists(target)  # removed at exit
    md = (out / "gpu_check.md").read_text()
    assert "## dit" in md and "| cogvideox-5b float32" in md and md.strip() in proc.stdout


def test_missing_wheel_folder_is_one_error_line(tmp_path):
    proc = run_check(tmp_path / "o", "--wheels", str(tmp_path / "nope"))
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --wheels")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_flop_counts_give_the_published_floors():
    """50 CFG steps at 990 TF/s: 12.1 s (2B), 33.6 s (5B), 149 s (1.5, 81 frames), from the configs' full sizes."""
    import gpu_parts
    from gpu_models import family_config

    from sat_cogvideo.families import FAMILIES

    for name, floor in (("cogvideox-2b", 12.1), ("cogvideox-5b", 33.6), ("cogvideox1.5-5b", 149.0)):
        family = FAMILIES[name]
        cfg = family_config(family, tiny=False)
        (t, h, w), text = gpu_parts.dit_shape(family, cfg, dry=False)
        seconds = 50 * gpu_parts.dit_flops(cfg.network_config.params, t, h, w, text) / 990e12
        assert abs(seconds - floor) / floor < 0.01, (name, seconds)
        assert gpu_parts.ANCHORS[name]["floor_s"] == floor


def test_models_are_built_on_the_target_device(dist_cpu):
    """SAT names device='cpu' for its linears: OnDevice still puts every tensor of the DiT and the VAE on the target
    (meta here, CUDA in the check)."""
    from gpu_models import OnDevice, family_config, vae_config_without_checkpoint

    from sat_cogvideo.families import FAMILIES
    from sgm.util import instantiate_from_config

    cfg = family_config(FAMILIES["cogvideox-5b"], tiny=True)
    with OnDevice("meta"):
        dit = instantiate_from_config(cfg.network_config)
        vae = instantiate_from_config(vae_config_without_checkpoint(cfg.first_stage_config))
    for model in (dit, vae):
        devices = {t.device.type for t in list(model.parameters()) + list(model.buffers())}
        assert devices == {"meta"}
    assert {p.device.type for p in instantiate_from_config(cfg.network_config).parameters()} == {"cpu"}


def test_budget_and_out_of_memory_become_rows(tmp_path, monkeypatch):
    """A family that runs out of memory is an ``oom`` row and the next family still runs; a spent budget gives
    ``skipped`` rows, not an abort."""
    import gpu_check
    import gpu_parts

    calls = []

    def fake_row(ctx, family, dtype):
        calls.append(family.name)
        if family.name == "cogvideox-5b":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        ctx.add(check=family.name, status="ok")

    monkeypatch.setattr(gpu_parts, "dit_row", fake_row)
    # the dry run sets one thread and OMP_NUM_THREADS=1 for its children: give both back to the later tests (an
    # OMP_NUM_THREADS=1 left behind made `nproc` give the local SLURM node one CPU, and 2-task jobs never started)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # monkeypatch puts the original back at teardown
    threads = torch.get_num_threads()
    try:
        _two_dry_runs(gpu_check, tmp_path, calls)
    finally:
        torch.set_num_threads(threads)


def _two_dry_runs(gpu_check, tmp_path, calls):
    gpu_check.main(["--dry-run", "--out", str(tmp_path / "a"), "--parts", "dit"])
    rows = json.loads((tmp_path / "a" / "gpu_check.json").read_text())["rows"]
    assert calls == ["cogvideox-2b", "cogvideox-5b", "cogvideox1.5-5b"]
    assert [r["status"] for r in rows] == ["ok", "oom", "ok"] and "20.00 GiB" in rows[1]["note"]
    calls.clear()
    gpu_check.main(["--dry-run", "--out", str(tmp_path / "b"), "--parts", "dit", "--budget", "1e-9"])
    rows = json.loads((tmp_path / "b" / "gpu_check.json").read_text())["rows"]
    assert calls == [] and [r["status"] for r in rows] == ["skipped"] * 3


def bare_site(folder) -> str:
    """A folder of links to what the bare GPU machine has (torch, numpy, einops, imageio, transformers,
    sentencepiece, safetensors, peft, huggingface_hub, with their dependencies, plus pip and triton), taken from
    this environment; ``python -S`` with only it on the path sees nothing else."""
    import importlib.metadata as md
    import re

    todo = ["torch", "numpy", "einops", "imageio", "transformers", "sentencepiece", "safetensors", "peft",
            "huggingface_hub", "triton", "pip"]
    seen = set()
    os.makedirs(folder, exist_ok=True)
    site = os.path.dirname(os.path.dirname(torch.__file__))
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        todo += [re.split(r"[ ;<>=!~\[(]", r)[0] for r in dist.requires or [] if "extra ==" not in r]
        for top in {str(f).split("/")[0] for f in dist.files or []} - {"..", "__pycache__", "bin"}:
            src, dst = os.path.join(site, top), os.path.join(folder, top)
            if os.path.exists(src) and not os.path.lexists(dst):
                os.symlink(src, dst)
    return folder


@pytest.mark.slow  # downloads ~13 MB from the package index
def test_wheels_download_and_install_offline(tmp_path):
    """gpu_wheels.sh fetches <= 60 MB; on a 'bare machine' (only the packages the GPU machine has), gpu_check.sh
    --wheels installs them offline and the dry run imports SAT, diffusers and omegaconf from the temporary target."""
    wheels = tmp_path / "wheels"
    proc = subprocess.run(["bash", os.path.join(BENCH, "gpu_wheels.sh"), str(wheels)], cwd=ROOT,
                          env=clean_env(PYTHON=PY), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    size = sum(os.path.getsize(wheels / f) for f in os.listdir(wheels))
    assert size <= 60 * 2**20, size
    bare = bare_site(str(tmp_path / "bare"))
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec "{PY}" -S "$@"\n')
    python.chmod(0o755)
    out = tmp_path / "report"
    env = clean_env(PYTHON=str(python), PYTHONPATH=bare)
    proc = run_check(out, "--wheels", str(wheels), "--parts", "tests,dit", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    meta = json.loads((out / "gpu_check.json").read_text())["meta"]
    for mod in ("sat", "diffusers", "omegaconf"):
        assert meta["modules"][mod].split("(")[1].startswith(meta["wheels_target"]), meta["modules"]
    assert meta["modules"]["deepspeed"].startswith("missing")


@pytest.mark.slow  # two torchrun processes (gloo) with their imports: ~20 s of CPU
def test_multi_gpu_script_on_two_cpu_processes(tmp_path):
    """gpu_multi.py (the multi-GPU part) at tiny size on 2 gloo processes: sequence parallel and CFG parallel give
    the one-process output (float32, <= 1e-5)."""
    out = tmp_path / "rows.json"
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(BENCH, "gpu_multi.py"), "--out", str(out), "--dry-run", "--repeats", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(PYTHONPATH=ROOT, OMP_NUM_THREADS=1), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["check"] for r in rows] == ["cogvideox-5b --sp-size 2 on 2 ranks",
                                          "cogvideox-5b --cfg-parallel --sp-size 1 on 2 ranks"]
    assert all(r["status"] == "ok" and r["max_rel_err"] <= 1e-5 and r["speedup"] > 0 for r in rows), rows
