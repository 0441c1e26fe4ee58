"""Scaling with torchrun: 2 ranks x 1 thread against 1 rank x 1 thread, and the ImageNet EMPIR estimate.

    python benchmarks/bench_scaling.py                       # writes docs/scaling.md (sections below)
    python benchmarks/bench_scaling.py --images 96 --train-images 600 --no-write   # a quick check

* PGD evaluation (``qrobust.evaluate.evaluate_attack``, sharded by :mod:`qrobust.distributed`): MNISTconv
  (random weights: PGD's cost does not depend on them), ``--images`` digits, eps 0.3, 0.01 x ``--steps``,
  random start, batch 100. Throughput = images / wall time of the evaluation on rank 0 (after a barrier,
  process start-up excluded); "compute" = the time rank 0 spent inside the attack, the rest is the
  gather, the clean/adversarial predictions and waiting for the slower rank.
* DDP training: one epoch of MNISTconv on ``--train-images`` digits, global batch 128 (64 per rank under
  2 ranks), ``qrobust.train.train``; images/s as the epoch records them. The rest is DDP's gradient
  all-reduce (gloo, 0.7 M weights per step) and the smaller per-rank batch.
* AlexNet (224 px, DoReFa a2w2 and full precision): forward + backward time per image on one core here,
  and its multiply-adds counted layer by layer; section "imagenet_estimate" turns them into the cost of
  EMPIR's full ImageNet table on 8 and 64 GPUs (an estimate; its assumptions are printed with it).

Every run is a fresh process with OMP_NUM_THREADS=1 (1 thread per rank). Writes the sections "scaling"
and "imagenet_estimate" of docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "scaling.md"
# Published dense tensor-core peaks (bf16/fp16, no sparsity): NVIDIA A100 SXM 312 TFLOPS, H100 SXM 989 TFLOPS.
GPUS = {"A100": 312e12, "H100": 989e12}
UTILIZATION = 0.25  # assumed fraction of peak a small net like AlexNet sustains (batch 256, AMP)
TABLE = {"train_images": 1_281_167, "epochs": 30, "members": 3, "val_images": 50_000,
         "passes": {"FGSM": 1, "BIM": 40, "PGD": 40, "CW-L2": 50}, "ensemble_threat_models": 3}


# ----------------------------------------------------------------------------------------------------
# Children (one per measurement, 1 thread; under torchrun when ranks > 1)
# ----------------------------------------------------------------------------------------------------


def child_pgd(n: int, steps: int) -> dict:
    import torch

    from qrobust import distributed as dist
    from qrobust.attacks import create_attack
    from qrobust.data import load_dataset
    from qrobust.evaluate import evaluate_attack
    from qrobust.models import create_model

    torch.manual_seed(0)
    model = create_model("mnistconv").eval()
    x, y = load_dataset("digits").test.head(n).tensors()
    pgd = create_attack("pgd", eps=0.3, alpha=0.01, steps=steps, random_start=True)
    inside = [0.0]

    def timed(m, xb, yb):  # noqa: ANN001, ANN202
        t0 = time.perf_counter()
        out = pgd(m, xb, yb)
        inside[0] += time.perf_counter() - t0
        return out

    dist.barrier()
    t0 = time.perf_counter()
    res = evaluate_attack(model, timed, x, y, batch_size=100)
    wall = time.perf_counter() - t0
    return {"wall": wall, "compute": inside[0], "images_per_s": n / wall, "adv_acc": res.adversarial_accuracy}


def child_train(images: int, batch: int) -> dict:
    import torch

    from qrobust import distributed as dist
    from qrobust.data import load_dataset
    from qrobust.models import create_model
    from qrobust.train import train
    from qrobust.train_config import TrainConfig

    torch.manual_seed(0)
    model = create_model("mnistconv")
    data = load_dataset("digits")
    dist.barrier()
    res = train(model, data.train, None, TrainConfig(epochs=1, batch_size=batch, max_train=images))
    rec = res.history[-1]
    return {"seconds": rec.seconds, "images_per_s": rec.images_per_second}


def child_alexnet(batch: int, repeats: int) -> dict:
    import torch

    from qrobust.models import create_model

    out = {}
    for label, kw in (("fp", {}), ("a2w2", {"wbits": 2, "abits": 2})):
        torch.manual_seed(0)
        model = create_model("alexnet", **kw).train()
        x = torch.rand(batch, 3, 224, 224, requires_grad=True)
        y = torch.randint(0, 1000, (batch,))
        times = []
        for _ in range(repeats + 1):  # the first pass warms up
            t0 = time.perf_counter()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            times.append(time.perf_counter() - t0)
        out[label] = min(times[1:]) / batch
    out["macs"] = count_macs()
    return out


def count_macs() -> int:
    """Multiply-adds of one AlexNet forward pass (convolutions and linear layers), counted with hooks."""
    import torch
    from torch import nn

    from qrobust.models import create_model

    model = create_model("alexnet").eval()
    total = [0]

    def hook(m, inp, out):  # noqa: ANN001, ANN202
        if isinstance(m, nn.Conv2d):
            total[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total[0] += out.numel() * m.in_features

    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.rand(1, 3, 224, 224))
    return total[0]


# ----------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------


def launch(kind: str, ranks: int, args: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    me = [str(Path(__file__).resolve()), "--child", kind, *args]
    cmd = [sys.executable, *me] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--standalone", *me]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def scaling_section(pgd: dict[int, dict], tr: dict[int, dict], a: argparse.Namespace, load: str) -> str:
    p1, p2, t1, t2 = pgd[1], pgd[2], tr[1], tr[2]
    rest = 1 - p2["compute"] / p2["wall"]
    return "\n".join([
        "| workload | 1 rank x 1 thread | 2 ranks x 1 thread | ratio |",
        "|---|---|---|---|",
        f"| PGD evaluation, MNISTconv, {a.images} images, {a.steps} steps (images/s) | "
        f"{p1['images_per_s']:.1f} | {p2['images_per_s']:.1f} | "
        f"**{p2['images_per_s'] / p1['images_per_s']:.2f}x** |",
        f"| DDP training, MNISTconv, 1 epoch of {a.train_images} images, batch 128 (images/s) | "
        f"{t1['images_per_s']:.0f} | {t2['images_per_s']:.0f} | "
        f"**{t2['images_per_s'] / t1['images_per_s']:.2f}x** |",
        "",
        f"Where the rest goes, PGD: rank 0 spent {100 * (1 - rest):.0f}% of its wall time inside the attack; "
        f"the other {100 * rest:.0f}% is the clean/adversarial predictions, the gather of per-image "
        f"outcomes and waiting for rank 1 ({-(-a.images // 100)} batches of 100 over 2 ranks). Training: "
        "every step all-reduces MNISTconv's 0.7 M gradients over gloo and each rank computes a half batch "
        "(64), which uses a core less efficiently than 128.",
        "",
        f"Protocol: `python benchmarks/bench_scaling.py --images {a.images} --steps {a.steps} --train-images "
        f"{a.train_images}`; each cell one fresh process (or torchrun of 2), OMP_NUM_THREADS=1, CPU, gloo. "
        f"Machine: {os.cpu_count()} cores; {load}",
    ])


def estimate_section(al: dict) -> str:
    macs = al["macs"]
    flops_step = 3 * 2 * macs  # forward + backward ~ 3 forward passes, 2 FLOPs per multiply-add
    t = TABLE
    train_img = t["train_images"] * t["epochs"] * t["members"]
    per_img = sum(t["passes"].values()) + 2 * len(t["passes"])  # attack steps + clean/adv predictions
    attack_img = t["val_images"] * per_img * (1 + t["members"] * t["ensemble_threat_models"])
    total = (train_img + attack_img) * flops_step
    cpu_fp, cpu_q = al["fp"], al["a2w2"]
    # upper end: quantized members' passes cost what they cost here relative to full precision
    quant_share = (2 / 3) * (train_img + attack_img * t["members"] * t["ensemble_threat_models"]
                             / (1 + t["members"] * t["ensemble_threat_models"])) / (train_img + attack_img)
    slow = 1 + quant_share * (cpu_q / cpu_fp - 1)
    rows = []
    for gpu, peak in GPUS.items():
        for n in (8, 64):
            hours = total / (peak * UTILIZATION * n) / 3600
            rows.append(f"| {n} x {gpu} | {_duration(hours)} - {_duration(hours * slow)} | "
                        f"{hours * n:.0f} - {hours * n * slow:.0f} GPU-hours |")
    return "\n".join([
        f"Measured here (one core, batch {al['batch']}, 224 px): AlexNet forward + backward "
        f"**{cpu_fp * 1e3:.0f} ms/image** full precision, **{cpu_q * 1e3:.0f} ms/image** DoReFa a2w2 "
        f"(the fake-quantizers add {100 * (cpu_q / cpu_fp - 1):.0f}%); one forward pass is "
        f"{macs / 1e9:.2f} G multiply-adds (counted layer by layer), so this core sustains "
        f"{flops_step / cpu_fp / 1e9:.0f} GFLOP/s on it.",
        "",
        "Work of the full table (README: 3 members trained on ImageNet, 50,000 validation images attacked):",
        "",
        f"* training: {t['members']} members x {t['epochs']} epochs x {t['train_images']:,} images = "
        f"{train_img / 1e6:.0f} M forward + backward passes;",
        f"* attacks: {t['val_images']:,} images x ({' + '.join(f'{k} {v}' for k, v in t['passes'].items())} "
        f"steps + a clean and an adversarial prediction each = {per_img} passes) x (AlexNet baseline + "
        f"{t['members']} members x {t['ensemble_threat_models']} ensemble threat models) = "
        f"{attack_img / 1e6:.0f} M member passes;",
        f"* in all {total / 1e18:.1f} EFLOP at {flops_step / 1e9:.1f} GFLOP per forward + backward. The "
        "low end of each range counts FLOPs only; the high end lets every quantized member's pass cost "
        f"{cpu_q / cpu_fp:.1f}x a full-precision one, as measured here on CPU (DoReFa's elementwise "
        "quantizers; on a GPU they are memory-bound and relatively cheaper, so the truth should lie "
        "between).",
        "",
        "| GPUs | wall time | GPU-hours |",
        "|---|---|---|",
        *rows,
        "",
        f"**Estimate**, not a measurement. Assumptions: published dense bf16 tensor-core peaks (A100 SXM "
        f"312 TFLOPS, H100 SXM 989 TFLOPS) at {100 * UTILIZATION:.0f}% sustained utilization (AlexNet is "
        "small; AMP and channels-last on); the data pipeline keeps up (decoded, pre-resized images; "
        "qrobust's ImageFolder loader holds a split in memory as uint8, ~190 GB for the train split at "
        "224 px, so a full-scale run needs a streaming loader); DDP's all-reduce is ignored (+10-30% "
        "for training); perfect scaling over GPUs (evaluation is embarrassingly "
        "parallel; training ~60 M weights at global batch 256 on 64 GPUs is not, and will fall short); "
        f"{t['epochs']} epochs per member (EMPIR's schedule is not in its README); CW-L2 runs all 50 "
        "iterations (abort-early makes it cheaper). At these rates, decoding 1.28 M JPEGs per epoch "
        "(~1-2 ms each per CPU core) needs tens of CPU cores per GPU node.",
    ])


def _duration(hours: float) -> str:
    return f"{hours:.1f} h" if hours >= 1 else f"{hours * 60:.0f} min"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=400, help="images attacked by PGD")
    ap.add_argument("--steps", type=int, default=20, help="PGD steps")
    ap.add_argument("--train-images", type=int, default=4000)
    ap.add_argument("--alexnet-batch", type=int, default=8)
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/scaling.md alone")
    ap.add_argument("--note", default="", help="a sentence on the machine's load, recorded with the figures")
    ap.add_argument("--child", choices=("pgd", "train", "alexnet"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        from qrobust import distributed as dist

        with dist.session("cpu"):
            out = {"pgd": lambda: child_pgd(a.images, a.steps),
                   "train": lambda: child_train(a.train_images, 128),
                   "alexnet": lambda: child_alexnet(a.alexnet_batch, 2)}[a.child]()
            if dist.is_main():
                print(json.dumps(out))
        return
    common = ["--images", str(a.images), "--steps", str(a.steps), "--train-images", str(a.train_images)]
    pgd = {r: launch("pgd", r, common) for r in (1, 2)}
    tr = {r: launch("train", r, common) for r in (1, 2)}
    al = launch("alexnet", 1, [*common, "--alexnet-batch", str(a.alexnet_batch)]) | {"batch": a.alexnet_batch}
    load = a.note or f"load average {os.getloadavg()[0]:.1f} at the end of the run."
    scaling, estimate = scaling_section(pgd, tr, a, load), estimate_section(al)
    print(scaling, "\n\n", estimate, sep="")
    if not a.no_write:
        from qrobust.utils import update_marked_section

        update_marked_section(DOC, "scaling", scaling)
        update_marked_section(DOC, "imagenet_estimate", estimate)
        print(f"\nwrote {DOC.relative_to(REPO)}")


if __name__ == "__main__":
    main()
