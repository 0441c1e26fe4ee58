"""APGD and Square: overhead over the bare model passes, and strength/time against torchattacks, in one run.

* APGD-100 time vs the floor of 100 x (forward + backward w.r.t. the input) on the same batch (the
  issue's floor; fooled images leave APGD's batch, so it can beat it), and vs exactly the passes it made
  (replayed from a recording run): its bookkeeping.
* Square time vs the floor of bare forwards of exactly the batch sizes the attack queried (replayed from
  a recording run; fooled images stop early, so the batches shrink): the per-query overhead; the floor
  runs the weights channels-last as Square does, and a second row shows the model's own layout.
* Robust accuracy (Wilson 95% interval) and time of qrobust's APGD (CE), APGD-T, Square (Linf) against
  torchattacks' on the same images, budgets and true labels. torchattacks' Square spends one query more
  per image (an extra initial query), so it gets ``n_queries - 1``.

Times are medians over rounds run in turns (rotating order), so machine noise hits all variants alike.
Model: the zoo's ``mnistconv_fp`` if its checkpoint exists, otherwise the same recipe trained for 1 epoch
(``ensure_trained(..., overrides={"epochs": 1})``, cached in artifacts/zoo). Run:

    flock /tmp/qrobust-heavy.lock env OMP_NUM_THREADS=1 python benchmarks/bench_apgd_square.py

(about 5 CPU-minutes with the defaults; ``--n 100 --queries 500 --targets 3`` is about 1.5.)
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from qrobust.attacks import APGD, APGDT, Square, input_gradient
from qrobust.attacks.losses import ce_loss
from qrobust.attacks.square import nhwc_weights
from qrobust.checkpoint import CONFIG, load_checkpoint
from qrobust.data import load_dataset
from qrobust.evaluate import wilson_interval
from qrobust.utils import update_marked_section
from qrobust.zoo import cache_dir, ensure_trained

REPO = Path(__file__).resolve().parents[1]
# this process's CPU time: with one thread it is the work done, whatever else shares the cores
clock = time.process_time


def load_model(data_root: str) -> tuple[nn.Module, str]:
    if (cache_dir() / "mnistconv_fp" / CONFIG).is_file():
        path, what = ensure_trained("mnistconv_fp", data_root=data_root), "recipe `mnistconv_fp` (6 epochs)"
    else:
        path = ensure_trained("mnistconv_fp", data_root=data_root, overrides={"epochs": 1})
        what = "recipe `mnistconv_fp` trained for 1 epoch only (no zoo checkpoint on this machine)"
    model, _ = load_checkpoint(path)
    return model.eval(), what


class Recorder(nn.Module):
    """Records the batch size of every forward call and whether it was taped for a backward (the floors
    replay them: fooled images leave APGD's and Square's batches)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.sizes, self.taped = inner, [], []

    def forward(self, x):
        self.sizes.append(len(x))
        self.taped.append(torch.is_grad_enabled())
        return self.inner(x)


