"""The worst-case suite: a suite of strong attacks, each later one only on the images still standing.

One attack tells how strong that attack is; a robustness claim needs the per-image worst case over attacks
that do not share a weakness (AutoAttack, Croce & Hein 2020). :class:`WorstCase` is itself an
:class:`~qrobust.attacks.Attack` (registered as ``worst_case``, so the experiment runner and TOML use it
unchanged; it sits above the attack layer because it composes attacks with ensembles and the Monte-Carlo
engine, and the attack registry imports it on first use): it runs the suite in order, each attack only on
the images no earlier attack broke, judges success on the MODEL being scored - an ensemble's vote, a
randomized net's Monte-Carlo mean prediction - and returns per image the first adversarial example found,
else the clean input. What broke which image and the robust accuracy after each attack are kept in
:attr:`WorstCase.report` (also in its ``config()``, hence in the runner's records). :func:`worst_case` is
the one-call library version.

The default suite (:func:`default_suite`):

* any model: APGD-CE, APGD-T (targeted DLR) and Square (CW margin, 5000 queries);
* an :class:`~qrobust.ensemble.Ensemble`: APGD-CE and APGD-T on the mean logits (``adaptive_logits``),
  APGD on the vote-aware objective (:class:`~qrobust.ensemble.VoteView`), APGD-CE on the ``legacy`` and
  ``adaptive`` targets, and Square scored by the vote-aware objective, success on the vote;
* a randomized net (:func:`qrobust.mc.is_stochastic`): the same attacks through ``mc_samples``
  Monte-Carlo copies computed batched (:class:`MCCopies`): APGD follows the expected gradient of its loss
  over the K copies (EOT), Square scores their mean prediction, and success is judged on that mean.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from qrobust.attacks.apgd import APGD, APGDT, check_norm
from qrobust.attacks.base import Attack, check_bounds, check_count, check_nonneg
from qrobust.attacks.losses import LossFn, resolve_loss
from qrobust.attacks.registry import register_attack
from qrobust.attacks.square import Square
from qrobust.distributed import map_batches
from qrobust.ensemble import AttackTarget, Ensemble, VoteView
from qrobust.errors import QrobustError
from qrobust.evaluate import wilson_interval
from qrobust.mc import is_stochastic, log_mean_softmax, mc_logits

GENERIC = ("apgd_ce", "apgd_t", "square")
ENSEMBLE_ONLY = ("apgd_vote", "apgd_ce_legacy", "apgd_ce_adaptive")
SUITE_NAMES = GENERIC + ENSEMBLE_ONLY
ENSEMBLE_SUITE = ("apgd_ce", "apgd_vote", "apgd_t", "apgd_ce_legacy", "apgd_ce_adaptive", "square")
CLEAN = "clean"  # broken_by of an image the model already gets wrong


@dataclass
class WorstCaseReport:
    """Per image, what broke it (``"clean"``: misclassified without attack; ``None``: robust); per attack,
    how many images it was run on and its time. Accuracies are over all ``n`` images."""

    eps: float
    norm: str
    suite: list[str]
    broken_by: list[str | None] = field(default_factory=list)
    attacked: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    x_adv: Tensor | None = field(default=None, repr=False)  # set by worst_case(): per image, what broke it

    @property
    def n(self) -> int:
        return len(self.broken_by)

    def robust_after(self, name: str | None = None) -> int:
        """Images still correct after the suite up to and including attack ``name`` (None: clean only)."""
        gone = {CLEAN} | (set(self.suite[: self.suite.index(name) + 1]) if name is not None else set())
        return sum(b not in gone for b in self.broken_by)

    @property
    def robust(self) -> int:
        return sum(b is None for b in self.broken_by)

    @property
    def accuracy(self) -> float:
        return self.robust / self.n if self.n else float("nan")

    def per_attack(self) -> list[dict[str, Any]]:
        """One row per attack: images attacked and broken, robust accuracy after it, 95% interval."""
        rows = []
        for name in self.suite:
            left = self.robust_after(name)
            rows.append({"attack": name, "attacked": self.attacked.get(name, 0),
                         "broken": sum(b == name for b in self.broken_by),
                         "robust_accuracy": left / self.n if self.n else float("nan"),
                         "ci95": list(wilson_interval(left, self.n)),
                         "seconds": round(self.seconds.get(name, 0.0), 3)})
        return rows

    def merge(self, other: WorstCaseReport) -> WorstCaseReport:
        """This report followed by ``other`` (the next batch of images), in place."""
        if other.suite != self.suite:
            raise QrobustError("cannot merge worst-case reports of different suites")
        self.broken_by += other.broken_by
        for name in other.suite:
            self.attacked[name] = self.attacked.get(name, 0) + other.attacked.get(name, 0)
            self.seconds[name] = self.seconds.get(name, 0.0) + other.seconds.get(name, 0.0)
        return self

    def as_dict(self) -> dict[str, Any]:
        clean = self.robust_after(None)
        return {"eps": self.eps, "norm": self.norm, "n": self.n, "suite": list(self.suite),
                "clean_accuracy": clean / self.n if self.n else float("nan"),
                "worst_case_accuracy": self.accuracy, "ci95": list(wilson_interval(self.robust, self.n)),
                "per_attack": self.per_attack(), "broken_by": list(self.broken_by)}

    def markdown(self) -> str:
        """The per-attack table: images attacked and broken, robust accuracy after each attack."""
        def line(name: str, attacked: Any, broken: Any, robust: int, seconds: str) -> str:
            lo, hi = wilson_interval(robust, self.n)
            return (f"| {name} | {attacked} | {broken} | {100 * robust / max(self.n, 1):.1f} | "
                    f"{100 * lo:.1f}–{100 * hi:.1f} | {seconds} |")

        clean = self.robust_after(None)
        lines = ["| attack | attacked | broken | robust accuracy (%) | 95% CI | seconds |",
                 "|---|---|---|---|---|---|", line("clean", "—", self.n - clean, clean, "—")]
        lines += [line(r["attack"], r["attacked"], r["broken"], self.robust_after(r["attack"]),
                       f"{r['seconds']:.1f}") for r in self.per_attack()]
        lines.append(line("**worst case**", "", "", self.robust, f"{sum(self.seconds.values()):.1f}"))
        return "\n".join(lines)


class MCCopies(nn.Module):
    """A randomized net seen through K Monte-Carlo copies, computed batched (:func:`~qrobust.mc.mc_logits`).

    ``forward`` returns the log mean softmax of the copies - the prediction success is judged on - and
    keeps the copies' logits of that same pass, so that :meth:`eot_loss` can average a loss over the
    copies: its gradient is the expected gradient over K passes (EOT, Athalye et al. 2018).
    """

    def __init__(self, model: nn.Module, samples: int) -> None:
        super().__init__()
        self.model, self.samples = model, samples
        self.copies: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.copies = mc_logits(self.model, x, self.samples, batch_size=len(x))
        return log_mean_softmax(self.copies, 0)

    def eot_loss(self, loss: str | LossFn) -> LossFn:
        """``loss`` averaged over the copies of the last forward pass (it ignores the outputs it is given)."""
        base = resolve_loss(loss)

        def eot(outputs: Tensor, y: Tensor) -> Tensor:
            if self.copies is None or self.copies.shape[1] != len(y):
                raise QrobustError("the EOT loss needs the Monte-Carlo copies of the same batch; call the "
                                   "view before its loss")
            k, b, c = self.copies.shape
            return base(self.copies.reshape(k * b, c), y.repeat(k)).view(k, b).mean(0)

        eot.__name__ = f"eot_{getattr(base, '__name__', 'loss')}"
        return eot


def _unwrap(model: nn.Module) -> nn.Module:
    """The ensemble behind an ensemble attack target (the runner hands WorstCase the target of its row)."""
    return model.ensemble if isinstance(model, AttackTarget) else model


def _kind(model: nn.Module) -> str:
    if is_stochastic(model):
        return "stochastic"
    return "ensemble" if isinstance(model, Ensemble) else "plain"


def default_suite(model: nn.Module) -> tuple[str, ...]:
    """The suite :class:`WorstCase` runs on ``model`` when none is given (see the module docstring)."""
    return ENSEMBLE_SUITE if _kind(_unwrap(model)) == "ensemble" else GENERIC


class WorstCase(Attack):
    """Per-image worst case of a suite of attacks at L-inf/L2 radius ``eps`` (see the module docstring).

    ``suite``: names from :data:`SUITE_NAMES`, run in order (default: :func:`default_suite`); ``steps``,
    ``restarts`` and ``n_target_classes`` set APGD / APGD-T, ``n_queries`` Square; ``mc_samples`` is the
    number of Monte-Carlo copies for a randomized net (its judge and its EOT attacks). A call seeds the
    global RNG from ``seed`` for its duration (restoring it after), so a randomized net is reproducible.
    """

    name = "worst_case"
    uses_loss = False

    @property
    def version(self) -> str:  # type: ignore[override]
        """Its results change when an attack it runs changes them: Square "2" (L2 window mass over all
        channels) changed L2 results only, so L-inf cells keep their cache keys."""
        return "2" if self.norm == "L2" else "1"

    def __init__(self, eps: float = 0.3, norm: str = "Linf", suite: Sequence[str] | None = None,
                 steps: int = 100, n_queries: int = 5000, n_target_classes: int = 9, restarts: int = 1,
                 mc_samples: int = 10, *, seed: int = 0, bounds: tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__(seed=seed, bounds=check_bounds(bounds))
        self.eps = check_nonneg("eps", eps)
        self.norm = check_norm(norm)
        self.suite = None if suite is None else _check_suite(suite)
        self.steps = check_count("steps", steps)
        self.n_queries = check_count("n_queries", n_queries)
        self.n_target_classes = check_count("n_target_classes", n_target_classes)
        self.restarts = check_count("restarts", restarts)
        self.mc_samples = check_count("mc_samples", mc_samples)
        self._report: WorstCaseReport | None = None

    @property
    def report(self) -> WorstCaseReport | None:
        """What the calls since construction (or :meth:`reset_report`) found, images in call order."""
        return self._report

    def reset_report(self) -> None:
        self._report = None

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        for key in ("targeted", "eot_samples"):
            cfg.pop(key, None)
        if self._report is not None:
            cfg["report"] = self._report.as_dict()
        return cfg

    # -- the suite --
    def attacks(self, model: nn.Module, num_classes: int = 10) -> list[tuple[str, Attack, nn.Module]]:
        """(name, attack, module it runs on) of each suite entry for ``model``; APGD-T falls back from the
        targeted DLR (which needs 4 classes) to the targeted CW margin below 4 classes."""
        model = _unwrap(model)
        kind = _kind(model)
        names = list(self.suite) if self.suite is not None else list(default_suite(model))
        if kind != "ensemble" and any(n in ENSEMBLE_ONLY for n in names):
            bad = ", ".join(n for n in names if n in ENSEMBLE_ONLY)
            raise QrobustError(f"suite entries {bad} apply only to an ensemble; on this model use "
                               f"{', '.join(GENERIC)}")
        common = {"eps": self.eps, "norm": self.norm, "seed": self.seed, "bounds": self.bounds}
        apgd = {**common, "steps": self.steps, "restarts": self.restarts}
        out = []
        for name in names:
            view = self._view(model, kind, name)
            loss: Any = {"apgd_ce_legacy": "ce_prob", "apgd_vote": "cw", "square": "cw",
                         "apgd_t": "dlr_targeted" if num_classes >= 4 else "cw"}.get(name, "ce")
            if isinstance(view, MCCopies) and name != "square":
                loss = view.eot_loss(loss)
            if name == "square":
                atk: Attack = Square(n_queries=self.n_queries, loss=loss, **common)
            elif name == "apgd_t":
                atk = APGDT(n_target_classes=self.n_target_classes, loss=loss, **apgd)
            else:
                atk = APGD(loss=loss, **apgd)
            out.append((f"{name}_eot" if kind == "stochastic" else name, atk, view))
        return out

    def _view(self, model: nn.Module, kind: str, name: str) -> nn.Module:
        if kind == "stochastic":
            return MCCopies(model, self.mc_samples)
        if kind != "ensemble":
            return model
        if name in ("apgd_vote", "square"):
            return VoteView(model)
        mode = {"apgd_ce_legacy": "legacy", "apgd_ce_adaptive": "adaptive"}.get(name, "adaptive_logits")
        return model.attack_target(mode, "pgd")

    def judge(self, model: nn.Module) -> Callable[[Tensor], Tensor]:
        """Predictions the success is judged on: the model's own, or its Monte-Carlo mean prediction."""
        model = _unwrap(model)
        if _kind(model) == "stochastic":
            mean = MCCopies(model, self.mc_samples)
            return lambda x: _argmax(mean, x)
        return lambda x: _argmax(model, x)

    # -- the run --
    def _labels(self, model: nn.Module, x: Tensor, y: Tensor | int | None, gen: torch.Generator) -> Tensor:
        if y is None:
            with _seeded(self.seed, x.device):
                y = self.judge(model)(x)
        return super()._labels(model, x, y, gen)

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        result = x.clone()
        with _seeded(self.seed, x.device):
            with torch.no_grad():
                suite = self.attacks(model, int(_unwrap(model)(x[:1]).shape[1]))
            report = WorstCaseReport(self.eps, self.norm, [name for name, _, _ in suite])
            judge = self.judge(model)
            alive = judge(x) == y
            broken: list[str | None] = [None if ok else CLEAN for ok in alive.tolist()]
            for name, atk, view in suite:
                idx = alive.nonzero().squeeze(1)
                report.attacked[name] = len(idx)
                t0 = time.perf_counter()
                # each attack draws from its own stream, so its randomness does not depend on the others'
                sub = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
                if len(idx):
                    adv = atk(view, x[idx], y[idx], generator=sub)
                    ok = judge(adv) != y[idx]
                    result[idx[ok]] = adv[ok]
                    alive[idx[ok]] = False
                    for i in idx[ok].tolist():
                        broken[i] = name
                report.seconds[name] = time.perf_counter() - t0
        report.broken_by = broken
        self._report = report if self._report is None else self._report.merge(report)
        return result


