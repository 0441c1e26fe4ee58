"""Report tables, figures and index page built from hand-made result records (no models needed)."""

from __future__ import annotations

import csv
import io
import json

from qrobust.report import check_results, detection_table, summary_table, write_report
from qrobust.report.sanity import slack


def _rec(row, attack, eps, acc, *, target=None, n=100, bits="FP", name=None, ensemble=False, kind="attack"):
    return {
        "kind": kind,
        "row": row,
        "target": target or row.split(" [")[0],
        "attack": attack,
        "attack_name": name or attack.lower(),
        "eps": eps,
        "accuracy": acc,
        "n": n,
        "bits": bits,
        "ensemble": ensemble,
        "ci95": [max(0.0, acc - 0.05), min(1.0, acc + 0.05)],
        "model_hash": "ab" * 32,
        "key": f"{row}-{attack}-{eps}",
        "seed": 0,
        "samples": n,
        "qrobust_version": "0.1.0",
        "attack_config": {"attack": attack.lower(), "eps": eps},
    }


def _clean(target, acc, bits="FP", ensemble=False):
    return _rec(target, "clean", None, acc, kind="clean", bits=bits, ensemble=ensemble, name="clean")


def _records():
    recs = [_clean("fp", 0.99), _clean("q", 0.97, bits="a4w2"), _clean("ens", 0.98, "a4w2/a4w2/FP", True)]
    for row, bits, ens, curve in [
        ("fp", "FP", False, [0.99, 0.5, 0.1]),
        ("q", "a4w2", False, [0.97, 0.6, 0.2]),
        ("ens [legacy]", "a4w2/a4w2/FP", True, [0.98, 0.8, 0.6]),
        ("ens [adaptive]", "a4w2/a4w2/FP", True, [0.98, 0.4, 0.05]),
    ]:
        for attack in ("FGSM", "PGD"):
            for eps, acc in zip([0.0, 0.1, 0.3], curve, strict=True):
                recs.append(
                    _rec(
                        row,
                        attack,
                        eps,
                        acc if attack == "FGSM" else acc * 0.5 if eps else acc,
                        bits=bits,
                        ensemble=ens,
                    )
                )
    recs.append(_rec("ens [adaptive]", "CW", None, 0.02, bits="a4w2/a4w2/FP", ensemble=True, name="cw"))
    return recs


def _detection(row="mcd", attack="FGSM", auc=0.8):
    rec = _rec(row, attack, 0.3, 0.3, kind="detection")
    rec["detection"] = {
        "auc": auc,
        "lr_score": 0.75,
        "clean_accuracy": 0.97,
        "adv_accuracy": 0.3,
        "uncertainty_clean": 2e-3,
        "uncertainty_adv": 1.3e-2,
        "mc_samples": 50,
        "roc": {"fpr": [0, 0.2, 1], "tpr": [0, 0.7, 1]},
    }
    return rec


def test_summary_table_follows_empir_layout():
    recs = _records()
    table = summary_table(recs, [("CW", None), ("FGSM", 0.3), ("PGD", 0.3)])
    assert table.columns[:3] == ["model", "bits", "clean"]
    assert table.columns[3:7] == ["CW", "FGSM (0.3)", "PGD (0.3)", "average"]
    rows = {r[0]: r for r in table.rows}
    assert list(rows) == ["fp", "q", "ens [legacy]", "ens [adaptive]"]
    # The ensemble's one clean accuracy appears on both of its rows.
    assert rows["ens [legacy]"][2] == rows["ens [adaptive]"][2] == "98.00"
    # Average over the attack columns only when every column exists (EMPIR's README convention).
    assert rows["ens [adaptive]"][3:7] == ["2.00", "5.00", "2.50", "3.17"]
    assert rows["fp"][3] == "—" and rows["fp"][6] == "—"
    parsed = list(csv.reader(io.StringIO(table.csv())))
    assert parsed[0] == table.columns and len(parsed) == 5
    md = table.markdown().splitlines()
    assert md[0].startswith("| model | bits | clean | CW") and len(md) >= 6
    # JSON rows carry the records they were built from (provenance).
    data = table.as_dict()["rows"][3]
    assert {r["attack"] for r in data["records"]} == {"clean", "CW", "FGSM", "PGD"}
    assert all("model_hash" in r and "attack_config" in r for r in data["records"])