def in_turns(fns: dict, reps: int) -> dict[str, float]:
    names, times = list(fns), {k: [] for k in fns}
    for r in range(reps):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = clock()
            fns[k]()
            times[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def robust(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> tuple[float, tuple[float, float]]:
    with torch.no_grad():
        k = int((model(x_adv).argmax(1) == y).sum())
    return k / len(y), wilson_interval(k, len(y))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--eps", type=float, default=0.1, help="L-inf budget for every attack")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--targets", type=int, default=9, help="APGD-T target classes")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--note", default="", help="a sentence on the run's conditions, recorded with it")
    args = p.parse_args(argv)
    import torchattacks

    torch.set_num_threads(args.threads)
    model, what = load_model(args.data_root)
    x, y = load_dataset(str(Path(args.data_root) / "mnist.npz")).test.head(args.n).tensors()
    input_gradient(model, x[:8], y[:8], ce_loss)  # warm-up
    eps, steps, nq = args.eps, args.steps, args.queries

    apgd, square = APGD(eps=eps, steps=steps), Square(eps=eps, n_queries=nq)
    rec = Recorder(model)
    apgd(rec, x, y)
    apgd_passes = list(zip(rec.sizes, rec.taped, strict=True))
    rec = Recorder(model)
    square(rec, x, y)
    sizes = rec.sizes

    def floor_grad_full():  # the floor: every step on the whole batch
        for _ in range(steps):
            input_gradient(model, x, y, ce_loss)

    def floor_grad():  # the passes APGD made, bare
        for s, taped in apgd_passes:
            if taped:
                input_gradient(model, x[:s], y[:s], ce_loss)
            else:
                with torch.no_grad():
                    model(x[:s])

    def floor_fwd_nchw():
        with torch.no_grad():
            for s in sizes:
                model(x[:s])

    def floor_fwd():  # in the layout Square runs the model in
        with nhwc_weights(model):
            floor_fwd_nchw()

    out: dict[str, torch.Tensor] = {}
    t = in_turns({
        "floor_grad": floor_grad,
        "apgd": lambda: out.__setitem__("apgd", apgd(model, x, y)),
        "floor_grad_full": floor_grad_full,
        "floor_fwd": floor_fwd,
        "square": lambda: out.__setitem__("square", square(model, x, y)),
        "floor_fwd_nchw": floor_fwd_nchw,
    }, args.reps)
    # strength vs torchattacks (one timed run each)
    t0 = clock()
    out["ta_apgd"] = torchattacks.APGD(model, eps=eps, steps=steps, loss="ce", seed=0)(x, y)
    t["ta_apgd"] = clock() - t0
    t0 = clock()
    out["apgdt"] = APGDT(eps=eps, steps=steps, n_target_classes=args.targets)(model, x, y)
    t["apgdt"] = clock() - t0
    t0 = clock()
    ta_apgdt = torchattacks.APGDT(model, eps=eps, steps=steps, n_classes=10, seed=0)
    ta_apgdt.n_target_classes = args.targets
    out["ta_apgdt"] = ta_apgdt(x, y)
    t["ta_apgdt"] = clock() - t0
    t0 = clock()
    out["ta_square"] = torchattacks.Square(model, eps=eps, n_queries=nq - 1, p_init=0.8, seed=0)(x, y)
    t["ta_square"] = clock() - t0

    clean = robust(model, x, y)
    queries, image_steps = sum(sizes), sum(s for s, _ in apgd_passes)
    r_apgd = t["apgd"] / t["floor_grad"]
    r_sq = t["square"] / t["floor_fwd"]
    rows = [("qrobust APGD-CE", "apgd"), ("torchattacks APGD-CE", "ta_apgd"),
            (f"qrobust APGD-T (DLR, {args.targets} targets)", "apgdt"),
            (f"torchattacks APGDT ({args.targets} targets)", "ta_apgdt"),
            ("qrobust Square L-inf", "square"), ("torchattacks Square L-inf", "ta_square")]
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        "## APGD and Square: overhead over bare passes, strength vs torchattacks",
        "",
        f"One run, {stamp}: {what}, first {args.n} MNIST test images (true labels), L-inf eps {eps}, "
        f"APGD {steps} steps (1 restart), Square {nq} queries per image (p_init 0.8), seed 0, CPU, "
        f"torch {torch.__version__}, {args.threads} thread(s), Python {platform.python_version()}. Clean "
        f"accuracy {100 * clean[0]:.1f}%. Times: this process's CPU time, medians of {args.reps} rounds run "
        "in turns for APGD, Square and their floors; the torchattacks and APGD-T rows are single runs. The "
        "machine is shared, so compare ratios from this run, not absolute times across runs. " + args.note,
        "",
        "| overhead | attack | bare floor | ratio | goal |",
        "|---|---|---|---|---|",
        f"| APGD-{steps} vs {steps} x (forward + input backward) of the whole batch of {args.n} (fooled "
        f"images leave APGD's batch: {image_steps} image-passes instead of {(steps + 1) * args.n}) | "
        f"{t['apgd']:.2f} s | {t['floor_grad_full']:.2f} s | **{t['apgd'] / t['floor_grad_full']:.3f}x** | "
        "<= 1.05x |",
        f"| APGD-{steps} vs the same {len(apgd_passes)} passes bare (its bookkeeping) | {t['apgd']:.2f} s | "
        f"{t['floor_grad']:.2f} s | **{r_apgd:.3f}x** | <= 1.05x |",
        f"| Square vs bare forwards of the same {len(sizes)} batches ({queries} image-queries; "
        f"{1e3 * t['square'] / queries:.3f} ms per image-query), channels-last weights as Square runs "
        f"them | {t['square']:.2f} s | {t['floor_fwd']:.2f} s | **{r_sq:.3f}x** | <= 1.1x |",
        f"| Square vs the same forwards in the model's own layout (NCHW) | {t['square']:.2f} s | "
        f"{t['floor_fwd_nchw']:.2f} s | **{t['square'] / t['floor_fwd_nchw']:.3f}x** | <= 1.1x |",
        "",
        "| attack | robust accuracy (95% CI) | time s |",
        "|---|---|---|",
    ]
    for label, key in rows:
        acc, (lo, hi) = robust(model, out[key], y)
        lines.append(f"| {label} | {100 * acc:.1f}% ({100 * lo:.1f}-{100 * hi:.1f}) | {t[key]:.2f} |")
    lines += ["", "Command:", "", "```",
              "nice -n 5 flock /tmp/qrobust-heavy.lock env OMP_NUM_THREADS=1 "
              + (f"QROBUST_ZOO={os.environ['QROBUST_ZOO']} " if os.environ.get("QROBUST_ZOO") else "")
              + "python benchmarks/bench_apgd_square.py "
              + shlex.join(argv if argv is not None else sys.argv[1:]), "```"]
    body = "\n".join(lines)
    print(body)
    update_marked_section(args.doc, "apgd-square", body, title="qrobust benchmarks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
