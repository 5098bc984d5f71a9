"""The GPU check: everything we want to know the first time a CUDA GPU is at hand, in one bounded run.

Parts (each guards itself: its own time budget, out-of-memory and errors reported as rows; the report is rewritten
after every row, so a killed run keeps what it measured):

1. ``tests``: ``pytest -m cuda`` (``tests/test_cuda.py``: device placement, bf16/fp16, the 5B float16 warning, SDPA's
   fused kernel, nccl for world size 1, offload);
2. ``dit``: one full-size random-weight DiT step (CFG batch 2) of 2B (fp16, 49 frames), 5B (bf16, 49 frames) and
   1.5 (bf16, 81 frames): ours vs diffusers' ``CogVideoXTransformer3DModel`` holding our converted weights, same
   process: ms/step, peak memory, achieved TFLOP/s against the FLOP count, the projected 50-step DiT time against
   the published pipeline times and the FLOP floors;
3. ``vae``: decode of 13 latents at 480x720 (1.0) and 21 at 768x1360 (1.5), tiled and untiled, ours vs diffusers;
4. ``accel``: the 5B step with each speed option (``--compile``, ``--weights-dtype``, ``--cache``) found at run time;
5. ``multi``: with >= 2 GPUs, the multi-GPU check of ``sat_cogvideo.parallel`` when it exists.

Weights are random (nothing is downloaded) and built on the GPU.  ``--dry-run`` runs the same code on the CPU at
the tiny config sizes (``configs/tiny``), which the test suite does.  Writes ``gpu_check.json`` and
``gpu_check.md`` under ``--out`` and prints the table.

    bash benchmarks/gpu_check.sh --out gpu-report [--budget 480] [--parts dit,vae] [--wheels DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

PARTS = ("tests", "dit", "vae", "accel", "multi")
# Share of the budget of each part (seconds of the default 480-second budget); unused time passes on.
SHARES = {"tests": 60, "dit": 170, "vae": 125, "accel": 95, "multi": 30}


class PartTimeout(Exception):
    """The part's time budget ran out (raised by SIGALRM between Python operations)."""