def test_summary_default_columns_pick_largest_bounded_eps():
    table = summary_table([r for r in _records() if r["attack"] != "CW"])
    assert table.columns[3:5] == ["FGSM (0.3)", "PGD (0.3)"]


def test_detection_table_and_auc_column():
    recs = [*_records(), _clean("mcd", 0.97), _detection(), _detection(attack="PGD", auc=0.55)]
    det = detection_table(recs)
    assert [r[:2] for r in det.rows] == [["mcd", "FGSM"], ["mcd", "PGD"]]
    assert det.rows[0][9] == "0.800" and det.rows[0][7] == "0.002"
    table = summary_table(recs, [("FGSM", 0.3), ("PGD", 0.3)])
    assert "AUC FGSM" in table.columns and "AUC PGD" in table.columns
    mcd = next(r for r in table.rows if r[0] == "mcd")
    assert mcd[table.columns.index("AUC PGD")] == "0.550"


def test_write_report_creates_tables_figures_and_index(tmp_path):
    recs = [*_records(), _clean("mcd", 0.97), _detection()]
    report = write_report(
        recs,
        tmp_path / "rep",
        columns=[("CW", None), ("FGSM", 0.3), ("PGD", 0.3)],
        meta={"experiment": "unit"},
    )
    names = {p.name for p in report.files}
    assert {
        "results.md",
        "results.csv",
        "results.json",
        "results_by_eps.csv",
        "sanity.md",
        "detection.md",
        "index.html",
        "report.md",
    } <= names
    figs = {p.name for p in report.figures}
    assert figs == {
        "acc_vs_eps_fgsm.png",
        "acc_vs_eps_pgd.png",
        "acc_vs_eps_cw.png",
        "roc.png",
        "robustness_vs_bits.png",
    } - {"acc_vs_eps_cw.png"}
    for p in report.figures:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    index = (tmp_path / "rep" / "index.html").read_text()
    for name in figs | {"results.csv", "results.json"}:
        assert f"href='{name}'" in index
    data = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert data["meta"]["experiment"] == "unit" and "sanity" in data
    # The legacy ensemble row (50% PGD at eps 0.3 but no eps >= 1) is not flagged; nothing here violates.
    assert report.sanity.ok, report.sanity.violations


def test_sanity_flags_show_in_the_table():
    recs = _records() + [_rec("q", "PGD", 1.0, 0.9, bits="a4w2")]  # accuracy rises and stays high at eps 1
    report = check_results(recs_with_clean(recs))
    assert report.flagged_rows() == {"q"}
    table = summary_table(recs, [("FGSM", 0.3)], sanity=report)
    status = {r[0]: r[-1] for r in table.rows}
    assert status["q"] == "**suspected gradient masking**" and status["fp"] == "ok"


def recs_with_clean(recs):
    from qrobust.report.index import sanity_rows

    return sanity_rows(recs)


def test_slack_is_sampling_noise():
    assert slack(0.5, 100) == 0.05
    assert slack(0.0, 1000) == 2 / 1000
    assert slack(0.5, 100, tolerance=0.1) == 0.15000000000000002


