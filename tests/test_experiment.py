"""Experiment files: validation messages, overrides, hashing, the SQLite store, caching and resume."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qrobust.errors import QrobustError
from qrobust.experiment import ResultStore, load_config, parse_config, run_experiment, stable_hash
from qrobust.experiment.config import apply_override

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

MINIMAL = {
    "data": "digits",
    "models": [{"name": "fp", "arch": "mnistconv"}],
    "attacks": [{"name": "fgsm", "eps": [0, 0.1]}],
}


def _doc(**changes):
    doc = json.loads(json.dumps(MINIMAL))
    doc.update(changes)
    return doc


# -- validation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            _doc(attacks=[{"name": "fgsm", "eps": 0.1}, {"name": "pgd", "eps": [0.1, -0.2]}]),
            "quickstart.toml: attacks[1].eps: must be a number or list of numbers >= 0",
        ),
        (_doc(attacks=[{"name": "fgsm", "eps": "big"}]), "attacks[0].eps: must be a number or list"),
        (
            _doc(attacks=[{"name": "pgd", "eps": 0.3, "stepz": 3}]),
            "attacks[0]: attack 'pgd' does not take stepz",
        ),
        (_doc(attacks=[{"name": "nope", "eps": 0.3}]), "attacks[0]: unknown attack 'nope'"),
        (_doc(attacks=[{"name": "fgsm", "eps": [0.1, 0.3], "table_eps": 0.2}]), "attacks[0].table_eps"),
        (_doc(attacks=[{"name": "fgsm", "eps": 0.3, "models": ["ghost"]}]), "attacks[0].models: 'ghost'"),
        (
            _doc(models=[{"name": "fp", "arch": "mnistconv", "options": {"wbitz": 2}}]),
            "models[0].options.wbitz",
        ),
        (_doc(models=[{"name": "fp", "arch": "resnet999"}]), "models[0].arch: unknown model 'resnet999'"),
        (_doc(models=[{"name": "fp"}]), "models[0]: give exactly one of arch"),
        (
            _doc(models=[{"name": "fp", "arch": "mnistconv", "train": {"epochs": -1}}]),
            "models[0].train.epochs",
        ),
        (
            _doc(models=[{"name": "a", "arch": "mnistconv"}, {"name": "a", "arch": "mnistconv"}]),
            "models[1].name: 'a' is used twice",
        ),
        (
            _doc(ensembles=[{"name": "e", "members": ["fp", "zz"]}]),
            "ensembles[0].members: 'zz' is not a model",
        ),
        (
            _doc(ensembles=[{"name": "e", "members": ["fp", "fp"], "targets": ["whitebox"]}]),
            "ensembles[0].targets: unknown target 'whitebox'",
        ),
        (
            _doc(detection={"models": ["fp"], "attacks": ["PGD"]}),
            "detection.attacks: 'PGD' is not an attack label",
        ),
        (_doc(detection={"models": ["fp"], "mc_samples": 1}), "detection.mc_samples"),
        (_doc(samples=0), "samples: must be a whole number >= 1"),
        (_doc(colour="blue"), "quickstart.toml: colour: unknown key"),
        (_doc(sanity={"near_zero": -1}), "sanity.near_zero"),
    ],
)
def test_validation_points_at_the_offending_key(doc, message):
    with pytest.raises(QrobustError) as err:
        parse_config(doc, source="quickstart.toml")
    assert message in str(err.value)


def test_load_config_reports_toml_syntax_errors(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("name = \n")
    with pytest.raises(QrobustError, match="bad.toml: not valid TOML"):
        load_config(path)


@pytest.mark.parametrize("name", ["quickstart", "empir_mnist", "empir_cifar10", "qnn_detection_mnist",
                                  "bitwidth_mnist"])
def test_shipped_configs_validate(name):
    cfg = load_config(CONFIGS / f"{name}.toml", data_root="/nonexistent")  # validation needs no data
    assert cfg.name == name
    assert cfg.models and cfg.attacks
    labels = [a.label for a in cfg.attacks]
    assert len(set(labels)) == len(labels)
    if name.startswith("empir"):  # EMPIR's protocol (scripts/reproduce_empir.py renders these labels)
        assert [e.targets for e in cfg.ensembles] == [["legacy", "adaptive", "adaptive_logits"]]
        assert {"FGSM", "BIM", "PGD", "CW-L2"} <= set(labels)
        paper = [a for a in cfg.attacks if a.label in ("FGSM", "BIM", "PGD", "CW-L2")]
        assert cfg.batch_size == 100 and all(a.labels == "pred" for a in paper)
        baseline = cfg.ensembles[0].members[-1]  # model 3, the full-precision member, is the baseline
        assert all(set(a.models or ()) <= {baseline, "empir"} for a in paper)
        # the seeds' CW-L2 exactly (start included); qrobust's CW-L2 defaults beside it (issue 17)
        from qrobust.attacks.cw import SEED_START_MARGIN

        assert cfg.attack("CW-L2").params["start_margin"] == SEED_START_MARGIN
        assert "start_margin" not in cfg.attack("CW-L2 (qrobust start)").params
        worst = cfg.attack("worst case")  # on every member and the ensemble, at the table's eps
        assert worst.name == "worst_case" and worst.labels == "true"
        assert set(worst.models) == {m.name for m in cfg.models} | {"empir"}
        assert worst.eps == [cfg.attack("PGD").table_eps]
    if name == "quickstart":
        # the official MNIST test set (the embedded digits are MNIST TRAINING images: the zoo members saw
        # them) and EMPIR's members from the zoo at their real accuracy, not toys trained here
        assert cfg.datasets["data"].source == "mnist"
        assert {m.recipe for m in cfg.models if m.recipe} == {"mnistconv_fp", "mnistconv_a4w2_m1",
                                                             "mnistconv_a4w2_m2"}
        assert cfg.detection is not None and cfg.detection.models == ["mcd"]
    if name == "qnn_detection_mnist":  # seed A's rows and their adaptive versions
        assert cfg.detection is not None and len(cfg.detection.models) == 6
        assert "worst case" not in cfg.detection.attacks and cfg.attack("worst case").models is None
        assert {cfg.attack(label).name for label in cfg.detection.attacks} == {
            "fgsm", "pgd", "jsma", "eot_pgd", "detector_aware_pgd"}


def test_data_override_and_set(tmp_path):
    cfg = load_config(
        CONFIGS / "empir_mnist.toml", ["samples=50", "attacks.1.eps=[0.05, 0.2]"], data="/data/mnist.npz"
    )
    assert cfg.datasets["mnist"].source == "/data/mnist.npz"
    assert cfg.samples == 50
    assert cfg.attacks[1].eps == [0.05, 0.2] and cfg.attacks[1].table_eps == 0.2
    raw = {"datasets": {"a": {"source": "x"}, "b": {"source": "y"}}}
    with pytest.raises(QrobustError, match="2 datasets"):
        apply_override(raw, "data=z")
    with pytest.raises(QrobustError, match="KEY=VALUE"):
        apply_override(raw, "samples")
    with pytest.raises(QrobustError, match="no such list element"):
        load_config(CONFIGS / "quickstart.toml", ["attacks.7.eps=1"])


def test_cli_reports_config_errors(tmp_path, capsys):
    from qrobust.cli import main

    path = tmp_path / "broken.toml"
    path.write_text(
        'data = "digits"\n[[models]]\nname = "fp"\narch = "mnistconv"\n'
        '[[attacks]]\nname = "fgsm"\neps = 0.1\n[[attacks]]\nname = "pgd"\neps = [-1]\n'
    )
    assert main(["run", str(path), "--check"]) == 2
    assert (
        "error: broken.toml: attacks[1].eps: must be a number or list of numbers >= 0"
        in capsys.readouterr().err
    )


# -- hashing and store ----------------------------------------------------------------------------------


def test_stable_hash_is_canonical():
    a = {"eps": 0, "steps": 40, "loss": "ce"}
    assert stable_hash(a) == stable_hash({"loss": "ce", "steps": 40, "eps": 0.0})
    assert stable_hash(a) != stable_hash({**a, "eps": 0.1})
    assert stable_hash([1, 2]) != stable_hash([2, 1])


def test_store_commits_units_and_refuses_duplicates(tmp_path):
    path = tmp_path / "s.sqlite"
    rec = {
        "key": "k1",
        "kind": "attack",
        "target": "m",
        "attack": "FGSM",
        "eps": 0.1,
        "accuracy": 0.5,
        "n": 10,
        "seconds": 0.1,
        "row": "m",
    }
    with ResultStore(path) as store:
        store.put_result(rec)
        with pytest.raises(sqlite3.IntegrityError):
            store.put_result(rec)
        assert store.count() == 1
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with ResultStore(path) as store:  # durable across connections
        assert store.has_result("k1") and not store.has_result("k2")
        got = store.get_result("k1")
        assert got["accuracy"] == 0.5 and got["created_at"] > 0
    (tmp_path / "junk.sqlite").write_text("not a database at all" * 100)
    with pytest.raises(QrobustError, match="not a qrobust result store"):
        ResultStore(tmp_path / "junk.sqlite")


# -- running, caching, resume ---------------------------------------------------------------------------

PREAMBLE = """
name = "{name}"
data = "digits"
samples = {samples}
seed = 0
batch_size = 200