class Report:
    """Rows per part, written as JSON and markdown after every row."""

    def __init__(self, out_dir: str, meta: dict):
        self.out_dir, self.meta, self.rows = out_dir, meta, []
        os.makedirs(out_dir, exist_ok=True)

    def add(self, part: str, row: dict):
        self.rows.append(dict(part=part, **row))
        self.write()

    def markdown(self) -> str:
        lines = [f"# GPU check ({self.meta.get('device_name')}, torch {self.meta.get('torch')}"
                 f"{', DRY RUN (CPU, tiny sizes)' if self.meta.get('dry_run') else ''})", ""]
        for part in PARTS:
            rows = [r for r in self.rows if r["part"] == part]
            if not rows:
                continue
            cols = []
            for r in rows:
                cols += [k for k in r if k != "part" and k not in cols]
            lines += [f"## {part}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
            lines.append("")
        return "\n".join(lines)

    def write(self):
        data = {"meta": self.meta, "rows": self.rows}
        for name, text in (("gpu_check.json", json.dumps(data, indent=1)), ("gpu_check.md", self.markdown())):
            tmp = os.path.join(self.out_dir, f".{name}.tmp")
            with open(tmp, "w") as f:
                f.write(text + "\n")
            os.replace(tmp, os.path.join(self.out_dir, name))


def _cell(v) -> str:
    return "" if v is None else str(v).replace("|", "/").replace("\n", " ")


def meta_info(args) -> dict:
    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    mods = {}
    for name in ("sat", "diffusers", "omegaconf", "deepspeed"):
        if name == "deepspeed":  # not imported (slow, and the check does not use it): where it would come from
            import importlib.util

            spec = importlib.util.find_spec(name)
            mods[name] = f"found ({os.path.dirname(spec.origin)})" if spec else "missing (not installed)"
            continue
        try:
            mod = __import__(name)
            mods[name] = f"{getattr(mod, '__version__', '?')} ({os.path.dirname(mod.__file__)})"
        except Exception as err:  # noqa: BLE001 - recorded, not fatal
            mods[name] = f"missing ({type(err).__name__})"
    return {"dry_run": args.dry_run, "torch": torch.__version__, "python": platform.python_version(),
            "device_name": torch.cuda.get_device_name(0) if cuda else "cpu",
            "gpus": torch.cuda.device_count() if cuda else 0, "budget_s": args.budget, "modules": mods,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "command": " ".join(["benchmarks/gpu_check.sh"] + (args.argv or [])),
            "wheels_target": os.environ.get("GPU_CHECK_WHEELS_TARGET"),
            "wheels_installed": os.environ.get("GPU_CHECK_WHEELS_INSTALLED", "").split(),
            "wheels_located": located_wheels()}


def located_wheels() -> dict:
    """Where each distribution installed from ``--wheels`` is imported from (the temporary target, normally)."""
    import importlib.metadata as md

    found = {}
    for wheel in os.environ.get("GPU_CHECK_WHEELS_INSTALLED", "").split():
        name = wheel.split("-")[0]
        try:
            found[name] = os.path.normpath(str(md.distribution(name).locate_file("")))
        except md.PackageNotFoundError:
            found[name] = None
    return found


def run_part(part: str, args, report: Report, deadline: float):
    """One part with its deadline enforced by SIGALRM; anything it lets through becomes a row."""
    import torch

    import gpu_parts as P

    device = torch.device("cpu" if args.dry_run else args.device)
    ctx = P.Ctx(device=device, dry=args.dry_run, deadline=deadline, report=report, part=part,
                repeats=0 if args.dry_run else args.repeats)

    def on_alarm(signum, frame):
        raise PartTimeout(f"part {part} ran past its {deadline - start:.0f} s budget")

    start = time.monotonic()
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, deadline - start + 30))  # +30 s: the part stops itself first
    try:
        fn = {"tests": P.part_tests, "dit": P.part_dit, "vae": P.part_vae, "accel": P.part_accel,
              "multi": lambda c: P.part_multi(c, args.out)}[part]
        fn(ctx)
    except BaseException as err:  # noqa: BLE001 - PartTimeout, OOM outside a row, anything: one row, go on
        if isinstance(err, KeyboardInterrupt):
            raise
        status = "timeout" if isinstance(err, PartTimeout) else ("oom" if P.is_oom(err) else "error")
        report.add(part, {"check": f"part {part}", "status": status, "note": f"{type(err).__name__}: {err}"[:300]})
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        P.free(device)


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for all parts together (default 480)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds per measurement after one warm-up")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks that the script runs")
    args = ap.parse_args(argv)
    args.argv = list(argv)
    bad = [p for p in args.parts.split(",") if p not in PARTS]
    if bad or args.budget <= 0:
        ap.error(f"unknown part(s) {', '.join(bad)}" if bad else "--budget must be > 0")
    return args


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.dry_run:  # tiny tensors: one thread is as fast and does not fight a busy machine's other processes
        import torch

        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"  # for the pytest child
    t_end = time.monotonic() + args.budget
    report = Report(args.out, meta_info(args))
    parts = [p for p in PARTS if p in args.parts.split(",")]
    for i, part in enumerate(parts):
        left = t_end - time.monotonic()
        shares = sum(SHARES[p] for p in parts[i:])
        t0, c0 = time.monotonic(), time.process_time()
        run_part(part, args, report, time.monotonic() + max(0.0, left) * SHARES[part] / shares)
        report.meta.setdefault("part_seconds", {})[part] = [round(time.monotonic() - t0, 1),
                                                             round(time.process_time() - c0, 1)]
    report.meta["seconds"] = round(args.budget - (t_end - time.monotonic()), 1)
    report.write()
    print(report.markdown())
    print(f"written: {os.path.join(args.out, 'gpu_check.json')}, {os.path.join(args.out, 'gpu_check.md')}")
    bad = [r for r in report.rows if r["status"] in ("error", "failed")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
