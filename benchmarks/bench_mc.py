"""Monte-Carlo inference: T batched samples (qrobust.mc.mc_probs) vs a loop of T ordinary passes.

    OMP_NUM_THREADS=2 python benchmarks/bench_mc.py

Each variant runs in a fresh subprocess (so its peak resident memory is its own); the ratio is measured
in one invocation. Models are QNN-defense's MNIST nets with randomly initialised weights (the cost does not
depend on the weights). Writes the section "mc" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "qnn_fp_d05": ("qnn_fp", {"dropout": 0.5}),
    "qnn_4bit_d05": ("qnn_kbit", {"bits": 4, "dropout": 0.5}),
    "qnn_rbnn": ("qnn_rbnn", {}),
}
VARIANTS = {
    "loop": "plain loop: model(x) called T times per batch (the model's own dropout / weight sampling)",
    "loop_fast": "qrobust loop strategy: T passes, qrobust's per-copy sampling (isolates the RNG gain)",
    "batched": "qrobust batched (strategy auto = deterministic prefix once, stochastic suffix on T copies)",
}


def child(model_key: str, variant: str, n: int, t: int, repeats: int) -> dict:
    import resource
    import time

    import torch

    from qrobust.mc import mc_probs
    from qrobust.models import create_model

    torch.manual_seed(0)
    name, kw = MODELS[model_key]
    model = create_model(name, **kw).eval()
    x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            if variant == "loop":
                out = torch.cat(
                    [
                        torch.stack([torch.softmax(model(x[i : i + 100]), -1) for _ in range(t)])
                        for i in range(0, n, 100)
                    ],
                    1,
                )
            elif variant == "loop_fast":
                out = mc_probs(model, x, t, strategy="loop", batch_size=100)
            else:
                out = mc_probs(model, x, t)
        times.append(time.perf_counter() - t0)
        del out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": min(times),
        "all_seconds": times,
        "peak_rss_mib": peak / 1024,
        "extra_rss_mib": (peak - base) / 1024,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="images")
    ap.add_argument("--mc", type=int, default=50, help="Monte-Carlo samples T")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.n, args.mc, args.repeats)))
        return 0
    import torch

    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    rows = []
    for key in args.models:
        res = {}
        for variant in VARIANTS:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    key,
                    variant,
                    "--n",
                    str(args.n),
                    "--mc",
                    str(args.mc),
                    "--repeats",
                    str(args.repeats),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{key:14s} {variant:10s} {res[variant]['seconds']:7.2f} s  peak RSS "
                f"{res[variant]['peak_rss_mib']:.0f} MiB (+{res[variant]['extra_rss_mib']:.0f})",
                flush=True,
            )
        rows.append((key, res))
    # Keep rows of models measured by earlier invocations (each row's ratio comes from one invocation).
    store = REPO / "artifacts" / "bench_mc.json"
    saved = json.loads(store.read_text()) if store.is_file() else {}
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for key, res in rows:
        saved[key] = {"res": res, "when": stamp, "n": args.n, "mc": args.mc, "repeats": args.repeats,
                      "threads": threads}
    if not args.no_write:
        from qrobust.utils import atomic_write_json

        atomic_write_json(store, saved)
    if not args.no_write:
        rows = [(k, saved[k]["res"]) for k in MODELS if k in saved]
    when = {k: saved.get(k, {}).get("when", stamp) for k, _ in rows}
    cmd = (
        "OMP_NUM_THREADS=2 python benchmarks/bench_mc.py "
        f"--n {args.n} --mc {args.mc} --repeats {args.repeats}"
    )
    if set(args.models) != set(MODELS):
        cmd += f"  # last run: --models {' '.join(args.models)}; the other rows come from earlier runs"
    lines = [
        "## Monte-Carlo inference: batched vs a loop of passes",
        "",
        f"T = {args.mc} stochastic passes over {args.n} MNIST-sized inputs (batches of 100 inputs for the "
        "loops; "
        f"batched: about 1000 / T inputs per chunk), QNN-defense's nets with random weights, CPU, "
        f"{threads} thread(s), best of {args.repeats}; each variant in its own process (peak RSS = process "
        "peak resident set; + = growth during the measurement). Machine shared with other jobs, so absolute "
        "times are noisy; the ratios come from one invocation.",
        "",
        "| model | plain loop of T passes | qrobust loop (per-copy sampling) | qrobust batched | "
        "speed-up vs plain loop | speed-up vs qrobust loop | peak RSS loop / batched (MiB) | measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, res in rows:
        lp, lf, b = res["loop"], res["loop_fast"], res["batched"]
        lines.append(
            f"| {key} | {lp['seconds']:.2f} s | {lf['seconds']:.2f} s | {b['seconds']:.2f} s | "
            f"**{lp['seconds'] / b['seconds']:.1f}x** | {lf['seconds'] / b['seconds']:.1f}x | "
            f"{lp['peak_rss_mib']:.0f} (+{lp['extra_rss_mib']:.0f}) / {b['peak_rss_mib']:.0f} "
            f"(+{b['extra_rss_mib']:.0f}) | {when[key]} |"
        )
    lines += [
        "",
        "Where the gain comes from: the deterministic prefix (the two conv layers; for the randomized BNN "
        "everything before its stochastic conv) runs once instead of T times; dropout masks are cut from "
        "64-bit random words (one byte per element) and, at the first dropout, multiplied with the shared "
        "input broadcast over the T copies (no T-fold repeat first); the stochastic conv of the randomized "
        "BNN draws T weight tensors and, as all T copies share its input, unfolds the input once and applies "
        "the T kernels as ONE 2-D matrix product. Its input is sign-binarized and its weights are +-1, so "
        "that product is computed in bfloat16 on CPUs with AMX / AVX512-BF16 (and GPUs) and is still exact: "
        "float32 accumulation of +-1 products, and a check that every result is below 256 in magnitude "
        "(float32 recomputation otherwise; tests compare bit-for-bit with T plain passes). The plain loop "
        "draws one weight per pass and batch, the batched version one per copy, as T passes would. The "
        "middle column uses qrobust's sampling code but runs T full passes. Peak RSS is the process's; "
        "the batched path holds T x chunk rows of the widest activation (chunks of about 1000 / T inputs).",
        "",
        "Command:",
        "",
        "```",
        cmd,
        "```",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        from qrobust.utils import update_marked_section

        update_marked_section(REPO / "docs" / "benchmarks.md", "mc", text, title="qrobust benchmarks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