[train]
epochs = 1
batch_size = 64
max_train = 300
"""

TINY = PREAMBLE + """
[[models]]
name = "fp"
arch = "mnistconv"

[[attacks]]
name = "fgsm"
eps = {fgsm_eps}

[[attacks]]
name = "pgd"
eps = {pgd_eps}
alpha = 0.05
steps = {steps}
"""


def _write_tiny(
    path: Path,
    samples: int = 200,
    fgsm_eps: str = "[0, 0.05, 0.1, 0.2, 0.3]",
    pgd_eps: str = "[0, 0.1, 0.2, 0.3, 1.0]",
    steps: int = 4,
) -> Path:
    text = TINY.format(name="tiny", samples=samples, fgsm_eps=fgsm_eps, pgd_eps=pgd_eps, steps=steps)
    path.write_text(text)
    return path


def test_rerun_skips_finished_work_and_new_eps_only_adds_units(tmp_path):
    cfg_path = _write_tiny(tmp_path / "tiny.toml", samples=60, pgd_eps="[0.1]", steps=2)
    out = tmp_path / "out"
    first = run_experiment(load_config(cfg_path, output=str(out)), progress=False, report=False)
    assert (first.total, first.computed, first.models_trained) == (7, 7, 1)
    second = run_experiment(load_config(cfg_path, output=str(out)), progress=False, report=False)
    assert (second.computed, second.skipped, second.models_trained) == (0, 7, 0)
    assert [r["accuracy"] for r in second.records] == [r["accuracy"] for r in first.records]
    third = run_experiment(
        load_config(cfg_path, ["attacks.1.eps=[0.1, 0.2]"], output=str(out)), progress=False, report=False
    )
    assert (third.total, third.computed, third.models_trained) == (8, 1, 0)
    with ResultStore(out / "store.sqlite") as store:
        assert store.count() == 8 and store.count("models") == 1
    # A different training setting is a different model: retrained, its results keyed apart.
    fourth = run_experiment(
        load_config(cfg_path, ["train.seed=5"], output=str(out)), progress=False, report=False
    )
    assert fourth.models_trained == 1 and fourth.computed == 7
    # Provenance recorded on every row.
    rec = second.records[3]
    for key in (
        "model_hash",
        "config_hash",
        "attack_config",
        "samples",
        "seed",
        "qrobust_version",
        "data_fingerprint",
    ):
        assert key in rec, key
    assert rec["attack_config"]["eps"] == rec["eps"]


def test_bumping_an_attack_version_recomputes_only_its_cells(tmp_path, monkeypatch):
    from qrobust.attacks import FGSM, PGD
    from qrobust.experiment import plan

    cfg_path = _write_tiny(
        tmp_path / "tiny.toml", samples=40, fgsm_eps="[0.1, 0.2]", pgd_eps="[0.1]", steps=2
    )
    out = tmp_path / "out"

    def run(progress=False, **kw):
        return run_experiment(load_config(cfg_path, output=str(out)), report=False, progress=progress, **kw)

    lines: list[str] = []
    first = run(progress=True, log=lines.append)  # stderr is no terminal here: a line per unit, no bar
    assert (first.total, first.computed) == (4, 4)  # clean, fgsm x 2, pgd
    assert [x.split()[0] for x in lines if x.startswith("[")] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    monkeypatch.setattr(FGSM, "version", "2")
    second = run()
    assert (second.computed, second.skipped, second.models_trained) == (2, 2, 0)
    new = {r["key"] for r in second.records} - {r["key"] for r in first.records}
    assert sorted(r["attack_name"] for r in second.records if r["key"] in new) == ["fgsm", "fgsm"]
    # the recomputed cells are what the first run computed (same code, only the version moved)
    assert [r["accuracy"] for r in second.records] == [r["accuracy"] for r in first.records]
    monkeypatch.setattr(FGSM, "version", "1")  # back at "1": the cells stored before are found again
    assert run().computed == 0
    # the detection pipeline's version enters detection keys only
    monkeypatch.setattr(plan, "DETECTION_VERSION", "1")
    assert plan.code_versions(PGD()) == plan.code_versions(PGD(), detection=True) == {}
    monkeypatch.setattr(plan, "DETECTION_VERSION", "3")
    assert plan.code_versions(PGD(), detection=True) == {"code": {"detection": "3"}}
    from qrobust.suite import WorstCase  # Square's L2 change reaches the worst case's L2 cells only

    assert plan.code_versions(WorstCase(eps=0.3)) == {}
    assert plan.code_versions(WorstCase(eps=1.0, norm="L2")) == {"code": {"attack": "2"}}
    assert plan.code_versions(PGD()) == {}


def test_train_table_keys_are_train_config_fields(tmp_path):
    from dataclasses import fields

    from qrobust.experiment.config import train_keys
    from qrobust.train import TrainConfig

    assert set(train_keys()) == {f.name for f in fields(TrainConfig)}
    doc = _doc(train={"lr_schedule": "cosine", "adv_weight": 1.0, "epochs": 1, "co_guard": True,
                      "channels_last": False})
    want = {"lr_schedule": "cosine", "adv_weight": 1.0, "epochs": 1, "co_guard": True, "channels_last": False}
    assert parse_config(doc, source="q.toml").train == want
    for bad, message in (({"lr_schedule": "step"}, "train.lr_schedule: lr schedule must be one of"),
                         ({"co_guard": 1}, "train.co_guard: must be true or false"),
                         ({"epochs": True}, "train.epochs: must be a whole number"),
                         ({"adv_weight": 0}, "train.adv_weight: adversarial loss weight"),
                         ({"lr": 0}, "train.lr: must be positive")):
        with pytest.raises(QrobustError, match=message):
            parse_config(_doc(train=bad), source="q.toml")


def _cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "qrobust.cli.run", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _rows(db: Path) -> dict[str, tuple[float, float]]:
    if not db.exists():
        return {}
    try:
        con = sqlite3.connect(db, timeout=5)
        try:
            return {k: (acc, t) for k, acc, t in con.execute("SELECT key, accuracy, created_at FROM results")}
        finally:
            con.close()
    except sqlite3.OperationalError:  # schema not created yet
        return {}


def test_sigkill_midway_then_rerun_resumes_without_redoing_work(tmp_path):
    cfg = _write_tiny(tmp_path / "tiny.toml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    killed_db = tmp_path / "killed" / "store.sqlite"
    proc = _cli([str(cfg), "--out", "killed", "--quiet"], tmp_path, env)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(_rows(killed_db)) < 3:
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed: " + proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = _rows(killed_db)
    assert 3 <= len(before) < 11, len(before)

    resumed = _cli([str(cfg), "--out", "killed", "--quiet"], tmp_path, env)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    after = _rows(killed_db)
    assert summary["total"] == len(after) == 11
    assert summary["computed"] == 11 - len(before) and summary["models_trained"] == 0
    for key, (acc, created) in before.items():  # finished units untouched (same timestamps)
        assert after[key] == (acc, created)

    # An uninterrupted run (in-process, one thread like the subprocesses) gives the same numbers.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = run_experiment(load_config(cfg, output=str(tmp_path / "clean")), progress=False, report=False)
    finally:
        torch.set_num_threads(threads)
    assert {r["key"]: r["accuracy"] for r in ref.records} == {k: v[0] for k, v in after.items()}
    assert (tmp_path / "killed" / "report" / "index.html").is_file()
    assert "| fp |" in out


# A full-precision MNISTconv and an a4w2 one (EMPIR's member kinds).
TWO_MODELS = """
[[models]]
name = "fp"
arch = "mnistconv"

