"""Training throughput (img/s) of the recipe zoo's model families, one training step at a time.

    OMP_NUM_THREADS=1 nice -n 10 flock /tmp/qrobust-heavy.lock python benchmarks/bench_train_step.py

One step is what ``qrobust.train`` does per batch: gather a shuffled batch of uint8 images, scale it to
[0, 1], forward, loss, backward, Adam (``qrobust.train.train_step``). The five models are timed in one
process with interleaved repetitions (each round visits every model, in alternating order), so a busy
machine slows them alike. One thread, as the zoo recipes train. ``--baseline-src DIR`` also times the
models of an older qrobust (``DIR/qrobust``, e.g. ``git archive <commit> src``) in the same rounds, in
its NCHW layout, so a speed-up is measured under the same load:

    git archive 50708a6 src | tar -x -C /tmp/base
    OMP_NUM_THREADS=1 python benchmarks/bench_train_step.py --baseline-src /tmp/base/src

Results go to the "train-step" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qrobust.data import Split
from qrobust.models import create_model
from qrobust.train import TrainConfig, make_optimizer, to_training_layout, train_step
from qrobust.utils import resolve_device, update_marked_section

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Variant:
    model: str
    kwargs: dict = field(default_factory=dict)
    batch: int = 128
    smoothing: float = 0.0


# The recipes' batch sizes: EMPIR 128 (CIFAR with label smoothing 0.1), QNN-defense 64.
VARIANTS = {
    "MNISTconv FP": Variant("mnistconv"),
    "MNISTconv a4w2": Variant("mnistconv", {"wbits": 2, "abits": 4}),
    "QNN-defense FP": Variant("qnn_fp", {"dropout": 0.0}, batch=64),
    "QNN-defense 4-bit + dropout 0.5": Variant("qnn_kbit", {"bits": 4, "dropout": 0.5}, batch=64),
    "CIFARconv a2w2": Variant("cifarconv", {"wbits": 2, "abits": 2}, smoothing=0.1),
}


def import_baseline(src: str):
    """``create_model`` of the qrobust package in ``src``, imported as ``qrobust_baseline``."""
    tmp = Path(tempfile.mkdtemp()) / "qrobust_baseline"
    shutil.copytree(Path(src) / "qrobust", tmp)
    for f in tmp.rglob("*.py"):
        f.write_text(re.sub(r"\bqrobust\b(?=[. ])", "qrobust_baseline", f.read_text()))
    sys.path.insert(0, str(tmp.parent))
    return importlib.import_module("qrobust_baseline.models").create_model


def make_step(name: str, device: torch.device, seed: int = 0, pool: int = 1024, factory=None):
    """A closure running one training step on the next batch of a small random uint8 'dataset'.

    ``factory``: a baseline's ``create_model``; its models train in the default (NCHW) layout.
    """
    v = VARIANTS[name]
    torch.manual_seed(seed)
    if factory is None:
        model = to_training_layout(create_model(v.model, **v.kwargs).train(), device)  # as qrobust.train
    else:
        model = factory(v.model, **v.kwargs).to(device).train()
    cfg = TrainConfig(lr=1e-3, batch_size=v.batch, label_smoothing=v.smoothing)
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    shape = model.qrobust_config["input_shape"]
    data = Split(torch.randint(0, 256, (pool, *shape), dtype=torch.uint8, generator=gen),
                 torch.randint(0, 10, (pool,), generator=gen))
    state = {"it": iter(())}

    def step() -> None:
        try:
            x, y = next(state["it"])
        except StopIteration:
            state["it"] = data.batches(v.batch, shuffle=True, generator=gen, device=device)
            x, y = next(state["it"])
        train_step(model, opt, x, y, cfg)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def measure(reps: int, warmup: int, device: torch.device,
            baseline=None) -> dict[tuple[str, str], list[float]]:
    """Seconds per step of each (variant, 'after' | 'before'), interleaved."""
    steps = {(name, "after"): make_step(name, device) for name in VARIANTS}
    if baseline is not None:
        steps.update({(name, "before"): make_step(name, device, factory=baseline) for name in VARIANTS})
    for _ in range(warmup):
        for s in steps.values():
            s()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for rep in range(reps):
        order = list(steps) if rep % 2 == 0 else list(reversed(steps))
        for key in order:
            t0 = time.perf_counter()
            steps[key]()
            times[key].append(time.perf_counter() - t0)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15, help="timed steps per model (interleaved)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--baseline-src", default=None, help="folder holding an older qrobust package to compare")
    ap.add_argument("--baseline-name", default="", help="how to name the baseline in the docs (a commit)")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    ap.add_argument("--no-write", action="store_true", help="print only, do not update docs")
    ap.add_argument("--note", default="", help="a remark on the run conditions, recorded in the docs")
    args = ap.parse_args()
    device = resolve_device(args.device)
    baseline = import_baseline(args.baseline_src) if args.baseline_src else None
    times = measure(args.reps, args.warmup, device, baseline)
    med = {key: statistics.median(t) for key, t in times.items()}
    ips = {key: VARIANTS[key[0]].batch / m for key, m in med.items()}
    print(json.dumps({f"{n} ({w})": v for (n, w), v in ips.items()}, indent=2))
    head = "| model | batch | median step (ms) | IQR (ms) | images/s |"
    if baseline is not None:
        head += f" images/s before ({args.baseline_name or 'baseline'}) | speed-up |"
    rows = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for name, v in VARIANTS.items():
        q = statistics.quantiles(times[(name, "after")], n=4)
        row = (f"| {name} | {v.batch} | {1e3 * med[(name, 'after')]:.1f} | "
               f"{1e3 * q[0]:.1f}–{1e3 * q[2]:.1f} | {ips[(name, 'after')]:.0f} |")
        if baseline is not None:
            row += f" {ips[(name, 'before')]:.0f} | {ips[(name, 'after')] / ips[(name, 'before')]:.2f}x |"
        rows.append(row)
    cmd = "OMP_NUM_THREADS=1 nice -n 10 flock /tmp/qrobust-heavy.lock python benchmarks/bench_train_step.py"
    if baseline is not None:
        cmd += " --baseline-src <git archive of the baseline>/src"
    body = "\n".join([
        "## Training throughput",
        "",
        f"Command: `{cmd}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        "Protocol: one step = `qrobust.train.train_step` on the next shuffled batch of random uint8 images "
        f"(scaled to [0, 1] on the fly, as in training); {args.warmup} warm-up rounds, then {args.reps} "
        "timed steps per model"
        + (", current and baseline models alike," if baseline is not None else "")
        + " interleaved in one process; median and interquartile range. Device "
        f"{device}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}. The machine is shared, so absolute figures vary."
        + (f" Note: {args.note}" if args.note else ""),
        "",
        *rows,
    ])
    if not args.no_write:
        update_marked_section(args.out, "train-step", body, title="Benchmarks")
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
