"""Feed the `qrobust` command bad inputs as real subprocesses and record how it refuses them.

    python scripts/bad_inputs.py            # writes docs/bad_inputs.md

The cases are the table of ``tests/test_bad_inputs.py`` (its single source of truth): each must exit
with the listed code, print exactly one ``error: ...`` line on stderr (no traceback) that says what is
wrong and how to fix it, and leave every file of the workspace byte-identical. The test module runs
the same table in-process; this script runs it as a user would, and writes the table to the docs.
The script exits 1 if any case misbehaves.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qrobust.utils import update_marked_section

REPO = Path(__file__).resolve().parents[1]
QROBUST = [sys.executable, "-m", "qrobust"]

# What each class of bad input gets, and the mechanism that gives it (docs/bad_inputs.md).
CLASSES = {
    "--force on a folder qrobust did not write":
        "refused, with or without --force: `--force` replaces only a folder holding just `model.safetensors` "
        "and a qrobust `config.json` (`checkpoint.check_checkpoint_target`)",
    "labels outside the model's classes":
        "refused before any attack or training: accuracy on labels the model cannot predict is 0% by "
        "construction (`checkpoint.check_labels`, every command)",
    "bad data":
        "refused on load: dtype, shape, NaN pixels, integer labels, counts (`data.load_npz`, "
        "`data.check_images`)",
    "unverified or broken checkpoint":
        "refused before the tensors are read: size against the model, SHA-256 required "
        "(`--trust-unverified` / `load_checkpoint(..., trust_unverified=True)` to override), header and "
        "shapes, finite weights "
        "(`checkpoint.load_checkpoint`)",
    "output is a directory or unwritable":
        "refused before computing (`utils.check_output_file`, `utils.check_writable_dir`)",
    "memory-hungry settings":
        "refused up front when the arrays cannot fit in available memory (`utils.check_memory`)",
    "too few images":
        "refused up front (detection needs a fit half and a held-out half)",
    "experiment file":
        "refused by `qrobust run --check` and `run` alike: every option's type, model options, ensemble "
        "rules, names that become file names (`experiment.config`)",
    "store that is not qrobust's":
        "refused, the database untouched (`ResultStore._check_own`)",
    "argument errors":
        "one `error:` line, no usage dump (`cli.common.one_line_errors`)",
}
IN_PROCESS = [  # (class, what it gets, the test in tests/test_bad_inputs.py)
    ("two `qrobust run` on one output",
     "the second refuses at once: `error: experiment output ... is in use by another qrobust run (pid N)`; "
     "an OS file lock (`utils.output_lock`), released even on SIGKILL",
     "test_second_run_on_one_output_refuses_while_the_first_holds_it"),
    ("full disk (ENOSPC) while writing a result or a checkpoint",
     "`error: cannot write FILE: No space left on device; free disk space ...`, exit 2; the previous file or "
     "checkpoint intact, no temporary files; the finished epochs stay for a rerun",
     "test_full_disk_is_a_clear_error_and_old_files_survive"),
    ("an OS error no check foresaw",
     "`error: <reason> <file>; <what to change>`, exit 1 (`cli.main`)",
     "test_os_errors_that_escape_become_one_line"),
    ("resume with other data or other adversarial-training settings",
     "refused: the resume fingerprint covers the model, every training setting, a hash of the training "
     "arrays, the training attack and the qrobust version (`train._fingerprint`)",
     "test_resume_refuses_other_data_or_adversarial_settings"),
    ("`--epochs 0`",
     "a valid checkpoint whose `config.json` records `test_accuracy: null` (never `NaN`)",
     "test_epochs_zero_writes_valid_json"),
    ("hand-edited checkpoint, trusted",
     "`--trust-unverified` loads it",
     "test_unverified_checkpoint_loads_only_when_trusted"),
    ("`--force` over a qrobust checkpoint / over one holding a user file",
     "replaced / refused, the user file kept",
     "test_force_replaces_a_qrobust_checkpoint_only"),
]


def load_table():
    spec = importlib.util.spec_from_file_location("bad_inputs_table", REPO / "tests" / "test_bad_inputs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def run_case(argv: list[str], ws: Path, env: dict[str, str], in_process: bool) -> tuple[int, str]:
    """Exit code and stderr of ``qrobust ARGV`` run in ``ws``: a subprocess, or ``qrobust.cli.main``
    in this process (same exit codes; seconds instead of minutes on a busy machine)."""
    if not in_process:
        proc = subprocess.run([*QROBUST, *argv], capture_output=True, text=True, env=env, cwd=ws, timeout=600)
        return proc.returncode, proc.stderr
    from qrobust.cli import main as cli_main

    err, cwd = io.StringIO(), os.getcwd()
    os.chdir(ws)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = cli_main(argv)
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(cwd)
    return code, err.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "docs" / "bad_inputs.md"))
    ap.add_argument("--in-process", action="store_true",
                    help="call qrobust.cli.main in this process instead of one subprocess per case")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    table = load_table()
    rows, failures, t0 = [], 0, time.time()
    with tempfile.TemporaryDirectory(prefix="qrobust-bad-") as tmp:
        ws = Path(tmp)
        p = table.build_workspace(ws)
        (ws / "mnistdir").mkdir()
        (ws / "mnistdir" / "mnist.npz").write_bytes(p["labels"].read_bytes())
        for case in table.cases(p):
            before = table.tree_digest(ws)
            code, stderr = run_case(case.argv, ws, env, args.in_process)
            err = stderr.strip()
            problems = []
            if code != case.code:
                problems.append(f"exit {code}, expected {case.code}")
            if "Traceback" in stderr or len(err.splitlines()) != 1 or not err.startswith("error: "):
                problems.append(f"{len(err.splitlines())} stderr lines")
            if not re.search(case.pattern, err):
                problems.append("unexpected message")
            if table.tree_digest(ws) != before:
                problems.append("files changed")
            shown = " ".join(["qrobust", *case.argv]).replace(str(ws), "$TMP")
            print(f"{case.klass}: {case.what}: exit {code} {problems or 'OK'}\n    {err}", flush=True)
            rows.append((case, shown, code, err.replace(str(ws), "$TMP"), problems))
            failures += bool(problems)
    lines = [
        f"Generated by `python scripts/bad_inputs.py`: {len(rows)} cases from the table in "
        "`tests/test_bad_inputs.py` (which runs the same table in-process), each "
        + ("called in-process through `qrobust.cli.main` (`--in-process`)" if args.in_process else
           "a real subprocess `python -m qrobust ...`")
        + f" in a scratch folder `$TMP` ({time.time() - t0:.0f} s). `$TMP` holds tiny "
        ".npz files (64 training, 32 test digits) and broken variants, two checkpoints trained for the "
        "occasion and broken copies of them, a user's folder (`thesis/`), another program's SQLite database "
        "and an experiment file.",
        "",
        "A case passes when the command exits with the listed code (2: refused input or resource; 1: an OS "
        "error no check foresaw), prints exactly one line starting with `error:` (no traceback), and leaves "
        "every file of "
        "`$TMP` byte-identical (SHA-256 before and after each case).",
        "",
        "## Classes of bad input and what each gets",
        "",
        "| class | what qrobust does |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in CLASSES.items()],
        *[f"| {k} | {v} (`tests/test_bad_inputs.py::{t}`) |" for k, v, t in IN_PROCESS],
        "",
        "## Every case",
        "",
        "| class | bad input | command | exit | message (stderr) | pass |",
        "|---|---|---|---|---|---|",
    ]
    for case, shown, code, err, problems in rows:
        msg = err.replace("|", "\\|")
        lines.append(f"| {case.klass} | {case.what} | `{shown}` | {code} | {msg} | "
                     f"{'yes' if not problems else 'NO: ' + '; '.join(problems)} |")
    lines += ["", f"Result: {'all cases pass' if not failures else f'{failures} case(s) failed'}."]
    update_marked_section(args.out, "bad-inputs", "\n".join(lines),
                          title="Bad inputs: how `qrobust` refuses them")
    print(f"wrote {args.out}: {len(rows)} cases, {failures} failed")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