[[models]]
name = "q"
arch = "mnistconv"
options = { abits = 4, wbits = 2 }
"""

ENSEMBLE_CFG = PREAMBLE.format(name="ens", samples=60) + TWO_MODELS + """
[[ensembles]]
name = "e"
members = ["q", "q", "fp"]
targets = ["legacy", "adaptive", "adaptive_logits"]

[[attacks]]
name = "pgd"
eps = [0.1]
alpha = 0.05
steps = 3
models = ["e"]
"""


def test_ensemble_targets_differentiate_what_they_name(tmp_path):
    """legacy / adaptive / adaptive_logits rows attack EMPIR's gradients, mean softmax, mean logits."""
    (tmp_path / "ens.toml").write_text(ENSEMBLE_CFG)
    summary = run_experiment(load_config(tmp_path / "ens.toml", output=str(tmp_path / "out")), progress=False,
                             report=False)
    attacks = {r["mode"]: r for r in summary.records if r["kind"] == "attack"}
    assert set(attacks) == {"legacy", "adaptive", "adaptive_logits"}
    assert attacks["adaptive"]["attack_config"]["target_output"] == "log_mean_softmax"
    assert attacks["adaptive_logits"]["attack_config"]["target_output"] == "mean_logits"
    assert attacks["adaptive_logits"]["row"] == "e [adaptive_logits]"
    assert len({r["key"] for r in attacks.values()}) == 3
    for r in attacks.values():
        # Not "adversarial <= clean accuracy": the labels are the vote's own predictions, so an attack moving
        # an image away from a WRONG vote can land on the true class. What must hold: the attacked vote is
        # right only where the attack failed (vote unchanged, and right) or where the clean vote was wrong,
        # and the record's accuracy is the one of its per-image outcome.
        res, n = r["attack_result"], r["n"]
        assert res["labels"] == "pred" and res["n_attacked"] == n  # labels = vote: every image is attacked
        failed = round((1 - res["success_rate"]) * n)
        clean_wrong = n - round(res["clean_accuracy"] * n)
        assert r["correct"] <= failed + clean_wrong
        assert len(r["correct_mask"]) == n and r["correct_mask"].count("1") == r["correct"]
        assert r["accuracy"] == pytest.approx(r["correct"] / n)


