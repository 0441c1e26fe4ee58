"""The front door: the top-level API (`import qrobust`) and the documentation site built strictly."""

from __future__ import annotations

import argparse
import ast
import html as html_lib
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qrobust
from conftest import require_peer
from qrobust.errors import QrobustError

REPO = Path(__file__).resolve().parents[1]
INIT = REPO / "src" / "qrobust" / "__init__.py"


def _hooks():
    path = REPO / "docs" / "hooks" / "reference.py"
    spec = importlib.util.spec_from_file_location("qrobust_docs_hooks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _type_checking_imports() -> dict[str, str]:
    """{name: module} imported under ``if TYPE_CHECKING:`` in qrobust/__init__.py (what type checkers see)."""
    tree = ast.parse(INIT.read_text())
    block = next(n for n in tree.body
                 if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    return {alias.name: node.module for node in block.body if isinstance(node, ast.ImportFrom)
            and node.module.startswith("qrobust") for alias in node.names}


def test_every_exported_name_is_its_home_modules_object():
    for name, home in qrobust._EXPORTS.items():
        assert getattr(qrobust, name) is getattr(importlib.import_module(home), name), name
    assert set(qrobust.__all__) == {"QrobustError", "__version__", "load", *qrobust._EXPORTS}
    assert len(qrobust.__all__) == len(set(qrobust.__all__))
    # type checkers see the TYPE_CHECKING imports: they must be the lazy table, name for name
    assert _type_checking_imports() == qrobust._EXPORTS
    assert {"PGD", "Ensemble", "evaluate_attack", "run_detection", "run_experiment"} <= set(dir(qrobust))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        qrobust.nope  # noqa: B018


def test_api_covers_the_issue_list():
    """Create/load models, every registered attack, ensembles and threat models, evaluation with intervals,
    the worst case, Monte-Carlo detection, experiment files."""
    from qrobust.attacks import attack_class, attack_names

    for cls in map(attack_class, attack_names()):
        assert getattr(qrobust, cls.__name__) is cls, f"attack {cls.__name__} is not exported"
    assert qrobust.THREAT_MODELS == ("legacy", "adaptive", "adaptive_logits")
    for name in ("create_model", "load", "resolve_checkpoint", "load_checkpoint", "create_attack",
                 "Ensemble", "ensemble_attack", "accuracy", "evaluate_attack", "wilson_interval",
                 "worst_case", "mc_probs", "run_detection", "load_config", "run_experiment"):
        assert callable(getattr(qrobust, name)), name


def test_import_qrobust_does_not_import_torch():
    code = "import sys, qrobust; assert 'torch' not in sys.modules; print(len(dir(qrobust)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == len(qrobust.__all__)


def test_load_is_the_resolver_plus_load_checkpoint(tmp_path):
    torch.manual_seed(0)
    original = qrobust.create_model("mnistconv", wbits=2, abits=4).eval()
    qrobust.save_checkpoint(tmp_path / "a4w2", original)
    model = qrobust.load(tmp_path / "a4w2")
    same, config = qrobust.load_checkpoint(tmp_path / "a4w2")
    x = torch.rand(8, 1, 28, 28)
    assert not model.training and config["model"]["kwargs"]["wbits"] == 2
    assert torch.equal(model(x), same(x))
    assert torch.equal(model(x), original(x))
    with pytest.raises(QrobustError, match="does not exist"):
        qrobust.load(tmp_path / "missing")


def test_cli_reference_lists_every_subcommand_and_option():
    from qrobust.cli import build_parser

    text = _hooks().cli_markdown()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert len(sub.choices) >= 7
    for name, parser in sub.choices.items():
        assert f"## `qrobust {name}`" in text
        for action in parser._actions:
            if action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction):
                for flag in action.option_strings:
                    assert f"`{flag}" in text, f"qrobust {name} {flag} missing from the CLI reference"


def test_every_example_is_shown_in_the_docs():
    docs = (REPO / "docs" / "examples.md").read_text() + (REPO / "docs" / "tutorial.md").read_text()
    for script in sorted((REPO / "examples").glob("*.py")):
        assert f'--8<-- "examples/{script.name}:' in docs, f"{script.name} is not included in the docs"


def test_mkdocs_build_strict(tmp_path):
    """`mkdocs build --strict` (what the README gives), offline; generated pages hold what they promise."""
    require_peer("mkdocs")
    require_peer("mkdocstrings_handlers.python")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(site)],
                          cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pages = {p.relative_to(site).as_posix(): p.read_text() for p in site.rglob("*.html")}
    for page in ("index.html", "tutorial.html", "examples.html", "cli.html", "experiments.html",
                 "seeds/empir.html", "seeds/qnn-dropout.html", "api/attacks.html"):
        assert page in pages, page
    for name, html in pages.items():
        for leftover in ("--8&lt;--", "qrobust:cli-reference", "qrobust:attack-params", ":func:<code>"):
            assert leftover not in html, f"{name} still holds {leftover!r}"
        assert "fonts.googleapis" not in html, f"{name} loads web fonts: the site must work offline"
    assert 'id="qrobust.attacks.PGD"' in pages["api/attacks.html"]  # docstrings rendered
    text = {name: html_lib.unescape(re.sub(r"<[^>]+>", "", html)) for name, html in pages.items()}
    assert "qrobust.ensemble_attack(ens, attack, mode" in text["examples.html"]  # code from examples/
    assert "--ensembleThree" in text["seeds/empir.html"]  # the flag mappings
    assert "--measure_uncertainty" in text["seeds/qnn-dropout.html"]
    assert "bash scripts/setup.sh --test && .venv/bin/python -m pytest -q" in text["index.html"]  # README's
    assert "qrobust detect" in text["cli.html"] and "--nb_samples" in text["cli.html"]
    _screenshot_home(site, tmp_path / "home.png")


def _screenshot_home(site: Path, png: Path) -> None:
    """A real browser renders the home page (where Debian's chromium is installed; CI may lack it)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
                    f"--screenshot={png}", (site / "index.html").as_uri()], capture_output=True, timeout=120)
    from matplotlib.image import imread

    image = imread(png)
    assert image.shape[:2] == (900, 1280)
    red, _, blue = image[5, 5, :3]
    assert blue > red + 0.3, "the theme's indigo header bar is missing: the stylesheet did not load"
    body = image[100:, 250:1000, :3].mean(-1)
    assert (body > 0.95).mean() > 0.5 and (body < 0.4).mean() > 0.01  # white page with dark text
