"""Every script in examples/ and the README's Python example run (on tiny data), so the docs cannot rot."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pytest

import qrobust

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.py"))


def _run(script: Path, tmp_path: Path):
    spec = importlib.util.spec_from_file_location(f"example_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(["--tiny", "--out", str(tmp_path)])


def _check_attack_quantized(result, out):
    assert set(result) == {"fgsm", "pgd"}
    assert (out / "a4w2" / "config.json").is_file()


def _check_empir_legacy_vs_adaptive(result, out):
    assert set(result) == {f"{a}/{m}" for a in ("fgsm", "pgd") for m in qrobust.THREAT_MODELS}
    assert [p.name for p in sorted(out.iterdir())] == ["a4w2_m1", "a4w2_m2", "fp"]


def _check_mc_dropout_detection(result, out):
    assert 0.0 <= result["auc"] <= 1.0
    assert (out / "roc.png").stat().st_size > 1000


def _check_bitwidth_sweep(result, out):
    assert sorted(result) == [1, 4, 32]
    assert all(set(row) == {"clean", "FGSM", "PGD"} for row in result.values())
    assert (out / "bits.png").stat().st_size > 1000


def _check_tutorial(result, out):
    assert math.isclose(result["mc_probs_sum"], 1.0, rel_tol=1e-5)  # softmax rows of the MC passes
    assert result["experiment_results"] > 0 and (out / "run" / "report" / "index.html").is_file()
    assert result["worst_case"] <= result["ensemble_adaptive_logits"]  # worst case is at least as strong
    assert result["worst_case_replayed"] == result["worst_case"]  # its examples fool the vote as reported


CHECKS = {name[len("_check_"):]: fn for name, fn in globals().items() if name.startswith("_check_")}


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_tiny(script, tmp_path, capsys):
    assert script.stem in CHECKS, f"add a check for examples/{script.name} to tests/test_examples.py"
    result = _run(script, tmp_path)
    for value in _flat(result):
        assert 0.0 <= value <= 1.0 or value > 1, value  # accuracies are proportions, counts are counts
    CHECKS[script.stem](result, tmp_path)
    assert capsys.readouterr().out.strip(), "an example shows what it measured"


def _flat(result):
    for value in result.values():
        yield from (_flat(value) if isinstance(value, dict) else [value])


def test_readme_python_example(tmp_path, monkeypatch, capsys):
    """The README's five lines, on fewer images and one short epoch (the text is otherwise unchanged)."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## From Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) == 5
    for full, tiny in (("epochs=3", "epochs=1, max_train=256"), ("head(500)", "head(32)")):
        assert full in code, f"the README example changed: update this test's substitution of {full!r}"
        code = code.replace(full, tiny)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("AttackResult(attack='pgd'") and "adversarial_ci95=(" in out
    assert qrobust.load(tmp_path / "runs" / "a4w2").qrobust_config["kwargs"]["wbits"] == 2
