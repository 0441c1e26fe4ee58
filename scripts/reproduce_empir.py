"""Reproduce EMPIR's README table (MNIST or CIFAR-10): baseline, EMPIR legacy attacks, EMPIR adaptive attacks.

    python scripts/reproduce_empir.py --dataset mnist   [--n 1000] [--data-root ../shared/data]
    python scripts/reproduce_empir.py --dataset cifar10 [--n 1000] [--tramer]

Members are the zoo recipes (artifacts/zoo, trained by scripts/train_zoo.py). Every finished cell
(system x attack) is cached in a JSON file written atomically (default artifacts/empir/<dataset>.json)
and skipped on rerun, so an interrupted run resumes; the cache key includes the checkpoints' SHA-256,
the attack settings and the number of images. Writes docs/results/empir_<dataset>.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

import qrobust
from qrobust.attacks import create_attack
from qrobust.checkpoint import CONFIG, load_checkpoint
from qrobust.data import load_dataset
from qrobust.ensemble import THREAT_MODELS, Ensemble, ensemble_attack
from qrobust.evaluate import accuracy, evaluate_attack, predict, wilson_interval
from qrobust.recipes import ensure_trained
from qrobust.utils import atomic_write_json, resolve_device, update_marked_section

REPO = Path(__file__).resolve().parents[1]
ATTACKS = ("cw", "fgsm", "bim", "pgd")
SYSTEMS = ("baseline", *THREAT_MODELS)
# Systems other than "baseline" are the ensemble threat models (qrobust.ensemble.THREAT_MODELS): the mean
# softmax of "adaptive" (Tramer et al.'s choice) saturates on confident members, so "adaptive_logits"
# attacks the mean of the members' logits too.

SETUPS: dict[str, dict[str, Any]] = {
    "mnist": {
        "eps": 0.3,
        "members": ("mnistconv_a4w2_m1", "mnistconv_a4w2_m2", "mnistconv_fp"),
        "precisions": ("abits=4, wbits=2", "abits=4, wbits=2", "full precision"),
        "baseline": "mnistconv_fp",
        "baseline_name": "MNISTconv",
        # README: clean, CW, FGSM, BIM, PGD, average
        "readme_empir": (98.89, 86.73, 67.06, 18.61, 17.51, 47.48),
        "readme_baseline": (98.87, 3.69, 14.32, 0.90, 0.77, 4.92),
        "seed_epochs": "15 (mnist_attack.py --nb_epochs default)",
    },
    "cifar10": {
        "eps": 0.1,
        "members": ("cifarconv_a2w4", "cifarconv_a2w2", "cifarconv_fp"),
        "precisions": ("abits=2, wbits=4", "abits=2, wbits=2", "full precision"),
        "baseline": "cifarconv_fp",
        "baseline_name": "CIFARconv",
        "readme_empir": (72.56, 48.51, 20.45, 24.59, 13.55, 26.78),
        "readme_baseline": (74.54, 13.38, 10.28, 11.97, 10.69, 11.58),
        "seed_epochs": "not stated in the README (spec: about 6?)",
    },
}


PROTOCOL = """
Protocol:

