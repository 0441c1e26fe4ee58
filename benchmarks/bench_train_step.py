"""Training throughput (img/s) of the recipe zoo's model families, one training step at a time.

    OMP_NUM_THREADS=1 nice -n 10 flock /tmp/qrobust-heavy.lock python benchmarks/bench_train_step.py

One step is what ``qrobust.train`` does per batch: gather a shuffled batch of uint8 images, scale it to
[0, 1], forward, loss, backward, Adam (``qrobust.train.train_step``). The five models are timed in one
process with interleaved repetitions (each round visits every model, in alternating order), so a busy
machine slows them alike. One thread by default, as the zoo recipes train. ``--label before`` writes a
separate section, so a speed-up can be recorded next to the figures it improves on.
Results go to the "train-step" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
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


# The recipes' batch sizes: EMPIR 128 (CIFAR with label smoothing 0.1), seed A 64.
VARIANTS = {
    "MNISTconv FP": Variant("mnistconv"),
    "MNISTconv a4w2": Variant("mnistconv", {"wbits": 2, "abits": 4}),
    "seed A FP": Variant("qnn_fp", {"dropout": 0.0}, batch=64),
    "seed A 4-bit + dropout 0.5": Variant("qnn_kbit", {"bits": 4, "dropout": 0.5}, batch=64),
    "CIFARconv a2w2": Variant("cifarconv", {"wbits": 2, "abits": 2}, smoothing=0.1),
}


def make_step(name: str, device: torch.device, seed: int = 0, pool: int = 1024):
    """A closure running one training step on the next batch of a small random uint8 'dataset'."""
    v = VARIANTS[name]
    torch.manual_seed(seed)
    model = to_training_layout(create_model(v.model, **v.kwargs).train(), device)  # as qrobust.train does
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


def measure(reps: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of each variant, interleaved."""
    steps = {name: make_step(name, device) for name in VARIANTS}
    for _ in range(warmup):
        for s in steps.values():
            s()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for rep in range(reps):
        order = list(VARIANTS) if rep % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15, help="timed steps per model (interleaved)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--label", default="", help="'before' records into its own section")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    ap.add_argument("--no-write", action="store_true", help="print only, do not update docs")
    ap.add_argument("--note", default="", help="a remark on the run conditions, recorded in the docs")
    args = ap.parse_args()
    device = resolve_device(args.device)
    times = measure(args.reps, args.warmup, device)
    med = {name: statistics.median(t) for name, t in times.items()}
    q = {name: statistics.quantiles(t, n=4) for name, t in times.items()}
    ips = {name: VARIANTS[name].batch / med[name] for name in VARIANTS}
    print(json.dumps({"images_per_second": ips, "median_s": med}, indent=2))
    rows = ["| model | batch | median step (ms) | IQR (ms) | images/s |", "|---|---|---|---|---|"]
    for name, v in VARIANTS.items():
        rows.append(f"| {name} | {v.batch} | {1e3 * med[name]:.1f} | {1e3 * q[name][0]:.1f}–"
                    f"{1e3 * q[name][2]:.1f} | {ips[name]:.0f} |")
    label = f" ({args.label})" if args.label else ""
    body = "\n".join([
        f"## Training throughput{label}",
        "",
        f"Command: `OMP_NUM_THREADS={torch.get_num_threads()} nice -n 10 flock /tmp/qrobust-heavy.lock "
        f"python benchmarks/bench_train_step.py{' --label ' + args.label if args.label else ''}` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        "Protocol: one step = `qrobust.train.train_step` on the next shuffled batch of random uint8 images "
        f"(scaled to [0, 1] on the fly, as in training); {args.warmup} warm-up rounds, then {args.reps} "
        "timed steps per model, interleaved in one process; median and interquartile range. Device "
        f"{device}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}. The machine is shared, so absolute figures vary."
        + (f" Note: {args.note}" if args.note else ""),
        "",
        *rows,
    ])
    if not args.no_write:
        section = f"train-step-{args.label}" if args.label else "train-step"
        update_marked_section(args.out, section, body, title="Benchmarks")
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