DETECT_CFG = PREAMBLE.format(name="det", samples=40) + """
[[models]]
name = "mcd"
arch = "qnn_fp"
options = { dropout = 0.5, mc_dropout = true }

[[attacks]]
name = "fgsm"
eps = 0.3

[detection]
models = ["mcd"]
attacks = ["FGSM"]
mc_samples = 4
"""


def test_detection_cell_is_what_qrobust_detect_computes(tmp_path):
    """A config's detection cell runs seed A's protocol exactly as `qrobust detect` (run_detection with the
    attack labelling its own batches and the default generators): the same numbers, recomputed here."""
    from qrobust.attacks import create_attack
    from qrobust.detect import run_detection
    from qrobust.experiment import Runner

    (tmp_path / "det.toml").write_text(DETECT_CFG)
    runner = Runner(load_config(tmp_path / "det.toml", output=str(tmp_path / "out")), progress=False,
                    report=False)
    rec = next(r for r in runner.run().records if r["kind"] == "detection")
    model = runner.models.models["mcd"]
    x, y, _ = runner.test_tensors("data", 40)
    torch.manual_seed(12345)  # the cell seeds the RNG itself: what ran before must not matter
    ref = run_detection(model, create_attack("fgsm", eps=0.3, seed=0), x, y, samples=4, attack_batch=200,
                        seed=0).report.as_dict()
    det = rec["detection"]
    assert det["auc"] == pytest.approx(ref["heldout_all"]["seed_variance"]["auc"])
    assert det["uncertainty_adv"] == pytest.approx(ref["mean_stats_adv"]["seed_variance"])
    assert det["lr_score"] == pytest.approx(ref["seed_lr_score"])
    assert rec["accuracy"] == pytest.approx(ref["adv_accuracy"]["single_pass"])
    assert rec["correct"] == round(rec["accuracy"] * 40) and "attack_result" not in rec


