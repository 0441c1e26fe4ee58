"""torchrun: 2 CPU processes (gloo) give exactly the per-image results of one process; DDP training.

The evaluations run twice: in this test's process (no torchrun variables: the single-process path) and
as ``torchrun --nproc_per_node 2`` of this same file (``python -m torch.distributed.run``), whose rank 0
saves what every rank gathered. Models are tiny and untrained (the comparison is image by image, so
their accuracy does not matter); the randomized ones keep dropout on, so any seeding that depends on
where a batch runs would show.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qrobust import distributed as dist

N, BATCH = 48, 16  # 3 batches: rank 0 computes batches 0 and 2, rank 1 batch 1


def _models() -> dict[str, torch.nn.Module]:
    from qrobust.ensemble import Ensemble
    from qrobust.models import create_model

    torch.manual_seed(0)
    plain = create_model("mnistconv").eval()
    mc = create_model("mnistconv", dropout=0.5, mc_dropout=True).eval()  # dropout stays on
    members = [create_model("mnistconv", wbits=2, abits=2), create_model("mnistconv", wbits=4, abits=4),
               create_model("mnistconv")]
    return {"plain": plain, "mc": mc, "ensemble": Ensemble([m.eval() for m in members])}


def evaluations() -> dict[str, torch.Tensor]:
    """Per-image outcomes of every sharded evaluation: adversarial images, predictions, MC softmaxes."""
    from qrobust.attacks import create_attack
    from qrobust.detect import run_detection
    from qrobust.ensemble import on_target
    from qrobust.evaluate import evaluate_attack
    from qrobust.suite import worst_case

    models = _models()
    x = torch.rand(N, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (N,), generator=torch.Generator().manual_seed(2))
    pgd = create_attack("pgd", eps=0.1, alpha=0.02, steps=3, random_start=True, seed=5)
    attacks = {
        "pgd_mc": (models["mc"], pgd),  # random start and dropout masks
        "pgd": (models["plain"], pgd),
        "cw": (models["plain"], create_attack("cw", steps=5, binary_steps=1)),
        "jsma": (models["plain"], create_attack("jsma", gamma=0.02, targeted=True, seed=3)),
        "empir": (models["ensemble"], on_target(create_attack("pgd", eps=0.1, alpha=0.02, steps=2, seed=4),
                                                models["ensemble"].attack_target("adaptive", "pgd"))),
    }
    out: dict[str, torch.Tensor] = {}
    for name, (model, atk) in attacks.items():
        res = evaluate_attack(model, atk, x, y, batch_size=BATCH, keep_adv=True)
        out[f"{name}.x_adv"], out[f"{name}.adv_correct"] = res.x_adv, res.adv_correct
        out[f"{name}.summary"] = torch.tensor([res.adversarial_accuracy, res.success_rate, res.mean_l2_all])
    run = run_detection(models["mc"], create_attack("fgsm", eps=0.1), x, y, samples=4, attack_batch=BATCH,
                        seed=7, bootstrap=20)
    out["detect.x_adv"], out["detect.probs_clean"], out["detect.probs_adv"] = (run.x_adv, run.probs_clean,
                                                                                run.probs_adv)
    out["detect.auc"] = torch.tensor(run.report.heldout_all["seed_variance"]["auc"])
    # the worst-case suite (Square's random proposals), on the randomized model: Monte-Carlo judging
    wc = worst_case(models["mc"], x, y, batch_size=BATCH, eps=0.05, suite=["apgd_ce", "square"], steps=2,
                    n_queries=10, mc_samples=2, seed=6)
    out["worst.x_adv"] = wc.x_adv
    names = [None, "clean", *wc.suite]
    out["worst.broken_by"] = torch.tensor([names.index(b) for b in wc.broken_by])
    out["worst.attacked"] = torch.tensor([wc.attacked[k] for k in wc.suite])
    return out


def torchrun_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants: torchrun starts its ranks in sessions of their own, so killing
    its process group would leave them running (Linux /proc)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = [int(c) for c in children.read_text().split()] if children.exists() else []
    for kid in kids:
        kill_tree(kid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _torchrun(args: list[str], tmp_path: Path, nproc: int = 2, timeout: float = 180
             ) -> subprocess.CompletedProcess:
    """``torchrun --standalone``; a hang is killed with its ranks (none left running)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           *args]
    proc = subprocess.Popen(cmd, env=torchrun_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"torchrun {' '.join(args)} hung for {timeout}s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_two_gloo_ranks_equal_one_process_image_by_image(tmp_path):
    out = tmp_path / "ranks.pt"
    proc = _torchrun([str(Path(__file__).resolve()), str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = torch.load(out)
    assert sharded.pop("world_size") == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks ran with one thread: same float reductions
    try:
        single = evaluations()
    finally:
        torch.set_num_threads(threads)
    assert set(sharded) == set(single)
    for key, value in single.items():
        assert torch.equal(sharded[key], value), key
    # the comparison has teeth: dropout and the random start made the draws matter
    assert not torch.equal(single["pgd_mc.x_adv"], single["pgd.x_adv"])
    assert (single["detect.probs_clean"].var(0) > 0).any()


def test_map_batches_single_process_seeds_per_batch():
    seen = dist.map_batches(lambda s, e: (s, e, torch.rand(1).item()), 10, 4, seed=3)
    assert [(s, e) for s, e, _ in seen] == [(0, 4), (4, 8), (8, 10)]
    torch.manual_seed(dist.batch_seed(3, 1))
    assert seen[1][2] == torch.rand(1).item()  # batch 1 drew from (seed, 1), whatever ran before it
    assert dist.batch_seed(3, 1) != dist.batch_seed(3, 2) != dist.batch_seed(4, 2)
    assert dist.world_size() == 1 and dist.is_main() and not dist.is_distributed()


def test_training_view_on_cpu_and_autocast_wrapper():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 3))
    assert dist.ddp_model(model, "cpu") is model  # one CPU process: the model itself, nothing added
    assert dist.rank_batch_size(128) == 128 and dist.steps_per_epoch(300, 128) == 3
    x = torch.rand(5, 1, 8, 8)
    fast = dist.GPUAutocast(model, device_type="cpu")  # the GPU path's wrapper, exercised on CPU
    out = fast(x)
    assert out.dtype == torch.float32 and torch.allclose(out, model(x), atol=0.05)
    assert list(fast.state_dict()) == [f"model.{k}" for k in model.state_dict()]  # same weights inside


def test_launch_env_reads_torchrun_variables():
    assert dist.launch_env({}) == dist.Launch(0, 1, 0)
    assert dist.launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == dist.Launch(3, 4, 1)
    with pytest.raises(Exception, match="outside WORLD_SIZE"):
        dist.launch_env({"RANK": "4", "WORLD_SIZE": "4"})
    assert dist.backend_for("cpu") == "gloo" and dist.backend_for("cuda") == "nccl"


RUN_CFG = """
name = "dist"
data = "digits"
samples = 50
seed = 0
batch_size = 20

[train]
epochs = 1
batch_size = 64
max_train = 200

[[models]]
name = "fp"
arch = "mnistconv"

[[models]]
name = "mc"
arch = "mnistconv"
options = { dropout = 0.5, mc_dropout = true }

[[attacks]]
name = "pgd"
eps = [0.05, 0.1, 0.2]
alpha = 0.05
steps = 2
"""


def _stored(db: Path) -> dict[str, float]:
    """key -> created_at of the store's results (read without locking; empty before the store exists)."""
    import sqlite3

    if not db.exists():
        return {}
    con = sqlite3.connect(db, timeout=5)
    try:
        return dict(con.execute("SELECT key, created_at FROM results"))
    except sqlite3.OperationalError:  # tables not created yet
        return {}
    finally:
        con.close()


def test_qrobust_run_under_torchrun_resumes_after_a_kill_and_matches_one_process(tmp_path):
    import time

    from qrobust.experiment import ResultStore, load_config, run_experiment

    (tmp_path / "dist.toml").write_text(RUN_CFG)
    args = ["-m", "qrobust", "run", "dist.toml", "--out", "ranks", "--quiet"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", *args]
    proc = subprocess.Popen(cmd, env=torchrun_env(), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    db = tmp_path / "ranks" / "store.sqlite"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(_stored(db)) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    kill_tree(proc.pid)  # torchrun and both ranks, mid-run
    proc.wait()
    before = _stored(db)
    assert 2 <= len(before) < 8

    resumed = _torchrun(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("report: ") == 1  # rank 0 alone reports
    assert (tmp_path / "ranks" / "report" / "index.html").is_file()
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert (summary["total"], summary["computed"], summary["models_trained"]) == (8, 8 - len(before), 0)
    after = _stored(db)
    assert all(after[k] == t for k, t in before.items())  # finished units were not recomputed
    with ResultStore(db) as store:
        ranks = {r["key"]: r for r in store.results()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # one process from scratch: same training, so the same keys, and the same per-image results
        alone = run_experiment(load_config(tmp_path / "dist.toml", output=str(tmp_path / "single")),
                               progress=False, report=False)
    finally:
        torch.set_num_threads(threads)
    assert {r["key"] for r in alone.records} == set(ranks)
    for rec in alone.records:
        assert rec["accuracy"] == ranks[rec["key"]]["accuracy"], rec["row"]
        assert rec.get("correct_mask") == ranks[rec["key"]].get("correct_mask"), rec["row"]


TRAIN = ["-m", "qrobust", "train", "--model", "mnistconv", "--data", "digits", "--batch-size", "64",
         "--max-test", "200", "--quiet"]


def test_ddp_training_writes_one_checkpoint(tmp_path):
    from qrobust.checkpoint import load_checkpoint

    proc = _torchrun([*TRAIN, "--epochs", "1", "--max-train", "300", "--out", "ck"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("epoch   1") == 1 and proc.stdout.count('"checkpoint"') == 1  # rank 0 speaks
    model, config = load_checkpoint(tmp_path / "ck", "cpu")
    assert [h["epoch"] for h in config["history"]] == [1]
    assert config["train"]["batch_size"] == 64  # the global batch: 32 per rank
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no state left, nothing else written
    assert 0.2 < config["history"][0]["train_accuracy"] <= 1  # it learned something in 10 steps


def test_ddp_training_resumes_after_all_ranks_are_killed(tmp_path):
    import json
    import time

    args = [*TRAIN, "--epochs", "2", "--max-train", "1200", "--out", "ck"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", *args]
    proc = subprocess.Popen(cmd, env=torchrun_env(), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = tmp_path / ".ck.train-state" / "train_state.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not state.is_file():
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    kill_tree(proc.pid)  # torchrun and both ranks
    proc.wait()
    before = json.loads(state.read_text())["history"]
    assert len(before) == 1
    done = _torchrun(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    history = json.loads((tmp_path / "ck" / "config.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[: len(before)] == before  # the finished epochs were kept, not trained again
    assert not state.parent.exists()


def _worker(out: str) -> None:
    """torchrun entry: every rank evaluates its share; rank 0 saves the gathered per-image outcomes."""
    torch.set_num_threads(1)
    with dist.session("cpu") as multi:
        assert multi and dist.world_size() == 2
        result = evaluations()
        if dist.is_main():
            torch.save({**result, "world_size": torch.tensor(dist.world_size())}, out)


if __name__ == "__main__":
    _worker(sys.argv[1])
