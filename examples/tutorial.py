"""The Python tutorial, runnable: docs/tutorial.md shows this file section by section.

    python examples/tutorial.py            # a few minutes on one CPU core
    python examples/tutorial.py --tiny     # seconds (what CI runs)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import qrobust

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds on a few digits (CI)")
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = parser.parse_args(argv)
    n_train, n_test, epochs, steps, queries = (512, 32, 1, 5, 20) if args.tiny else (4000, 200, 3, 100, 1000)
    out = Path(args.out or tempfile.mkdtemp(prefix="qrobust-tutorial-"))
    found: dict[str, float] = {}

    # --8<-- [start:data]
    data = qrobust.load_dataset("digits")           # 4,000 + 1,000 real MNIST digits, offline
    x, y = data.test.head(n_test).tensors()         # float pixels in [0, 1] (N, 1, 28, 28), labels (N,)
    # --8<-- [end:data]

    # --8<-- [start:model]
    print([entry.name for entry in qrobust.list_models()])       # the model families
    model = qrobust.create_model("mnistconv", wbits=2, abits=4)  # EMPIR's a4w2 MNISTconv, untrained
    config = qrobust.TrainConfig(epochs=epochs, max_train=n_train, seed=1)
    qrobust.train_to_checkpoint(out / "a4w2", model, data, config, overwrite=True)
    model = qrobust.load(out / "a4w2")              # verified weights, in eval mode
    model, info = qrobust.load_checkpoint(out / "a4w2")          # the same, plus its config.json
    print(info["model"], info["train"]["epochs"])
    # --8<-- [end:model]

    # --8<-- [start:three-lines]
    attack = qrobust.PGD(eps=0.3, alpha=0.01, steps=40)
    x_adv = attack(model, x)                        # moves away from the model's own predictions
    print(f"accuracy under PGD: {qrobust.accuracy(model, x_adv, y):.1%}")
    # --8<-- [end:three-lines]

    # --8<-- [start:evaluate]
    res = qrobust.evaluate_attack(model, qrobust.FGSM(eps=0.1), x, y)
    print(f"clean {res.clean_accuracy:.1%} {res.clean_ci95}")
    print(f"FGSM  {res.adversarial_accuracy:.1%} {res.adversarial_ci95}, success {res.success_rate:.1%}, "
          f"mean L2 {res.mean_l2:.2f}")
    record = res.as_dict()                          # JSON-ready, with the attack's settings
    correct = int((qrobust.predict(model, x) == y).sum())
    print("clean accuracy interval:", qrobust.wilson_interval(correct, len(y)))
    # --8<-- [end:evaluate]
    found["fgsm"] = record["adversarial_accuracy"]

    # --8<-- [start:attacks]
    print(sorted(qrobust.ATTACKS))                   # registry names; aliases such as "MadryEtAl" work too
    print(qrobust.attack_params("cw"))               # the settings an attack takes, with defaults
    cw = qrobust.create_attack("CarliniWagnerL2", c=10, steps=20)
    targeted = qrobust.PGD(eps=0.3, steps=20, targeted=True)
    x_t = targeted(model, x, torch.full_like(y, 3))  # aim every image at class 3
    eot = qrobust.PGD(eps=0.3, steps=20, eot_samples=4)   # gradient averaged over 4 passes (randomized nets)
    apgd = qrobust.APGD(eps=0.3, steps=steps)        # step-size-free PGD (Croce & Hein 2020)
    square = qrobust.Square(eps=0.3, n_queries=queries)   # gradient-free: immune to gradient masking
    for atk in (cw, eot, apgd, square):
        print(atk.config()["attack"], qrobust.accuracy(model, atk(model, x), y))
    # --8<-- [end:attacks]
    found["targeted_hits"] = float((qrobust.predict(model, x_t) == 3).float().mean())

    # --8<-- [start:ensemble]
    for seed, bits in ((2, {"wbits": 2, "abits": 4}), (0, {})):   # a second a4w2 member, a FP member
        cfg = qrobust.TrainConfig(epochs=epochs, max_train=n_train, seed=seed)
        name = "a4w2_m2" if bits else "fp"
        qrobust.train_to_checkpoint(out / name, qrobust.create_model("mnistconv", **bits), data, cfg,
                                    overwrite=True)
    ens = qrobust.Ensemble.from_checkpoints([out / "a4w2", out / "a4w2_m2", out / "fp"])  # FP last
    print(f"vote accuracy {qrobust.accuracy(ens, x, y):.1%}")
    for mode in ("legacy", "adaptive_logits"):      # the paper's protocol, then an adaptive attack
        atk = qrobust.ensemble_attack(ens, "pgd", mode, eps=0.3, alpha=0.01, steps=40)
        res = qrobust.evaluate_attack(ens, atk, x, y)
        print(f"EMPIR, PGD, {mode}: {res.adversarial_accuracy:.1%} {res.adversarial_ci95}")
    # --8<-- [end:ensemble]
    found["ensemble_" + mode] = res.adversarial_accuracy

    # --8<-- [start:worst-case]
    report = qrobust.worst_case(ens, x, y, eps=0.3, steps=steps, n_queries=queries)
    print(report.markdown())                         # robust accuracy after each attack, 95% intervals
    print(f"worst case: {report.accuracy:.1%}; per image, what broke it: {report.broken_by[:8]}")
    x_worst = report.x_adv                           # per image, the first adversarial example found
    print(f"vote accuracy on x_worst: {qrobust.accuracy(ens, x_worst, y):.1%}")
    # --8<-- [end:worst-case]
    found["worst_case"] = report.accuracy
    found["worst_case_replayed"] = qrobust.accuracy(ens, x_worst, y)

    # --8<-- [start:mc]
    net = qrobust.create_model("qnn_fp", dropout=0.5, mc_dropout=True)   # dropout stays on in eval()
    qrobust.train_to_checkpoint(out / "qnn_fp_d05", net, data,
                                qrobust.TrainConfig(epochs=1, max_train=n_train, batch_size=64),
                                overwrite=True)
    net.eval()
    probs = qrobust.mc_probs(net, x, samples=20, generator=torch.Generator().manual_seed(0))  # (T, N, C)
    run = qrobust.run_detection(net, qrobust.FGSM(eps=0.3), x, y, samples=20, bootstrap=100)
    print("held-out ROC-AUC:", run.report.heldout_all["seed_variance"]["auc"])
    aware = qrobust.DetectorAwarePGD(eps=0.3, alpha=0.03, steps=10, mc_samples=4)  # fools the detector too
    run_aware = qrobust.run_detection(net, aware, x, y, samples=20, bootstrap=100)
    print("against a detector-aware attack:", run_aware.report.heldout_all["seed_variance"]["auc"])
    # --8<-- [end:mc]
    found["mc_probs_sum"] = float(probs.sum(-1).mean())

    # --8<-- [start:experiment]
    config = qrobust.load_config(HERE / "tutorial.toml", output=str(out / "run"), samples=n_test,
                                 overrides=[f"train.max_train={n_train}", f"train.epochs={epochs}"])
    summary = qrobust.run_experiment(config, progress=False)
    print(summary.computed, "results computed; report:", summary.output / "report" / "index.html")
    # --8<-- [end:experiment]
    found["experiment_results"] = float(summary.total)
    return found


if __name__ == "__main__":
    print(main())
