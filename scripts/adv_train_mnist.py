"""PGD adversarial training of MNISTconv on MNIST, then PGD-40 robustness vs the undefended model.

Protocol (defaults; reduced for a 2-core machine, stated in the output document):
- start from recipe ``mnistconv_fp`` (6 clean epochs), i.e. seed A's schedule with its clean phase done;
- ``--epochs`` adversarial epochs over full MNIST (or the first ``--max-train`` images), PGD with
  ``--train-steps`` steps of ``--train-alpha`` in the eps 0.3 ball, uniform random start, true labels;
  loss ``(1 - w) CE(x) + w CE(x_adv)`` with ``w = --adv-weight`` (1.0 = Madry et al., 0.5 = seed A),
  Adam with cosine decay of ``--lr``;
- evaluate both models on the first ``--n-test`` MNIST test images: clean accuracy and PGD-40
  (eps 0.3, 0.01 x 40, random start, seed 0, true labels) accuracy, 95% Wilson intervals;
- write ``docs/results/adversarial_training.md`` (section ``pgd-mnistconv``).

Run in the background (an interrupted run resumes from its last finished epoch):
  nohup env OMP_NUM_THREADS=2 python scripts/adv_train_mnist.py > adv.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from qrobust.adversary import make_adversary
from qrobust.attacks import PGD
from qrobust.checkpoint import CONFIG, load_checkpoint, train_to_checkpoint
from qrobust.data import load_dataset
from qrobust.evaluate import evaluate_attack
from qrobust.recipes import ensure_trained
from qrobust.train import TrainConfig
from qrobust.utils import configure_logging, update_marked_section

REPO = Path(__file__).resolve().parents[1]


def ramped(adversary, attack, args, n_train: int):
    """Scale the attack's eps and step linearly from 0 to full over ``--ramp-epochs`` epochs of batches
    (counted in batches since this process started: a resumed run restarts the ramp)."""
    ramp = max(1, round(args.ramp_epochs * -(-n_train // 128)))
    calls = {"n": 0}

    def adv(model, x, y):
        frac = min(1.0, (calls["n"] + 1) / ramp) if args.ramp_epochs > 0 else 1.0
        attack.eps, attack.alpha = args.eps * frac, args.train_alpha * frac
        calls["n"] += 1
        return adversary(model, x, y)

    return adv


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mnist.npz"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-train", type=int, default=None, help="first N training images (default: all)")
    p.add_argument("--adv-weight", type=float, default=1.0, help="1.0 Madry et al.; 0.5 seed A")
    p.add_argument("--ramp-epochs", type=float, default=0.5,
                   help="grow the training eps (and step) linearly from 0 over this many epochs; without it"
                        " the model collapsed to uniform outputs (loss ln 10) at eps 0.3")
    p.add_argument("--train-steps", type=int, default=7)
    p.add_argument("--train-alpha", type=float, default=0.1)
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="checkpoint folder (default: artifacts/adv/ named after the training settings)")
    p.add_argument("--doc", default=str(REPO / "docs" / "results" / "adversarial_training.md"))
    args = p.parse_args(argv)
    configure_logging()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = load_dataset(args.data)
    base_dir = ensure_trained("mnistconv_fp")
    out = Path(args.out) if args.out else REPO / "artifacts" / "adv" / (
        f"mnistconv_fp_pgd-e{args.epochs}-k{args.train_steps}-a{args.train_alpha}-w{args.adv_weight}"
        f"-n{args.max_train or 'all'}-r{args.ramp_epochs}-s{args.seed}")
    t_train = float("nan")
    if not (out / CONFIG).is_file():
        model, base_cfg = load_checkpoint(base_dir)
        train_attack = PGD(eps=args.eps, alpha=args.train_alpha, steps=args.train_steps, random_start=True,
                           seed=args.seed)
        cfg = TrainConfig(epochs=args.epochs, batch_size=128, lr=args.lr, seed=args.seed, adv_start_epoch=0,
                          max_train=args.max_train, adv_weight=args.adv_weight, lr_schedule="cosine")

        def report(r) -> None:
            print(f"epoch {r.epoch} loss {r.loss:.4f} train acc {r.train_accuracy:.4f} "
                  f"test acc {r.test_accuracy:.4f} {r.seconds:.0f}s", flush=True)

        t0 = time.perf_counter()
        adversary = ramped(make_adversary(train_attack, seed=args.seed + 1), train_attack, args,
                           len(data.train.head(args.max_train or len(data.train))))
        info = {"dataset": "mnist", "base": str(base_dir),
                "adversarial_training": {"start": "from recipe mnistconv_fp (6 clean epochs)",
                                         **train_attack.config()}}
        train_to_checkpoint(out, model, data, cfg, test=data.test.head(args.n_test), info=info,
                            adversary=adversary, on_epoch=report, overwrite=True)
        t_train = time.perf_counter() - t0
    train_seconds = json.loads((out / CONFIG).read_text()).get("train_seconds", t_train)

    x, y = data.test.head(args.n_test).tensors()
    attack = PGD(eps=0.3, alpha=0.01, steps=40, random_start=True, seed=0)
    strong = PGD(eps=0.3, alpha=0.01, steps=100, random_start=True, restarts=3, loss="cw", seed=0)
    rows, strong_rows = [], []
    for name, path in (("undefended (recipe mnistconv_fp)", base_dir), ("PGD adversarially trained", out)):
        model, _ = load_checkpoint(path)
        res = evaluate_attack(model, attack, x, y, labels="true", batch_size=250)
        rows.append((name, res))
        print(json.dumps({"model": name, **res.as_dict()}), flush=True)
        res = evaluate_attack(model, strong, x, y, labels="true", batch_size=250)
        strong_rows.append(res)
        print(json.dumps({"model": name, "attack": "pgd100x3-cw", **res.as_dict()}), flush=True)

    def pct(v: float) -> str:
        return f"{100 * v:.1f}"

    def ci(c: tuple[float, float]) -> str:
        return f"[{pct(c[0])}, {pct(c[1])}]"

    table = ["| model | clean accuracy % (95% CI) | PGD-40 accuracy % (95% CI) | mean L2 of successful |"
             " PGD-100 x 3 restarts, CW loss: accuracy % (95% CI) |",
             "|---|---|---|---|---|"]
    for (name, r), s in zip(rows, strong_rows, strict=True):
        table.append(f"| {name} | {pct(r.clean_accuracy)} {ci(r.clean_ci95)} | {pct(r.adversarial_accuracy)} "
                     f"{ci(r.adversarial_ci95)} | {r.mean_l2:.2f} | {pct(s.adversarial_accuracy)} "
                     f"{ci(s.adversarial_ci95)} |")
    cmd = "python scripts/adv_train_mnist.py " + " ".join(sys.argv[1:] if argv is None else argv)
    body = "\n".join([
        "## PGD adversarial training of MNISTconv (Madry et al.; seed A's `--adv 1` schedule)",
        "",
        f"Training: start from recipe `mnistconv_fp` (6 clean epochs, Adam 1e-3, batch 128), i.e. seed A's"
        f" clean phase, then {args.epochs} adversarial epoch(s) on"
        f" {'all 60000' if not args.max_train else f'the first {args.max_train}'} MNIST training images with"
        f" loss {1 - args.adv_weight:g} CE(x) + {args.adv_weight:g} CE(x_adv)"
        f" ({'Madry et al.' if args.adv_weight == 1 else 'seed A' if args.adv_weight == 0.5 else 'mixed'}),"
        f" x_adv = PGD eps {args.eps}, {args.train_steps} steps of {args.train_alpha}, uniform random start,"
        f" true labels, eps and step grown linearly from 0 over the first {args.ramp_epochs:g} epoch(s);"
        f" Adam lr {args.lr} with cosine decay, batch 128, seed {args.seed}."
        f" Training took {train_seconds:.0f} s on the 2-core CPU. Madry et al. trained ~80 epochs with"
        " PGD-40; this reduced budget (fewer epochs, 7 large steps) fits the machine, so the robustness is a"
        " lower bound of what the method reaches.",
        "",
        f"Evaluation: first {args.n_test} MNIST test images, PGD-40 (L-inf eps 0.3, step 0.01 x 40, uniform"
        " random start, 1 restart, seed 0, cross-entropy on logits, labels = true labels), and a stronger"
        " check: PGD-100 (step 0.01) with 3 random restarts on the CW margin loss; 95% Wilson intervals.",
        "",
        *table,
        "",
        f"Command: `{cmd.strip()}`",
        "",
        "Both are white-box first-order attacks; robust accuracy under stronger ones (APGD, black-box"
        " Square) can be lower still.",
    ])
    update_marked_section(args.doc, "pgd-mnistconv", body, title="Adversarial training")
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
