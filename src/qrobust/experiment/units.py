"""Computing one unit: clean accuracy, one attack cell or one detection cell, as a store record."""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from qrobust.data import check_images
from qrobust.evaluate import accuracy, wilson_interval
from qrobust.experiment.config import ExperimentConfig
from qrobust.experiment.models import Models
from qrobust.experiment.plan import Unit, attack_settings
from qrobust.experiment.store import ResultStore
from qrobust.version import __version__


def execute(
    cfg: ExperimentConfig, models: Models, u: Unit, store: ResultStore, log: Callable[[str], None]
) -> dict[str, Any]:
    """Compute one unit and commit it to the store (one transaction)."""
    ds = models.dataset_of(u.target)
    x, y, data_fp = models.test_tensors(ds, u.samples)
    model = models.models[u.target]
    check_images(x, None, f"dataset {ds}")
    torch.manual_seed(cfg.seed)  # units are seeded by the experiment, not by their order
    t0 = time.perf_counter()
    rec = base_record(cfg, models, u)
    rec["data_fingerprint"] = data_fp
    if u.kind == "clean":
        acc = accuracy(model, x, y, cfg.batch_size)
        correct = round(acc * len(y))
        rec.update(accuracy=acc, n=len(y), correct=correct, ci95=list(wilson_interval(correct, len(y))))
    elif u.kind == "attack":
        rec.update(attack_unit(cfg, models, u, model, x, y))
    else:
        rec.update(detection_unit(cfg, models, u, model, x, y))
    rec["seconds"] = time.perf_counter() - t0
    try:
        store.put_result(rec)
    except sqlite3.IntegrityError:  # another process sharing this output finished the same unit first
        log(f"{u.title.strip()}: already stored by another run; keeping the stored result")
    return rec


def base_record(cfg: ExperimentConfig, models: Models, u: Unit) -> dict[str, Any]:
    """What every record says about its unit: row, attack, model hash, data, versions."""
    return {
        "key": u.key,
        "kind": u.kind,
        "target": u.target,
        "row": u.row,
        "attack": u.attack,
        "attack_name": u.spec.name if u.spec else None,
        "eps": u.eps,
        "mode": u.mode,
        "labels": u.spec.labels if u.spec else None,
        "samples": u.samples,
        "seed": cfg.seed,
        "model_hash": models.hashes[u.target],
        "config_hash": models.hashes[u.target],
        "bits": models.bits.get(u.target, ""),
        "ensemble": models.is_ensemble(u.target),
        "dataset": cfg.datasets[models.dataset_of(u.target)].source,
        "qrobust_version": __version__,
        "device": str(models.device),
        **u.describe,
    }


def _accuracy_fields(d: dict[str, Any], attack: Any) -> dict[str, Any]:
    """The adversarial accuracy of an ``AttackResult.as_dict()`` as a record's accuracy fields."""
    return {
        "accuracy": d["adversarial_accuracy"],
        "n": d["n"],
        "correct": round(d["adversarial_accuracy"] * d["n"]),
        "ci95": d["adversarial_ci95"],
        "attack_config": attack.config(),
        "attack_result": jsonable(d),
    }


def attack_unit(
    cfg: ExperimentConfig, models: Models, u: Unit, model: nn.Module, x: Tensor, y: Tensor
) -> dict[str, Any]:
    from qrobust.attacks import create_attack
    from qrobust.evaluate import evaluate_attack

    spec = u.spec
    assert spec is not None
    atk: Any = create_attack(spec.name, **attack_settings(cfg, models, spec, u.eps, u.mode, u.target))
    if u.mode is not None:
        from qrobust.ensemble import on_target

        atk = on_target(atk, model.attack_target(u.mode, spec.name))
    res = evaluate_attack(model, atk, x, y, labels=spec.labels, batch_size=cfg.batch_size)
    out = _accuracy_fields(res.as_dict(), atk)
    if res.adv_correct is not None:  # per image, so a page can combine cells image by image
        out["correct_mask"] = "".join("1" if c else "0" for c in res.adv_correct.tolist())
    return out


def detection_unit(
    cfg: ExperimentConfig, models: Models, u: Unit, model: nn.Module, x: Tensor, y: Tensor
) -> dict[str, Any]:
    from qrobust.attacks import create_attack
    from qrobust.detect import roc_points, run_detection

    spec, det = u.spec, cfg.detection
    assert spec is not None and det is not None
    atk = create_attack(spec.name, **attack_settings(cfg, models, spec, u.eps, None, u.target))
    # Seed A's protocol, as `qrobust detect` runs it: labels = "pred" lets the attack label each batch with
    # its own prediction (one stochastic pass, or its view's for EOT attacks); Monte-Carlo passes from
    # generators seeded seed + 1 (clean) and seed + 2 (adversarial); 1000 bootstrap resamples.
    run = run_detection(model, atk, x, y, samples=det.mc_samples, attack_batch=cfg.batch_size,
                        seed=cfg.seed, labels=None if spec.labels == "pred" else spec.labels, bootstrap=1000)
    curves = run.per_input
    held = curves["heldout"]
    roc = roc_points(curves["clean_seed_variance"][held], curves["adv_seed_variance"][held])
    metrics = run.report.heldout_all["seed_variance"]
    rd = run.report.as_dict()
    detection = {
        "statistic": "seed_variance",
        "mc_samples": det.mc_samples,
        "auc": metrics["auc"],
        "auc_ci95": metrics.get("auc_ci95"),
        "lr_score": rd["seed_lr_score"],
        "heldout_lr_accuracy": rd["heldout_lr_accuracy"],
        "clean_accuracy": rd["clean_accuracy"]["group"],
        "adv_accuracy": rd["adv_accuracy"]["group"],
        "uncertainty_clean": rd["mean_stats_clean"]["seed_variance"],
        "uncertainty_adv": rd["mean_stats_adv"]["seed_variance"],
        "attack_success": rd["attack_success"],
        "n_heldout": rd["n_heldout"],
        "roc": {"fpr": roc["fpr"], "tpr": roc["tpr"]} if roc else {"fpr": [], "tpr": []},
        "report": jsonable(rd),
    }
    if run.attack_result is not None:
        return {**_accuracy_fields(run.attack_result.as_dict(), atk), "detection": detection}
    n = len(y)  # the attack labelled its own batches: accuracy = one pass, averaged over the MC passes
    single = rd["adv_accuracy"]["single_pass"]
    correct = round(single * n)
    return {"accuracy": single, "n": n, "correct": correct, "ci95": list(wilson_interval(correct, n)),
            "accuracy_measure": "adversarial accuracy of one Monte-Carlo pass, mean over the passes",
            "attack_config": atk.config(), "detection": detection}


def jsonable(obj: Any) -> Any:
    """``obj`` with tensors, numpy scalars and non-finite floats made JSON-safe (NaN/inf -> None)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Tensor):
        return jsonable(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return jsonable(obj.item())
        except (TypeError, ValueError):
            return str(obj)
    if isinstance(obj, int | str | bool) or obj is None:
        return obj
    return str(obj)
