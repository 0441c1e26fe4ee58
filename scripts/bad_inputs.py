"""Feed the `qrobust` command bad inputs as real subprocesses and record how it refuses them.

    python scripts/bad_inputs.py            # writes docs/bad_inputs.md

Every case must exit non-zero with a single ``error: ...`` line on stderr (no traceback) that says
what is wrong and how to fix it, and no existing checkpoint may change unless --force was given.
The script exits 1 if any case misbehaves.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qrobust.utils import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
QROBUST = [sys.executable, "-m", "qrobust"]


def tree_digest(path: Path) -> str:
    """SHA-256 over every file (name and bytes) of a checkpoint directory."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(path).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*QROBUST, *args], capture_output=True, text=True, env=env, timeout=600)


def build_workspace(ws: Path, env: dict[str, str]) -> dict[str, Path]:
    """Tiny datasets (good and broken) and one good checkpoint to attack with bad commands."""
    from qrobust.data import load_dataset

    d = load_dataset("digits")
    x_tr, y_tr = d.train.x[:192, 0].numpy(), d.train.y[:192].numpy()
    x_te, y_te = d.test.x[:64, 0].numpy(), d.test.y[:64].numpy()
    p = {"good": ws / "digits_tiny.npz", "nan": ws / "nan_pixels.npz", "nokeys": ws / "no_keys.npz",
         "labels": ws / "labels_0_to_18.npz", "empty_root": ws / "empty_root", "ckpt": ws / "ckpt",
         "corrupt": ws / "ckpt_corrupt", "rgb": ws / "rgb_32x32.npz", "mismatch": ws / "ckpt_mismatch",
         "file": ws / "a_file"}
    np.savez(p["good"], x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    nan = x_tr.astype(np.float32) / 255
    nan[0, 5, 5] = np.nan
    np.savez(p["nan"], x_train=nan, y_train=y_tr, x_test=x_te.astype(np.float32) / 255, y_test=y_te)
    np.savez(p["nokeys"], images=x_tr, labels=y_tr)
    rgb = np.zeros((8, 32, 32, 3), np.uint8)
    np.savez(p["rgb"], x_train=rgb, y_train=np.zeros(8, np.int64), x_test=rgb, y_test=np.zeros(8, np.int64))
    np.savez(p["labels"], x_train=x_tr, y_train=(y_tr * 2).astype(np.int64), x_test=x_te, y_test=y_te)
    p["empty_root"].mkdir()
    p["file"].write_text("not a directory\n")
    proc = run(["train", "--model", "mnistconv", "--wbits", "2", "--abits", "4", "--data", str(p["good"]),
                "--epochs", "1", "--batch-size", "64", "--quiet", "--out", str(p["ckpt"])], env)
    if proc.returncode != 0:
        raise SystemExit(f"could not train the reference checkpoint:\n{proc.stderr}")
    shutil.copytree(p["ckpt"], p["corrupt"])
    blob = bytearray((p["corrupt"] / "model.safetensors").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (p["corrupt"] / "model.safetensors").write_bytes(bytes(blob))
    shutil.copytree(p["ckpt"], p["mismatch"])
    cfg = json.loads((p["mismatch"] / "config.json").read_text())
    cfg["model"]["kwargs"]["abits"] = 2  # same tensor shapes, different model
    (p["mismatch"] / "config.json").write_text(json.dumps(cfg, indent=2))
    return p


def cases(p: dict[str, Path]) -> list[tuple[str, list[str]]]:
    def train(*extra: str, data: Path | str = p["good"], out: Path | str = p["ws"] / "new_ckpt") -> list[str]:
        base = {"--model": "mnistconv", "--wbits": "2", "--abits": "4", "--data": str(data), "--epochs": "1",
                "--out": str(out)}
        extra_d = dict(zip(extra[::2], extra[1::2], strict=True))
        return ["train", *[t for k, v in {**base, **extra_d}.items() for t in (k, v)], "--quiet"]

    return [
        ("weight bits 0", train("--wbits", "0")),
        ("activation bits 33", train("--abits", "33")),
        ("unknown model name", train("--model", "resnet50")),
        ("missing data file", train(data=p["ws"] / "missing.npz")),
        ("missing data folder", train(data=p["ws"] / "no_such_folder")),
        ("negative epochs", train("--epochs", "-1")),
        ("unwritable output directory (/sys)", train(out="/sys/qrobust-ckpt")),
        ("output parent is a file", train(out=p["file"] / "ckpt")),
        ("NaN pixels in the data", train(data=p["nan"])),
        ("wrong image shape (CIFAR model, MNIST data)",
         train("--model", "cifarconv", "--wbits", "32", "--abits", "32")),
        ("npz without x_train/y_train/x_test/y_test", train(data=p["nokeys"])),
        ("labels beyond the model's 10 classes", train(data=p["labels"])),
        ("named dataset offline, not on disk", train("--data-root", str(p["empty_root"]), data="mnist")),
        ("negative learning rate", train("--lr", "-0.1")),
        ("existing checkpoint without --force", train(out=p["ckpt"])),
        ("eval: corrupt safetensors", ["eval", str(p["corrupt"])]),
        ("eval: config does not match the weights", ["eval", str(p["mismatch"])]),
        ("eval: checkpoint does not exist", ["eval", str(p["ws"] / "nothing")]),
        ("eval: image shape does not match the model", ["eval", str(p["ckpt"]), "--data", str(p["rgb"])]),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "docs" / "bad_inputs.md"))
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rows, failures = [], []
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="qrobust-bad-") as tmp:
        ws = Path(tmp)
        p = build_workspace(ws, env)
        p["ws"] = ws
        protected = {k: tree_digest(p[k]) for k in ("ckpt", "corrupt", "mismatch")}
        for i, (what, argv) in enumerate(cases(p), 1):
            proc = run(argv, env)
            err = proc.stderr.strip()
            problems = []
            if proc.returncode == 0:
                problems.append("exit code 0")
            if "Traceback" in proc.stderr:
                problems.append("traceback")
            if len(err.splitlines()) != 1 or not err.startswith("error: "):
                problems.append(f"{len(err.splitlines())} stderr lines")
            changed = [k for k, digest in protected.items() if tree_digest(p[k]) != digest]
            if changed:
                problems.append(f"checkpoint changed: {', '.join(changed)}")
            if (ws / "new_ckpt").exists():
                problems.append("a checkpoint was written")
            shown = " ".join(["qrobust", *argv]).replace(str(ws), "$TMP")
            print(f"[{i:2d}] {what}: exit {proc.returncode} {problems or 'OK'}\n     {err}",
                  flush=True)
            rows.append((i, what, shown, proc.returncode, err.replace(str(ws), "$TMP"), problems))
            failures += problems
        untouched = all(tree_digest(p[k]) == d for k, d in protected.items())
    lines = [
        "# Bad inputs: how `qrobust` refuses them",
        "",
        "Generated by `python scripts/bad_inputs.py` (each case is a real subprocess "
        f"`{Path(sys.executable).name} -m qrobust ...`; `$TMP` is a scratch folder holding a tiny digits "
        f".npz, broken variants of it, and a checkpoint trained for the occasion). {len(rows)} cases, "
        f"{time.time() - t0:.0f} s.",
        "",
        "A case passes when the command exits non-zero, prints exactly one `error: ...` line on stderr (no "
        "traceback), writes no new checkpoint, and leaves every existing checkpoint byte-identical (SHA-256 "
        "over the checkpoint folders before and after each case).",
        "",
        "| # | bad input | command | exit | message (stderr) | pass |",
        "|---|---|---|---|---|---|",
    ]
    for i, what, shown, code, err, problems in rows:
        msg = err.replace("|", "\\|")
        lines.append(f"| {i} | {what} | `{shown}` | {code} | {msg} | "
                     f"{'✅' if not problems else '❌ ' + '; '.join(problems)} |")
    lines += ["", f"Existing checkpoints unchanged after all cases: {'yes' if untouched else 'NO'}.",
              f"Result: {'all cases pass' if not failures else f'{len(failures)} problem(s)'}.", ""]
    atomic_write_text(args.out, "\n".join(lines))
    print(f"wrote {args.out}: {len(rows)} cases, {failures or 'all pass'}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