- Untargeted; labels = the attacked system's own clean predictions (as EMPIR); accuracy against the true
  labels. L-inf attacks: eps {eps}; FGSM one step; BIM 0.01 x 40 from the clean image; PGD 0.01 x 40
  from a uniform random start (seed 0); CW-L2 one binary step, 50 iterations, lr 0.1, c 10, confidence 0,
  abort early. Pixels in [0, 1]; attack batch {batch} (EMPIR: 100; CW's abort-early test is per batch).
- EMPIR prediction = the vote: majority of the members' argmax, the full-precision member (model 3)
  when all three disagree (`qrobust.ensemble.Ensemble`, rule `vote`). Success is always scored on the vote.
- **legacy** = what EMPIR's code differentiated: FGSM and PGD ascend the cross-entropy of the mean softmax
  of the members that agree with the vote (recomputed on the current adversarial input at every step, as
  the TensorFlow graph did), those probabilities being fed to the cross-entropy as logits; BIM and CW-L2
  see only the full-precision member (a layer-name collision in EMPIR's model dictionary).
- **adaptive** = cross-entropy on the log of the mean softmax of all three members (CW-L2: the margin on
  it), straight-through gradients through every quantizer (including the input quantizer of conv1).
  **adaptive, mean logits** = the same on the mean of the three members' logits: the mean softmax
  saturates when members are confident (their softmax gradients vanish), the logits do not.
- Worst of legacy and adaptive: an image counts as robust only if the vote survives every version run.
- Baseline = the full-precision member alone (`{baseline}`, the same checkpoint as model 3, as in EMPIR,
  where the baseline and model 3 share one download link); plain cross-entropy on its logits.
- Seed's training: {seed_epochs}; ours: the member table above (CPU budget).
"""


def attack_params(name: str, eps: float) -> dict[str, Any]:
    """EMPIR's settings (spec: BIM/PGD 0.01 x 40; CW-L2 1 binary step, 50 iterations, lr 0.1, c 10)."""
    if name == "fgsm":
        return {"eps": eps}
    if name == "bim":
        return {"eps": eps, "alpha": 0.01, "steps": 40}
    if name == "pgd":
        return {"eps": eps, "alpha": 0.01, "steps": 40, "random_start": True, "seed": 0}
    if name == "cw":
        return {"c": 10.0, "steps": 50, "lr": 0.1, "binary_steps": 1, "confidence": 0.0, "abort_early": True}
    if name == "tramer_pgd":
        return {"eps": 8 / 255, "alpha": 0.0078, "steps": 100, "random_start": True, "seed": 0}
    raise ValueError(name)


class Cache:
    """One JSON file of finished cells, rewritten atomically after each cell."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str) -> dict[str, Any] | None:
        return self.data.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.data[key] = value
        atomic_write_json(self.path, self.data)


def checkpoint_path(name: str, zoo: Path, data_root: str, train_missing: bool, device: torch.device) -> Path:
    path = zoo / name
    if (path / CONFIG).is_file():
        return path
    if not train_missing:
        sys.exit(f"error: checkpoint {path} is missing; train it first "
                 f"(python scripts/train_zoo.py --only {name}) or pass --train-missing")
    return ensure_trained(name, zoo_dir=zoo, data_root=data_root, device=device)


def fmt(acc: float | None, n: int | None = None) -> str:
    if acc is None:
        return "—"
    if n is None:
        return f"{acc:.2f}"
    lo, hi = wilson_interval(round(acc * n / 100), n)
    return f"{acc:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=sorted(SETUPS), required=True)
    ap.add_argument("--n", type=int, default=1000, help="first N test images (default 1000)")
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--zoo", default=str(REPO / "artifacts" / "zoo"))
    ap.add_argument("--cache", default=None,
                    help="JSON cache of finished cells (default artifacts/empir/<dataset>.json)")
    ap.add_argument("--out", default=None, help="markdown file (default docs/results/empir_<dataset>.md)")
    ap.add_argument("--batch-size", type=int, default=100, help="attack batch size (EMPIR: 100)")
    ap.add_argument("--systems", nargs="*", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--attacks", nargs="*", default=list(ATTACKS), choices=ATTACKS)
    ap.add_argument("--tramer", action="store_true",
                    help="add Tramer et al.'s adaptive PGD (mean softmax, eps 8/255, 0.0078 x 100)")
    ap.add_argument("--train-missing", action="store_true", help="train missing zoo checkpoints (slow)")
    ap.add_argument("--no-doc", action="store_true", help="do not write the markdown (timing runs)")
    ap.add_argument("--deadline", default=None, help="HH:MM UTC: start no new attack batch after this time")
    ap.add_argument("--render-only", action="store_true",
                    help="write the markdown from the cached cells only (missing cells show as —)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    setup = SETUPS[args.dataset]
    device = resolve_device(args.device)
    zoo = Path(args.zoo)
    cache = Cache(Path(args.cache) if args.cache else REPO / "artifacts" / "empir" / f"{args.dataset}.json")
    out_md = Path(args.out) if args.out else REPO / "docs" / "results" / f"empir_{args.dataset}.md"
    t_start = time.time()

    need_ensemble = bool(set(args.systems) - {"baseline"}) or args.tramer or not args.no_doc
    paths = [checkpoint_path(n, zoo, args.data_root, args.train_missing, device) for n in setup["members"]
             ] if need_ensemble else []
    # vote rule; member 3 (FP) breaks ties
    ens = Ensemble.from_checkpoints(paths, device=device) if need_ensemble else None
    baseline, base_cfg = load_checkpoint(checkpoint_path(setup["baseline"], zoo, args.data_root,
                                                         args.train_missing, device), device)
    configs = ens.member_configs if ens is not None else []
    data = load_dataset(args.dataset, root=args.data_root)
    x, y = data.test.head(args.n).tensors(device)
    n = len(y)
    shas = "-".join(c.get("weights_sha256", "?")[:10] for c in configs)

    def cell_key(system: str, attack: str, params: dict[str, Any], start: int | None, size: int,
                 combine: str = "mean_softmax") -> str:
        sha = base_cfg.get("weights_sha256", "?")[:10] if system == "baseline" else shas
        where = [size] if start is None else [start, size]  # whole cell (n) or one batch (start, size)
        return json.dumps([args.dataset, *where, system, attack, params, combine, sha])

    def past_deadline() -> bool:
        return bool(args.deadline) and time.strftime("%H:%M", time.gmtime()) >= args.deadline

    def run_batch(system: str, attack: str, params: dict[str, Any], start: int) -> dict[str, Any] | None:
        """One attack batch of one cell: cached, or computed unless --render-only / past --deadline."""
        size = min(args.batch_size, n - start)
        key = cell_key(system, attack, params, start, size)
        hit = cache.get(key)
        if hit is not None or args.render_only or past_deadline():
            return hit
        t0 = time.time()
        atk_name = "pgd" if attack == "tramer_pgd" else attack
        if system == "baseline":
            model = baseline
            atk = create_attack(atk_name, **({**params, "loss": "ce"} if atk_name in ("fgsm", "bim", "pgd")
                                              else params))
        else:
            model = ens
            atk = ensemble_attack(ens, atk_name, system, **params)  # system = the threat model
        xb, yb = x[start : start + size], y[start : start + size]
        res = evaluate_attack(model, atk, xb, yb, labels="pred", batch_size=args.batch_size, keep_adv=True)
        ok = (predict(model, res.x_adv, args.batch_size) == yb).tolist()
        value = {"correct_mask": "".join("1" if c else "0" for c in ok), "seconds": time.time() - t0,
                 "mean_l2_all": res.mean_l2_all, "params": res.params}
        cache.put(key, value)
        return value

    def collect(system: str, attack: str, params: dict[str, Any]) -> dict[str, Any] | None:
        """A cell from its consecutive finished batches (or from a whole-cell entry of an earlier run)."""
        whole = cache.get(cell_key(system, attack, params, None, n))
        if whole is not None:
            return {**whole, "n": n}
        mask, seconds = "", 0.0
        for start in range(0, n, args.batch_size):
            hit = cache.get(cell_key(system, attack, params, start, min(args.batch_size, n - start)))
            if hit is None:
                break
            mask += hit["correct_mask"]
            seconds += hit["seconds"]
        if not mask:
            return None
        return {"accuracy": 100 * mask.count("1") / len(mask), "n": len(mask), "correct_mask": mask,
                "seconds": seconds}

    # clean accuracies (cheap, not cached)
    clean = {"baseline": 100 * accuracy(baseline, x, y),
             "ensemble": 100 * accuracy(ens, x, y) if ens is not None else float("nan")}
    members = [100 * accuracy(m, x, y) for m in ens.members] if ens is not None else []
    print(f"{args.dataset}: {n} images; clean baseline {clean['baseline']:.2f}%, "
          f"EMPIR {clean['ensemble']:.2f}%, members {', '.join(f'{a:.2f}%' for a in members)}",
          file=sys.stderr, flush=True)

    results: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in (*SYSTEMS, "worst")}
    cells = [(system, attack, attack_params(attack, setup["eps"]))
             for attack in ("fgsm", "pgd", "bim", "cw") if attack in args.attacks for system in args.systems]
    if args.tramer:
        cells.append(("adaptive", "tramer_pgd", attack_params("tramer_pgd", setup["eps"])))
        if "adaptive_logits" in args.systems:
            cells.append(("adaptive_logits", "tramer_pgd", attack_params("tramer_pgd", setup["eps"])))
    # batch by batch over all cells (cheapest attacks first), so an interrupted run or a --deadline leaves
    # every cell with about the same number of images
    for start in range(0, n, args.batch_size):
        for system, attack, params in cells:
            if cache.get(cell_key(system, attack, params, None, n)) is not None:
                continue
            t0 = time.time()
            hit = run_batch(system, attack, params, start)
            if hit is not None and time.time() - t0 > 1:
                print(f"  images {start}-{start + len(hit['correct_mask'])} {system:9s} {attack:10s} "
                      f"robust {hit['correct_mask'].count('1')}/{len(hit['correct_mask'])}  "
                      f"{hit['seconds']:.0f}s", file=sys.stderr, flush=True)
    for system, attack, params in cells:
        cell = collect(system, attack, params)
        if cell is None:
            continue
        if attack == "tramer_pgd":
            results.setdefault("tramer", {})["pgd" if system == "adaptive" else "pgd_logits"] = cell
        else:
            results[system][attack] = cell
    tramer_cells = results.pop("tramer", {})
    tramer, tramer_logits = tramer_cells.get("pgd"), tramer_cells.get("pgd_logits")
    # per image, EMPIR survives an attack only if it survives every version of it (legacy and adaptive)
    for attack in ATTACKS:
        masks = [results[s][attack]["correct_mask"] for s in THREAT_MODELS
                 if attack in results[s] and "correct_mask" in results[s][attack]]
        if len(masks) >= 2:
            m = min(len(k) for k in masks)
            both = sum(all(k[i] == "1" for k in masks) for i in range(m))
            results["worst"][attack] = {"accuracy": 100 * both / m, "n": m, "seconds": 0.0}
    elapsed = time.time() - t_start
    compute = sum(v["seconds"] for s in results.values() for v in s.values())
    compute += sum(t["seconds"] for t in (tramer, tramer_logits) if t)

    summary = {"dataset": args.dataset, "n": n, "clean": clean, "members": members,
               "results": {s: {a: v["accuracy"] for a, v in r.items()} for s, r in results.items()},
               "tramer": tramer["accuracy"] if tramer else None, "compute_seconds": compute}
    print(json.dumps(summary))
    if args.no_doc:
        return 0
    if not (results["legacy"] or results["adaptive"]):
        print("no EMPIR cell finished (lock or deadline); the markdown is left unchanged", file=sys.stderr)
        return 0
    out_md.parent.mkdir(parents=True, exist_ok=True)
    body = render(args, setup, n, clean, members, results, tramer, configs, base_cfg, paths, compute, elapsed,
                  tramer_logits)
    update_marked_section(out_md, f"empir-{args.dataset}", body,
                          title=f"EMPIR reproduction: {'MNIST' if args.dataset == 'mnist' else 'CIFAR-10'}")
    print(f"wrote {out_md}", file=sys.stderr)
    return 0


def _row(label: str, clean_acc: float | None, cells: dict[str, dict[str, Any]], n: int) -> str:
    """Accuracy [95% CI] per attack; a cell attacked on fewer than ``n`` images says on how many."""
    parts = [fmt(clean_acc, n)]
    for a in ATTACKS:
        cell = cells.get(a)
        if cell is None:
            parts.append("not run")
            continue
        m = cell.get("n", n)
        parts.append(fmt(cell["accuracy"], m) + (f" (first {m})" if m != n else ""))
    done = [cells[a]["accuracy"] for a in ATTACKS if a in cells]
    parts.append(f"{sum(done) / len(done):.2f}" if len(done) == len(ATTACKS) else "—")
    return f"| {label} | " + " | ".join(parts) + " |"


def render(args, setup, n, clean, members, results, tramer, configs, base_cfg, paths, compute, elapsed,
           tramer_logits=None) -> str:
    ds = "MNIST" if args.dataset == "mnist" else "CIFAR-10"
    eps = setup["eps"]
    re_e, re_b = setup["readme_empir"], setup["readme_baseline"]

    def readme_row(label: str, vals: tuple[float, ...]) -> str:
        return f"| {label} | " + " | ".join(f"{v:.2f}" for v in vals) + " |"

    lines = [
        f"Generated by `scripts/reproduce_empir.py --dataset {args.dataset} --n {n}"
        f"{f' --batch-size {args.batch_size}' if args.batch_size != 100 else ''}"
        f"{' --tramer' if tramer else ''}` (qrobust {qrobust.__version__}, torch {torch.__version__}, "
        f"{platform.machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). "
        f"Attack compute {compute / 60:.1f} min; wall time of this invocation {elapsed / 60:.1f} min "
        "(cached cells are not recomputed).",
        "",
        f"Accuracy (%) on the first {n} {ds} test images; ours with a 95% Wilson interval. "
        "Average = mean of the four attack columns.",
        "",
        "| system | clean | CW-L2 | FGSM | BIM | PGD | average |",
        "|---|---|---|---|---|---|---|",
        readme_row("EMPIR, README (10,000 images)", re_e),
        _row("EMPIR, ours — **legacy** (EMPIR's gradients)", clean["ensemble"], results["legacy"], n),
        _row("EMPIR, ours — **adaptive** (whole ensemble)", clean["ensemble"], results["adaptive"], n),
        *([_row("EMPIR, ours — **adaptive, mean logits** (whole ensemble)", clean["ensemble"],
                results["adaptive_logits"], n)] if results["adaptive_logits"] else []),
        _row("EMPIR, ours — worst of legacy and adaptive, per image", clean["ensemble"], results["worst"], n),
        readme_row(f"{setup['baseline_name']} baseline, README", re_b),
        _row(f"{setup['baseline_name']} baseline, ours", clean["baseline"], results["baseline"], n),
    ]
    if tramer:
        lines += ["", "Tramer et al. (2020) adaptive setting: PGD on the mean softmax of all members, "
                      "eps 8/255, step 0.0078, 100 iterations, random start: EMPIR accuracy "
                      f"**{fmt(tramer['accuracy'], tramer['n'])}** on {tramer['n']} images "
                      "(Tramer et al. report 1.5% on CIFAR-10; ART's "
                      "replication 1.41%)."]
        if tramer_logits:
            lines[-1] += (" The same PGD on the mean of the members' logits: "
                          f"**{fmt(tramer_logits['accuracy'], tramer_logits['n'])}**.")
    lines += ["", "Members (EMPIR order; model 3 is the full-precision member that breaks ties):", "",
              "| member | recipe | precision | epochs | batch | label smoothing | clean acc, these images | "
              "test acc (10k, at training) |", "|---|---|---|---|---|---|---|---|"]
    for i, (cfg, acc, prec) in enumerate(zip(configs, members, setup["precisions"], strict=True)):
        tr = cfg.get("train", {})
        lines.append(f"| model {i + 1} | `{cfg.get('recipe', paths[i].name)}` | {prec} | "
                     f"{tr.get('epochs', '?')} | {tr.get('batch_size', '?')} | "
                     f"{tr.get('label_smoothing', 0)} | {fmt(acc, n)} | "
                     f"{100 * cfg.get('test_accuracy', float('nan')):.2f} |")
    tr = base_cfg.get("train", {})
    lines.append(f"| baseline | `{base_cfg.get('recipe', setup['baseline'])}` | full precision | "
                 f"{tr.get('epochs', '?')} | {tr.get('batch_size', '?')} | {tr.get('label_smoothing', 0)} | "
                 f"{fmt(clean['baseline'], n)} | {100 * base_cfg.get('test_accuracy', float('nan')):.2f} |")
    lines += ["", PROTOCOL.format(eps=eps, batch=args.batch_size, baseline=setup["baseline"],
                                  seed_epochs=setup["seed_epochs"]).strip()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
