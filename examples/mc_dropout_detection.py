"""Monte-Carlo dropout detection, as in "QNN defense and detection with inference-time dropout"
(Galloway et al. 2018's quantized networks with dropout kept on at test time).

Trains the system's full-precision network with dropout 0.5 kept on at inference, attacks it with FGSM,
runs T stochastic passes on clean and adversarial digits and scores each input by the system's
uncertainty (mean over classes of the variance of the softmax across passes). Prints the held-out
ROC-AUC with its bootstrap interval and draws the ROC curve.

    python examples/mc_dropout_detection.py            # about a minute on one CPU core
    python examples/mc_dropout_detection.py --tiny     # seconds (what CI runs)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import qrobust
from qrobust.report.plots import roc_plot


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds on a few digits (CI)")
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = parser.parse_args(argv)
    n_train, n_test, epochs, passes = (512, 64, 1, 10) if args.tiny else (4000, 400, 2, 50)
    out = Path(args.out or tempfile.mkdtemp(prefix="qrobust-example-"))
    data = qrobust.load_dataset("digits")
    model = qrobust.create_model("qnn_fp", dropout=0.5, mc_dropout=True)   # dropout stays on in eval()
    qrobust.train_to_checkpoint(out / "qnn_fp_d05", model, data,
                                qrobust.TrainConfig(epochs=epochs, max_train=n_train, batch_size=64),
                                overwrite=True)

    # --8<-- [start:detect]
    model = qrobust.load(out / "qnn_fp_d05")                   # eval mode; MC dropout layers stay random
    x, y = data.test.head(n_test).tensors()
    run = qrobust.run_detection(model, qrobust.FGSM(eps=0.3), x, y, samples=passes, bootstrap=200)
    auc = run.report.heldout_all["seed_variance"]              # held-out half of the images
    print(f"MC accuracy clean {run.report.clean_accuracy['group']:.1%}, "
          f"adversarial {run.report.adv_accuracy['group']:.1%}")
    lo, hi = auc["auc_ci95"]
    print(f"held-out ROC-AUC of the uncertainty score: {auc['auc']:.3f} [{lo:.3f}, {hi:.3f}]")
    curve = qrobust.roc_points(run.per_input["clean_seed_variance"], run.per_input["adv_seed_variance"])
    print("ROC curve over all images:", roc_plot(out / "roc.png", {"FGSM eps 0.3": curve}))
    # --8<-- [end:detect]
    return {"auc": auc["auc"]}


if __name__ == "__main__":
    main()