def _check_suite(suite: Sequence[str]) -> list[str]:
    if isinstance(suite, str) or not all(isinstance(s, str) for s in suite) or not suite:
        raise QrobustError(f"suite must be a non-empty list of attack names from {', '.join(SUITE_NAMES)}, "
                           f"got {suite!r}")
    bad = [s for s in suite if s not in SUITE_NAMES]
    if bad or len(set(suite)) != len(suite):
        raise QrobustError(f"suite: {'unknown' if bad else 'repeated'} attack {(bad or suite)[0]!r}; use "
                           f"each of {', '.join(SUITE_NAMES)} at most once")
    return list(suite)


@torch.no_grad()
def _argmax(model: nn.Module, x: Tensor, batch_size: int = 500) -> Tensor:
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Global RNG seeded for the block and restored after: Monte-Carlo passes draw from it."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def worst_case(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 500, **settings: Any
               ) -> WorstCaseReport:
    """Run the worst-case suite on ``(x, y)`` (``y`` = true labels) in batches.

    ``settings`` go to :class:`WorstCase` (eps, norm, suite, steps, n_queries, ...). The report's
    ``x_adv`` holds, per image, the first adversarial example found, else the clean image. The model's
    train/eval mode is left as the caller set it.
    """
    if len(x) != len(y):
        raise QrobustError(f"{len(x)} images but {len(y)} labels")
    if len(x) == 0:
        raise QrobustError("no images to attack")
    check_count("batch_size", batch_size)
    attack = WorstCase(**settings)
    y = y.to(x.device)

    def batch(s: int, e: int) -> tuple[Tensor, WorstCaseReport]:
        attack.reset_report()  # one report per batch (each call draws from the attack's seed afresh)
        adv = attack(model, x[s:e], y[s:e])
        assert attack.report is not None
        return adv, attack.report

    # batches sharded over torchrun's ranks and gathered in order (one process: all, in order)
    outs = map_batches(batch, len(x), batch_size, device=x.device)
    report = outs[0][1]
    for _, other in outs[1:]:
        report.merge(other)
    report.x_adv = torch.cat([adv for adv, _ in outs])
    return report


register_attack("worst_case", WorstCase)

__all__ = ["ENSEMBLE_SUITE", "GENERIC", "SUITE_NAMES", "MCCopies", "WorstCase", "WorstCaseReport",
           "default_suite", "worst_case"]
