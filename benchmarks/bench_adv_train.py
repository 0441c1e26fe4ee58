"""Adversarial-training step cost against (k + 1) bare forward+backward passes of the same batch.

    OMP_NUM_THREADS=1 nice -n 10 flock /tmp/qrobust-heavy.lock python benchmarks/bench_adv_train.py

Issue 15's speed goal: one adversarial training step with k attack steps costs at most 1.1 x (k + 1)
bare forward+backward passes (forward, cross-entropy, backward to the weights, no optimizer) of the same
batch. Timed: ``qrobust.train.train_step`` with the objective of ``qrobust.adversary`` for FGSM-RS
(k = 1), PGD k = 7 and k = 10 (Madry weight 1.0) and TRADES k = 10 (for information: its training pass
runs on the clean and the adversarial batch), and the bare pass, for MNISTconv full precision and a4w2,
in one process with interleaved repetitions (each round visits every case, in alternating order), so a
busy machine slows them alike. Batch 128 of real MNIST images (random ones without the data file),
channels-last as the recipes train. Results go to the "adv-train-step" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from qrobust.adversary import make_objective
from qrobust.data import load_npz
from qrobust.models import create_model
from qrobust.train import TrainConfig, make_optimizer, to_training_layout, train_step
from qrobust.utils import update_marked_section

REPO = Path(__file__).resolve().parents[1]
MODELS = {"MNISTconv FP": {}, "MNISTconv a4w2": {"wbits": 2, "abits": 4}}
# case -> (TrainConfig adversarial settings, k attack steps); None = the bare forward+backward pass
CASES: dict[str, tuple[dict | None, int]] = {
    "bare fwd+bwd": (None, 0),
    "FGSM-RS (k=1)": ({"adv_method": "fgsm_rs"}, 1),
    "PGD k=7": ({"adv_method": "pgd", "adv_steps": 7}, 7),
    "PGD k=10": ({"adv_method": "pgd", "adv_steps": 10}, 10),
    "TRADES k=10": ({"adv_method": "trades", "adv_steps": 10}, 10),
}


def batch(n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    path = REPO.parent / "shared" / "data" / "mnist.npz"
    if path.is_file():
        return load_npz(path).train.head(n).tensors()
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def make_case(model_kwargs: dict, adv: dict | None, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    torch.manual_seed(0)
    model = to_training_layout(create_model("mnistconv", **model_kwargs).train(), torch.device("cpu"))
    if adv is None:
        def bare() -> None:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            for p in model.parameters():
                p.grad = None
        return bare
    cfg = TrainConfig(adv_eps=0.3, adv_weight=1.0, channels_last=True, **adv)
    opt = make_optimizer(model, cfg)
    obj = make_objective(cfg, torch.Generator().manual_seed(0))

    def step() -> None:
        train_step(model, opt, x, y, cfg, objective=obj)
    return step


def measure(reps: int, warmup: int) -> dict[tuple[str, str], list[float]]:
    x, y = batch()
    fns = {(m, c): make_case(kw, adv, x, y) for m, kw in MODELS.items() for c, (adv, _) in CASES.items()}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in fns}
    for rep in range(reps):
        for key in (list(fns) if rep % 2 == 0 else list(reversed(fns))):
            t0 = time.perf_counter()
            fns[key]()
            times[key].append(time.perf_counter() - t0)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15, help="timed steps per case (interleaved)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    ap.add_argument("--no-write", action="store_true", help="print only, do not update docs")
    ap.add_argument("--note", default="", help="a remark on the run conditions, recorded in the docs")
    args = ap.parse_args()
    times = measure(args.reps, args.warmup)
    med = {key: statistics.median(t) for key, t in times.items()}
    rows = ["| model | step | k | median (ms) | images/s | vs (k+1) bare passes | goal <= 1.1 |",
            "|---|---|---|---|---|---|---|"]
    figures = {}
    for m in MODELS:
        bare = med[(m, "bare fwd+bwd")]
        for c, (adv, k) in CASES.items():
            t = med[(m, c)]
            ratio = t / ((k + 1) * bare) if adv is not None else float("nan")
            figures[f"{m} / {c}"] = {"median_ms": 1e3 * t, "ratio": ratio}
            verdict = "" if adv is None else ("info" if c.startswith("TRADES") else
                                              "yes" if ratio <= 1.1 else "**no**")
            rows.append(f"| {m} | {c} | {k or ''} | {1e3 * t:.1f} | {128 / t:.0f} | "
                        f"{'' if adv is None else f'{ratio:.2f}x'} | {verdict} |")
    print(json.dumps(figures, indent=2))
    body = "\n".join([
        "## Adversarial training step vs (k + 1) bare passes",
        "",
        f"Command: `OMP_NUM_THREADS={torch.get_num_threads()} nice -n 10 flock /tmp/qrobust-heavy.lock "
        f"python benchmarks/bench_adv_train.py{''.join(' ' + shlex.quote(a) for a in sys.argv[1:])}` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        "Protocol: `qrobust.train.train_step` with a `qrobust.adversary` objective (eps 0.3, Adam, model in "
        "eval mode for the attack, input gradients only) on one fixed batch of 128 MNIST training images, "
        "against the bare pass of the same batch (train-mode forward, cross-entropy, backward to the "
        f"weights, no optimizer); {args.warmup} warm-up rounds, then {args.reps} timed repetitions of "
        "every case, interleaved in one process; medians. Goal (issue 15): adversarial step <= 1.1 x "
        "(k + 1) bare passes. TRADES runs one more clean forward and trains on the clean and adversarial "
        "batch together, so it is listed for information. "
        f"CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}; the machine is shared, so absolute figures vary."
        + (f" Note: {args.note}" if args.note else ""),
        "",
        *rows,
    ])
    if not args.no_write:
        update_marked_section(args.out, "adv-train-step", body, title="Benchmarks")
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