SELECT_CFG = PREAMBLE.format(name="sel", samples=40) + TWO_MODELS + """
[[attacks]]
name = "fgsm"
eps = [0.1]

[[attacks]]
name = "pgd"
eps = [0.1]
alpha = 0.05
steps = 2
models = ["q"]
"""


def test_only_selects_models_and_keeps_result_keys(tmp_path):
    """`only` (qrobust run --only) drops the other models and the attacks left without a target; a part's
    results carry the same keys and values as the full run's, so the stores of parts merge."""
    path = tmp_path / "sel.toml"
    path.write_text(SELECT_CFG)
    part = load_config(path, only=["fp"])
    assert [m.name for m in part.models] == ["fp"] and [a.label for a in part.attacks] == ["FGSM"]
    with pytest.raises(QrobustError, match="'nope' is not a model or ensemble of this file; known: fp, q"):
        load_config(path, only=["nope"])
    full = run_experiment(load_config(path, output=str(tmp_path / "full")), progress=False, report=False)
    only_q = run_experiment(load_config(path, output=str(tmp_path / "q"), only=["q"]), progress=False,
                            report=False)
    want = {r["key"]: r["accuracy"] for r in full.records if r["target"] == "q"}
    got = {r["key"]: r["accuracy"] for r in only_q.records}
    assert len(got) == 3 and got == want


