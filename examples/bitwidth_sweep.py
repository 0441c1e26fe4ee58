"""Robustness against bit width: MNISTconv with k-bit weights and activations (DoReFa), k = 1, 2, 4, 8
and full precision (32), each trained the same way and attacked with FGSM and PGD.

Prints one row per bit width (accuracy with 95% intervals) and draws accuracy against bits.

    python examples/bitwidth_sweep.py            # a few minutes on one CPU core
    python examples/bitwidth_sweep.py --tiny     # seconds (what CI runs)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import qrobust  # noqa: E402


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds on a few digits (CI)")
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = parser.parse_args(argv)
    tiny, full = (256, 48, 1, (1, 4, 32)), (4000, 500, 3, (1, 2, 4, 8, 32))
    n_train, n_test, epochs, widths = tiny if args.tiny else full
    out = Path(args.out or tempfile.mkdtemp(prefix="qrobust-example-"))
    data = qrobust.load_dataset("digits")
    x, y = data.test.head(n_test).tensors()
    config = qrobust.TrainConfig(epochs=epochs, max_train=n_train)

    # --8<-- [start:sweep]
    attacks = {"FGSM": qrobust.FGSM(eps=0.1), "PGD": qrobust.PGD(eps=0.1, alpha=0.01, steps=20)}
    table: dict[int, dict[str, float]] = {}
    for bits in widths:                                        # 32 = full precision
        model = qrobust.create_model("mnistconv", wbits=bits, abits=bits)
        qrobust.train_to_checkpoint(out / f"w{bits}a{bits}", model, data, config, overwrite=True)
        model.eval()
        table[bits] = {"clean": qrobust.accuracy(model, x, y)}
        for name, attack in attacks.items():
            res = qrobust.evaluate_attack(model, attack, x, y)
            table[bits][name] = res.adversarial_accuracy
            lo, hi = res.adversarial_ci95
            print(f"w{bits}a{bits}: clean {table[bits]['clean']:.1%}, {name} eps 0.1 "
                  f"{res.adversarial_accuracy:.1%} [{lo:.1%}, {hi:.1%}]")
    # --8<-- [end:sweep]

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for column in ("clean", *attacks):
        ax.plot(range(len(widths)), [table[b][column] for b in widths], marker="o", label=column)
    ax.set_xticks(range(len(widths)), [("FP" if b == 32 else str(b)) for b in widths])
    ax.set(xlabel="bits (weights = activations)", ylabel="accuracy", ylim=(0, 1))
    ax.legend()
    fig.savefig(out / "bits.png", dpi=100, bbox_inches="tight")
    print("plot:", out / "bits.png")
    return table


if __name__ == "__main__":
    main()
