"""EMPIR (Sen et al., ICLR 2020) under the paper's protocol and under adaptive attacks.

Trains EMPIR's MNIST ensemble in small (two MNISTconv a4w2 members and a full-precision one that breaks
ties), then attacks the vote three ways (``qrobust.THREAT_MODELS``):

* ``legacy``: what EMPIR's TensorFlow code differentiated (the paper's numbers);
* ``adaptive``: the whole ensemble through its mean softmax;
* ``adaptive_logits``: the whole ensemble through its mean logits.

    python examples/empir_legacy_vs_adaptive.py            # a few minutes on one CPU core
    python examples/empir_legacy_vs_adaptive.py --tiny     # seconds (what CI runs)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import qrobust


def train_members(out: Path, epochs: int, n_train: int) -> list[Path]:
    """EMPIR's order: two low-precision members, then the full-precision member (model 3)."""
    data = qrobust.load_dataset("digits")
    members = [("a4w2_m1", 1, {"wbits": 2, "abits": 4}), ("a4w2_m2", 2, {"wbits": 2, "abits": 4}),
               ("fp", 0, {})]
    for name, seed, bits in members:
        cfg = qrobust.TrainConfig(epochs=epochs, max_train=n_train, seed=seed)
        qrobust.train_to_checkpoint(out / name, qrobust.create_model("mnistconv", **bits), data, cfg,
                                    overwrite=True)
    return [out / name for name, _, _ in members]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds on a few digits (CI)")
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = parser.parse_args(argv)
    n_train, n_test, epochs, steps, alpha = (512, 48, 1, 5, 0.1) if args.tiny else (4000, 300, 3, 40, 0.01)
    paths = train_members(Path(args.out or tempfile.mkdtemp(prefix="qrobust-example-")), epochs, n_train)
    x, y = qrobust.load_dataset("digits").test.head(n_test).tensors()

    # --8<-- [start:empir]
    ens = qrobust.Ensemble.from_checkpoints(paths)            # EMPIR's vote; the FP member breaks ties
    print(f"clean accuracy of the vote: {qrobust.accuracy(ens, x, y):.1%}")
    results = {}
    for attack, params in (("fgsm", {"eps": 0.3}), ("pgd", {"eps": 0.3, "alpha": alpha, "steps": steps})):
        for mode in qrobust.THREAT_MODELS:                   # legacy, adaptive, adaptive_logits
            atk = qrobust.ensemble_attack(ens, attack, mode, **params)
            res = qrobust.evaluate_attack(ens, atk, x, y)     # scored on the vote itself
            lo, hi = res.adversarial_ci95
            print(f"{attack:4s} {mode:15s} accuracy {res.adversarial_accuracy:6.1%}  [{lo:.1%}, {hi:.1%}]")
            results[f"{attack}/{mode}"] = res.adversarial_accuracy
    # --8<-- [end:empir]
    return results


if __name__ == "__main__":
    main()