def _script(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_empir_page_is_rendered_from_the_store_with_generated_findings(tmp_path):
    """scripts/reproduce_empir.py reads a run's store: the worst-per-image row combines the stored per-image
    outcomes, and every findings number is the table's (hand-made records: 4 images)."""
    from pathlib import Path

    from qrobust.experiment import ResultStore, load_config

    empir = _script("reproduce_empir")
    cfg = load_config(Path(empir.REPO) / "configs" / "empir_mnist.toml")
    masks = {"legacy": "1110", "adaptive": "0111", "adaptive_logits": "1101"}  # worst per image: 0100
    recs = [{"kind": "clean", "target": t, "attack": "clean", "eps": None, "mode": None, "accuracy": 1.0,
             "correct": 4, "n": 4} for t in ("empir", "fp")]
    for a in empir.ATTACKS:
        eps = cfg.attack(a).table_eps
        recs += [{"kind": "attack", "target": "empir", "attack": a, "eps": eps, "mode": m, "n": 4,
                  "accuracy": k.count("1") / 4, "correct": k.count("1"), "correct_mask": k,
                  "attack_config": {"eps": eps}} for m, k in masks.items()]
        recs.append({"kind": "attack", "target": "fp", "attack": a, "eps": eps, "mode": None, "n": 4,
                     "accuracy": 0.25, "correct": 1, "correct_mask": "0001", "attack_config": {"eps": eps}})
    # the per-image worst case (suite: APGD-CE breaks 2 images, Square the other 2) and qrobust's CW-L2
    per = [{"attack": "apgd_ce", "attacked": 4, "broken": 2, "robust_accuracy": 0.5},
           {"attack": "square", "attacked": 2, "broken": 2, "robust_accuracy": 0.0}]
    wc = cfg.attack(empir.WORST)
    recs += [{"kind": "attack", "target": t, "attack": empir.WORST, "eps": wc.table_eps, "mode": m, "n": 4,
              "accuracy": 0.0, "correct": 0, "correct_mask": "0000", "attack_name": "worst_case",
              "attack_config": {"eps": wc.table_eps, "report": {"per_attack": per}}}
             for t, m in (("empir", "adaptive_logits"), ("fp", None))]
    recs += [{"kind": "attack", "target": "empir", "attack": empir.CW_QROBUST, "eps": None, "mode": m, "n": 4,
              "accuracy": 0.25, "correct": 1, "attack_config": {}, "attack_result": {"mean_l2": 1.5}}
             for m in ("adaptive", "adaptive_logits")]  # the seeds' CW-L2 left 3 of 4 in both (masks above)
    store = tmp_path / "store.sqlite"
    with ResultStore(store) as st:
        for i, r in enumerate(recs):
            st.put_result({**r, "key": f"k{i}", "seconds": 0.0, "qrobust_version": "0.1.0"})
    page = empir.render("mnist", cfg, empir.latest_records(store), "python scripts/reproduce_empir.py", store)
    worst = next(line for line in page.splitlines() if "worst of legacy, adaptive, adaptive logits" in line)
    # image 2 alone survives all three threat models; the worst case (0 of 4: Wilson [0, 3.84 / 7.84])
    assert worst.count("25.0 [") == 4 and worst.endswith("| 25.00 | 0.0 [0.0, 49.0] |")
    wc_row = next(line for line in page.splitlines() if line.startswith("| EMPIR a4w2/a4w2/FP |"))
    assert "| **0.0 [0.0, 49.0]** | apgd_ce 50.0 → square 0.0 | 2 |" in wc_row
    # every seeds' cell of the ensemble left 3 of 4 images; CW-L2 (L2, unbounded) is not an L-inf cell at 0.3
    assert "75.0 [30.1, 95.4] (FGSM legacy)" in wc_row
    assert "75.0 points below its strongest seeds'-protocol cell" in page
    assert "gradient masking suspected" in page
    assert "Square (gradient-free) broke 2 images" in page
    assert "from 75.0% to 25.0% (mean L2 of successes — → 1.50)" in page
    assert "`qrobust run configs/empir_mnist.toml --data-root ../shared/data" in page
    assert "legacy) the ensemble keeps 75.00% on average" in page  # 3 of 4 images under every attack
    assert "falls to 25.00% (-50.00 points from legacy" in page
    assert "baseline alone averages 25.00% (README: 4.92%)" in page
    assert "| EMPIR, README (10,000 images) | 98.89 |" in page
    assert page.startswith("Rendered by `python scripts/reproduce_empir.py` on ")


def test_qnn_detection_page_findings_come_from_the_stored_cells(tmp_path):
    from pathlib import Path

    from qrobust.experiment import ResultStore, load_config

    qnn = _script("reproduce_qnn_detection")
    cfg = load_config(Path(qnn.REPO) / "configs" / "qnn_detection_mnist.toml")

    def det(attack, auc, unc_adv):
        stat = {"auc": auc, "auc_ci95": [auc - 0.01, auc + 0.01], "tpr@0.05fpr": 0.5, "n_pos": 10}
        report = {"n": 100, "clean_accuracy": {"single_pass": 0.98, "group": 0.99},
                  "adv_accuracy": {"single_pass": 0.1, "group": 0.2}, "seed_lr_score": 0.7,
                  "heldout_lr_accuracy": 0.6, "mean_stats_clean": {"seed_variance": 1e-3},
                  "mean_stats_adv": {"seed_variance": unc_adv},
                  "heldout_all": {k: stat for k in ("seed_variance", "entropy", "mutual_info", "pred_var")},
                  "heldout_success": {"seed_variance": stat}}
        return {"kind": "detection", "target": "fp_d05", "attack": attack, "eps": 0.3, "mode": None,
                "n": 100, "accuracy": 0.1, "correct": 10, "attack_config": {"eps": 0.3}, "seconds": 1.0,
                "detection": {"auc": auc, "adv_accuracy": 0.2, "uncertainty_clean": 1e-3,
                              "uncertainty_adv": unc_adv, "roc": {"fpr": [0, 1], "tpr": [0, 1]},
                              "report": report}}

    store = tmp_path / "store.sqlite"
    with ResultStore(store) as st:
        for i, r in enumerate([det("JSMA", 0.95, 2e-2), det("PGD detector-aware K=4", 0.40, 5e-5)]):
            st.put_result({**r, "key": f"k{i}"})
    page = qnn.render(cfg, qnn.latest_records(store), "python scripts/reproduce_qnn_detection.py", store,
                      tmp_path / "qnn.md")
    assert ("FP + dropout 0.5: highest held-out AUC JSMA (AUC 0.950, detected; adversarial accuracy 20.0%; "
            "mean variance 1.00e-03 → 2.00e-02); lowest PGD detector-aware K=4 (AUC 0.400, inverted: the "
            "adversarial inputs look more certain than the clean ones; adversarial accuracy 20.0%; mean "
            "variance 1.00e-03 → 5.00e-05).") in page
    assert "| FP + dropout 0.5 | JSMA | 100 | 99.2 / 32.8 / 93.9 |" in page  # seed A's logged row beside
    assert "per-image worst case" not in page  # no worst-case cell stored: no such section
    assert ("Models on this page: FP + dropout 0.5 (`qnn_fp_d05`, 2 cells); the cells took 0 min of compute. "
            "Recompute with") in page
    assert ("then this script. Not run into this store (no rows below): `qnn_2bit_d05`, `qnn_3bit_d05`, "
            "`qnn_4bit_d05`, `qnn_5bit_d05`, `qnn_bnn`, `qnn_rbnn`;") in page
    assert (tmp_path / "figures" / "qnn_detection_fp_d05.png").is_file()


def test_qnn_detection_page_shows_the_worst_case_beside_the_seed_attacks(tmp_path):
    """The defense-accuracy section: the seed's attacks, the strongest adaptive row (lowest accuracy) and the
    EOT suite's worst case with its stored breakdown, per model (hand-made records, 10 images)."""
    from pathlib import Path

    from qrobust.experiment import ResultStore, load_config

    qnn = _script("reproduce_qnn_detection")
    cfg = load_config(Path(qnn.REPO) / "configs" / "qnn_detection_mnist.toml")
    per = [{"attack": "apgd_ce_eot", "broken": 4, "robust_accuracy": 0.3},
           {"attack": "apgd_t_eot", "broken": 0, "robust_accuracy": 0.3},
           {"attack": "square_eot", "broken": 1, "robust_accuracy": 0.2}]

    def rec(attack, correct, **extra):
        eps = cfg.attack(attack).table_eps if attack != "clean" else None
        return {"kind": "clean" if attack == "clean" else "attack", "target": "rbnn", "attack": attack,
                "eps": eps, "mode": None, "n": 10, "accuracy": correct / 10, "correct": correct, **extra}

    recs = [rec("clean", 9), rec("FGSM", 6), rec("PGD", 5), rec("PGD EOT K=4", 4), rec("FGSM EOT K=4", 7),
            # the suite judges on the Monte-Carlo mean (2 of 10 robust); one pass on its outputs says 3
            rec(qnn.WORST, 3, attack_name="worst_case",
                attack_config={"report": {"per_attack": per, "worst_case_accuracy": 0.2, "n": 10}})]
    store = tmp_path / "store.sqlite"
    with ResultStore(store) as st:
        for i, r in enumerate(recs):
            st.put_result({**r, "key": f"k{i}", "seconds": 12.0})
    page = qnn.render(cfg, qnn.latest_records(store), "python scripts/reproduce_qnn_detection.py", store,
                      tmp_path / "qnn.md")
    row = next(line for line in page.splitlines() if line.startswith("| randomized BNN | 10 |"))
    # clean 9/10 (Wilson [59.6, 98.2]); FGSM, PGD, JSMA (not run); strongest adaptive = PGD EOT (4/10)
    assert row.startswith("| randomized BNN | 10 | 90.0 [59.6, 98.2] | 60.0 [31.3, 83.2] | "
                          "50.0 [23.7, 76.3] | – | 40.0 [16.8, 68.7] (PGD EOT K=4) | "
                          "**20.0 [5.7, 51.0]** (one pass on its outputs: 30.0) | ")
    assert "apgd_ce_eot 30.0 → apgd_t_eot 30.0 → square_eot 20.0 | 1 | 12 |" in row
    assert ("randomized BNN: worst case 20.0% at eps 0.3, 20.0 points below the strongest other attack, "
            "PGD EOT K=4 (40.0%); Square broke 1 "
            "image every gradient attack of the suite left standing.") in page


def test_bitwidth_page_puts_pgd_beside_the_worst_case_per_bit_width(tmp_path):
    """scripts/reproduce_bitwidth.py: one row per bit width (sorted, FP = 32), the PGD - worst gap, Square's
    share from the stored suite report, findings from the numbers and a figure (hand-made records)."""
    from pathlib import Path

    from qrobust.experiment import ResultStore, load_config

    bw = _script("reproduce_bitwidth")
    cfg = load_config(Path(bw.REPO) / "configs" / "bitwidth_mnist.toml")
    assert [bw.bits_of(m) for m in cfg.models] == [1, 2, 4, 8, 32]
    # (model, PGD correct at 0.1, worst-case correct at 0.1) of 10 images; 0.3 left unrun
    cells = {"w1a1": (8, 1), "w4a4": (6, 4), "fp": (3, 3)}
    per = [{"attack": "apgd_ce", "broken": 5}, {"attack": "apgd_t", "broken": 1},
           {"attack": "square", "broken": 3}]
    recs = []
    for m, (p, w) in cells.items():
        recs.append({"kind": "clean", "target": m, "attack": "clean", "eps": None, "mode": None, "n": 10,
                     "accuracy": 1.0, "correct": 10})
        recs.append({"kind": "attack", "target": m, "attack": "PGD", "eps": 0.1, "mode": None, "n": 10,
                     "accuracy": p / 10, "correct": p, "attack_config": {"steps": 40}})
        recs.append({"kind": "attack", "target": m, "attack": "worst case", "eps": 0.1, "mode": None, "n": 10,
                     "accuracy": w / 10, "correct": w, "attack_name": "worst_case",
                     "attack_config": {"steps": 100, "report": {"per_attack": per}}})
    store = tmp_path / "store.sqlite"
    with ResultStore(store) as st:
        for i, r in enumerate(recs):
            st.put_result({**r, "key": f"k{i}", "seconds": 30.0, "qrobust_version": "0.1.0"})
    out = tmp_path / "bitwidth.md"
    page = bw.render(cfg, bw.latest_records(store), "python scripts/reproduce_bitwidth.py", store, out)
    rows = [line for line in page.splitlines() if line.startswith("| ") and "MNISTconv" in line]
    assert [r.split(" | ")[0] for r in rows] == ["| 1", "| 2", "| 4", "| 8", "| 32"]
    # w1a1: PGD 80.0 (Wilson 8/10 = [49.0, 94.3]), worst case 10.0, gap +70.0, Square broke 3
    assert "| 80.0 [49.0, 94.3] | **10.0 [1.8, 40.4]** | +70.0 | 3 | not run | not run | — | — |" in rows[0]
    assert "not run" in rows[1] and "+0.0" in rows[4]
    assert ("At eps 0.1 the per-image worst case ranges from 10.0% (1 bits) to 40.0% (4 bits); PGD "
            "overstates it most at 1 bits, by 70.0 points (80.0% vs 10.0%); gradient masking suspected (PGD "
            "10+ points above the worst case) at 1, 4 bits.") in page  # fp's gap is 0: not flagged
    assert "Compute time of the cells: 4.5 min" in page  # 9 cells x 30 s
    assert (tmp_path / "figures" / "bitwidth_mnist.png").is_file()
