"""Time one training step (forward + backward + Adam, batch 128) of MNISTconv a4w2 vs full precision.

    flock /tmp/qrobust-heavy.lock env OMP_NUM_THREADS=2 python benchmarks/bench_train_step.py

Both models are timed in the same process with interleaved repetitions (FP, a4w2, FP, a4w2, ...),
so a busy machine slows both alike; the figure of merit is the ratio of the medians (goal <= 1.5x).
Peak memory is the peak resident set size of a fresh child process during 20 steps of one model,
and its excess over the RSS before the first step (on CUDA: ``torch.cuda.max_memory_allocated``).
Results go to the "train-step" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qrobust.models import create_model
from qrobust.train import TrainConfig, make_optimizer
from qrobust.utils import resolve_device, update_marked_section

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"fp": {}, "a4w2": {"wbits": 2, "abits": 4}}
GOAL = 1.5


def make_step(name: str, batch: int, device: torch.device, seed: int = 0):
    """A closure running one full training step on a fixed random batch of digits-like pixels."""
    torch.manual_seed(seed)
    model = create_model("mnistconv", **VARIANTS[name]).to(device).train()
    opt = make_optimizer(model, TrainConfig(lr=1e-3))  # the optimizer qrobust.train uses (fused Adam)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, 28, 28, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


_MEMORY_PROBE = """
import sys, torch
sys.path.insert(0, {here!r})
from bench_train_step import make_step

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return float(line.split()[1]) / 1024

dev = torch.device({device!r})
step = make_step({name!r}, {batch}, dev)
with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (VmHWM) to the current RSS
    fh.write("5")
base = status("VmRSS")
for _ in range(20):
    step()
if dev.type == "cuda":
    print(torch.cuda.max_memory_allocated() / 2**20, 0.0)
else:
    print(status("VmHWM"), base)
"""


def peak_memory_mb(name: str, batch: int, device: torch.device) -> tuple[float, float]:
    """(peak RSS during 20 steps, RSS before the first step) in MB, in a fresh process (Linux /proc)."""
    code = _MEMORY_PROBE.format(here=str(Path(__file__).parent), device=str(device), name=name, batch=batch)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak, base = map(float, out.stdout.split())
    return peak, base


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=30, help="timed steps per model (interleaved)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    ap.add_argument("--no-write", action="store_true", help="print only, do not update docs")
    ap.add_argument("--note", default="", help="a remark on the run conditions, recorded in the docs")
    args = ap.parse_args()
    device = resolve_device(args.device)
    steps = {name: make_step(name, args.batch, device) for name in VARIANTS}
    for _ in range(args.warmup):
        for s in steps.values():
            s()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for rep in range(args.reps):
        order = list(VARIANTS) if rep % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    q = {name: statistics.quantiles(t, n=4) for name, t in times.items()}
    ratio = med["a4w2"] / med["fp"]
    mem = {name: peak_memory_mb(name, args.batch, device) for name in VARIANTS}
    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    result = {"median_s": med, "ratio": ratio, "peak_mb": mem, "reps": args.reps, "batch": args.batch,
              "threads": threads}
    print(json.dumps(result, indent=2))
    rows = ["| model | median step (ms) | IQR (ms) | images/s | peak RSS, steps (MB) | above pre-step (MB) |",
            "|---|---|---|---|---|---|"]
    for name in VARIANTS:
        rows.append(f"| MNISTconv {name} | {1e3 * med[name]:.1f} | "
                    f"{1e3 * q[name][0]:.1f}–{1e3 * q[name][2]:.1f} | {args.batch / med[name]:.0f} | "
                    f"{mem[name][0]:.0f} | {mem[name][0] - mem[name][1]:.0f} |")
    mem_kind = ("CUDA max allocated" if device.type == "cuda" else
                "peak RSS (VmHWM, reset after setup via /proc/self/clear_refs) of a fresh process during "
                "20 steps, and its excess over the RSS just before the first step")
    body = "\n".join([
        "## Training step: MNISTconv a4w2 vs full precision",
        "",
        "Command: `flock /tmp/qrobust-heavy.lock env OMP_NUM_THREADS=2 python "
        "benchmarks/bench_train_step.py`",
        "",
        f"Protocol: one step = zero_grad + forward + cross-entropy + backward + Adam, batch {args.batch} of "
        f"random 28x28 pixels; {args.warmup} warm-up steps, then {args.reps} timed steps per model, "
        "interleaved (FP, a4w2, a4w2, FP, ...) in one process; median and interquartile range. Device "
        f"{device}, {threads} threads, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}. Memory: {mem_kind}. The machine is shared, so "
        "absolute times vary; the ratio is the figure of merit."
        + (f" Note: {args.note}" if args.note else ""),
        "",
        *rows,
        "",
        f"**Ratio a4w2 / FP (median step time): {ratio:.2f}x** (goal <= {GOAL}x: "
        f"{'met' if ratio <= GOAL else 'missed'}).",
    ])
    if not args.no_write:
        update_marked_section(args.out, "train-step", body, title="Benchmarks")
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