def test_detection_cells_follow_each_attacks_models(tmp_path):
    """An attack restricted to some models (`models = [...]`) gets detection cells on those only, so a run of
    part of the file (`only`) and the whole file plan the same detection cells."""
    text = DETECT_CFG.replace('[detection]', '[[attacks]]\nname = "pgd"\neps = 0.3\nalpha = 0.1\nsteps = 2\n'
                              'models = ["mcd2"]\n\n[detection]')
    text = text.replace('models = ["mcd"]', 'models = ["mcd", "mcd2"]').replace('attacks = ["FGSM"]',
                                                                             'attacks = ["FGSM", "PGD"]')
    text = text.replace('[[attacks]]', '[[models]]\nname = "mcd2"\narch = "qnn_fp"\n'
                        'options = { dropout = 0.25, mc_dropout = true }\n\n[[attacks]]', 1)
    (tmp_path / "d.toml").write_text(text)
    from qrobust.experiment.runner import Runner

    runner = Runner(load_config(tmp_path / "d.toml", output=str(tmp_path / "out")), progress=False,
                    report=False)
    with ResultStore(runner.store_path) as store:
        cells = sorted((u.target, u.attack) for u in runner.plan(store) if u.kind == "detection")
    assert cells == [("mcd", "FGSM"), ("mcd2", "FGSM"), ("mcd2", "PGD")]
