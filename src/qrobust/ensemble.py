"""EMPIR mixed-precision ensembles: members of any precision, the vote, and what an attack differentiates.

An :class:`Ensemble` is an ``nn.Module`` usable wherever a model is (evaluation, attacks, Monte-Carlo
detection). Its ``forward`` returns a *score* per class whose argmax is the ensemble's prediction under
the chosen rule, and whose softmax is a proper probability vector:

- ``vote``: log of the mean softmax of the members that agree with the vote (EMPIR's
  ``combinedAvgCorrectProb``); its argmax is exactly the vote, its softmax that mean softmax.
- ``mean_softmax``: log of the mean softmax of all members (softmax = the mean softmax).
- ``mean_logits``: mean of the members' logits.

The vote (``rule="vote"``, EMPIR's rule generalised to any number of members): each member votes for its
argmax class; the class with the most votes wins; a tie for the most votes (with three members: all three
disagree; with four: 2-2 or 1-1-1-1) is broken by the *designated* member (EMPIR: the full-precision
model 3) when it voted for one of the tied classes, otherwise by the highest mean softmax over all
members among the tied classes, and then by the lowest class index. With three members this is exactly
EMPIR's rule (majority of two, else the full-precision member).

Attacks: :meth:`Ensemble.attack_target` returns the module an attack should differentiate and the loss to
use, for the threat models of :data:`THREAT_MODELS` (see ``docs/ensembles.md``); :func:`ensemble_attack`
wraps an attack so that it differentiates that target and is scored on the ensemble
(:class:`~qrobust.attacks.OnView`):

* ``legacy`` - what EMPIR's TensorFlow code really differentiated: FGSM, PGD and JSMA see the mean softmax
  of the members agreeing with the vote *on the current input* (recomputed at every forward, as the TF
  graph did), fed to cross-entropy as logits (loss ``"ce_prob"``); BIM and CW-L2 see only the designated
  full-precision member (a layer-name collision in EMPIR's model dict); labels are the ensemble's own vote
  on the clean input.
* ``adaptive`` - the whole ensemble: cross-entropy on the mean softmax of all members (or on the mean
  logits), the CW margin for CW-L2, straight-through gradients through every quantizer;
* ``adaptive_logits`` - ``adaptive`` on the mean of the members' logits.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qrobust.errors import QrobustError

RULES = ("vote", "mean_softmax", "mean_logits")
# THE ensemble threat models (what an attack differentiates), used by the config, the runner and the CLI.
THREAT_MODELS = ("legacy", "adaptive", "adaptive_logits")
COMBINES = ("mean_softmax", "mean_logits")
ATTACK_NAMES = ("fgsm", "bim", "pgd", "cw", "jsma")  # the attacks EMPIR ran; each has a legacy target
# Attacks that build every threat model's target themselves (qrobust.suite): their "target" is the
# ensemble as it is, whatever the mode (which then only labels the result row).
WHOLE_ENSEMBLE_ATTACKS = ("worst_case",)
FULL_PRECISION = 32


def normalize_attack_name(name: str) -> str:
    """Map ``FGSM``, ``CWL2``, ``MadryEtAl``... (the registry's aliases) to one of :data:`ATTACK_NAMES`."""
    from qrobust.attacks.registry import canonical_name

    try:
        key = canonical_name(name)
    except QrobustError:
        key = None
    if key not in ATTACK_NAMES + WHOLE_ENSEMBLE_ATTACKS:
        raise QrobustError(f"unknown attack {name!r} for an ensemble target; "
                           f"use one of {', '.join(ATTACK_NAMES + WHOLE_ENSEMBLE_ATTACKS)}")
    return key


def threat_model(mode: str, combine: str | None = None) -> tuple[str, str]:
    """``(legacy|adaptive, combine)`` of threat model ``mode`` (adaptive_logits: adaptive, mean logits)."""
    if mode not in THREAT_MODELS:
        raise QrobustError(f"unknown ensemble attack mode {mode!r}; use {', '.join(THREAT_MODELS)} "
                           "(legacy = EMPIR's code)")
    implied = "mean_logits" if mode == "adaptive_logits" else None
    if combine is not None and combine not in COMBINES:
        raise QrobustError(f"unknown combine {combine!r} for adaptive attacks; use {' or '.join(COMBINES)}")
    if implied and combine not in (None, implied):
        raise QrobustError(f"threat model {mode} combines {implied}; drop combine={combine!r} or use "
                           "adaptive")
    return ("legacy" if mode == "legacy" else "adaptive"), (implied or combine or "mean_softmax")


def member_bits(model: nn.Module) -> int:
    """Smallest bit width of any quantizer inside ``model`` (32 = full precision)."""
    bits = [int(m.bits) for m in model.modules()
            if m is not model and isinstance(getattr(m, "bits", None), int)]
    return min(bits, default=FULL_PRECISION)


def describe_member(model: nn.Module) -> str:
    """Short human description, e.g. ``mnistconv a4w2`` or ``mnistconv fp``."""
    cfg = getattr(model, "qrobust_config", None) or {}
    name = cfg.get("name", type(model).__name__)
    kw = cfg.get("kwargs", {})
    if "wbits" in kw or "abits" in kw:
        w, a = kw.get("wbits", 32), kw.get("abits", 32)
        return f"{name} fp" if w == a == 32 else f"{name} a{a}w{w}"
    bits = member_bits(model)
    return f"{name} fp" if bits == FULL_PRECISION else f"{name} {bits}-bit"


# --------------------------------------------------------------------------------------------------------
# The vote on plain tensors (testable on hand-made cases)
# --------------------------------------------------------------------------------------------------------

def vote(preds: Tensor, designated: int, probs: Tensor | None = None,
         num_classes: int | None = None) -> Tensor:
    """EMPIR vote from member predictions ``preds`` (M, N) -> winning class per sample (N,).

    Most votes wins; a tie for the most votes goes to the designated member's class if it is among the
    tied classes, else to the tied class with the highest mean probability ``probs`` (M, N, C) over all
    members (if given), else to the lowest tied class index.
    """
    if preds.dim() != 2:
        raise QrobustError(f"member predictions must have shape (members, samples), got {tuple(preds.shape)}")
    m, n = preds.shape
    if not 0 <= designated < m:
        raise QrobustError(f"designated member {designated} is out of range for {m} members")
    if num_classes is not None:
        c = num_classes
    else:
        c = probs.shape[-1] if probs is not None else int(preds.max()) + 1
    counts = torch.zeros(n, c, dtype=torch.long, device=preds.device)
    counts.scatter_add_(1, preds.t(), torch.ones_like(preds.t()))
    tied = counts == counts.max(1, keepdim=True).values  # (N, C) classes sharing the top count
    d = preds[designated]
    d_tied = tied.gather(1, d[:, None]).squeeze(1)
    score = tied.to(torch.float64)  # among tied: prefer the highest mean probability, then the lowest index
    if probs is not None:
        score = score + probs.detach().to(torch.float64).mean(0) * 0.5
    score = torch.where(tied, score, torch.full_like(score, -1.0))
    fallback = score.argmax(1)
    return torch.where(d_tied, d, fallback)


def agreeing(preds: Tensor, winner: Tensor) -> Tensor:
    """Mask (M, N): which members voted for the winning class. Never empty for a vote result."""
    return preds == winner[None, :]


def _masked_log_mean_softmax(logits: Tensor, mask: Tensor | None) -> Tensor:
    """log(mean over the selected members of softmax(logits)), computed stably; logits (M, N, C)."""
    logp = F.log_softmax(logits, dim=-1)
    if mask is None:
        return torch.logsumexp(logp, dim=0) - math.log(logits.shape[0])
    m = mask[:, :, None]
    logp = torch.where(m, logp, torch.full_like(logp, float("-inf")))
    count = mask.sum(0).clamp_min(1).to(logits.dtype)[:, None]
    return torch.logsumexp(logp, dim=0) - torch.log(count)


def _force_argmax(scores: Tensor, winner: Tensor) -> Tensor:
    """Make argmax(scores) == winner where an exact tie would pick another class (a detached nudge)."""
    wrong = scores.argmax(1) != winner
    if not bool(wrong.any()):
        return scores
    top = scores.detach().amax(1)
    cur = scores.detach().gather(1, winner[:, None]).squeeze(1)
    bump = torch.where(wrong, top - cur + 1e-6 * (1 + top.abs()), torch.zeros_like(top))
    return scores + F.one_hot(winner, scores.shape[1]).to(scores.dtype) * bump[:, None]


# --------------------------------------------------------------------------------------------------------
# The ensemble
# --------------------------------------------------------------------------------------------------------

class Ensemble(nn.Module):
    """Members of any precision combined by the EMPIR vote (default), the mean softmax or the mean logits.

    ``designated`` is the member that breaks ties (EMPIR: the full-precision model 3); by default the last
    full-precision member, or the last member if none is full precision.
    """

    def __init__(self, members: Sequence[nn.Module], *, rule: str = "vote", designated: int | None = None,
                 names: Sequence[str] | None = None) -> None:
        super().__init__()
        members = list(members)
        if not members:
            raise QrobustError("an ensemble needs at least one member")
        if rule not in RULES:
            raise QrobustError(f"unknown ensemble rule {rule!r}; use one of {', '.join(RULES)}")
        shapes = {tuple(cfg["input_shape"]) for cfg in (getattr(mm, "qrobust_config", None) for mm in members)
                  if cfg and "input_shape" in cfg}
        if len(shapes) > 1:
            raise QrobustError(f"ensemble members expect different input shapes {sorted(shapes)}; "
                               "combine models trained on the same dataset")
        self.members = nn.ModuleList(members)
        self.rule = rule
        self.bits = [member_bits(mm) for mm in members]
        if designated is None:
            fp = [i for i, b in enumerate(self.bits) if b == FULL_PRECISION]
            designated = fp[-1] if fp else len(members) - 1
        if not -len(members) <= designated < len(members):
            raise QrobustError(f"designated member {designated} is out of range for {len(members)} members")
        self.designated = designated % len(members)
        self.names = list(names) if names is not None else [describe_member(mm) for mm in members]
        self.member_configs: list[dict[str, Any]] = []  # filled by from_checkpoints
        self.member_paths: list[str] = []
        if len(self.names) != len(members):
            raise QrobustError(f"{len(self.names)} names given for {len(members)} members")

    @classmethod
    def from_checkpoints(cls, paths: Sequence[str | os.PathLike], device: torch.device | str = "cpu",
                         **kwargs: Any) -> Ensemble:
        """Load qrobust checkpoints as members (order matters: EMPIR's model 3 is the last, FP one)."""
        from qrobust.checkpoint import load_checkpoint

        members, configs = [], []
        for p in paths:
            model, config = load_checkpoint(p, device)
            members.append(model)
            configs.append(config)
        datasets = {c.get("dataset") for c in configs if c.get("dataset")}
        if len(datasets) > 1:
            raise QrobustError("ensemble members were trained on different datasets "
                               f"({', '.join(sorted(datasets))}); combine models of one dataset")
        ens = cls(members, **kwargs)
        ens.member_configs = configs
        ens.member_paths = [str(Path(p)) for p in paths]
        return ens.eval()

    def __len__(self) -> int:
        return len(self.members)

    def extra_repr(self) -> str:
        return f"rule={self.rule}, designated={self.designated}, members={self.names}"

    # ---- member outputs and the vote ----

    def member_logits(self, x: Tensor) -> Tensor:
        """Stacked member outputs (M, N, C), differentiable."""
        outs = [m(x) for m in self.members]
        c = {o.shape[-1] for o in outs}
        if len(c) > 1:
            raise QrobustError(f"ensemble members predict different numbers of classes {sorted(c)}")
        return torch.stack(outs, 0)

    def vote_from_logits(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """(winning class (N,), agreeing-member mask (M, N)) from stacked member logits; no gradient."""
        with torch.no_grad():
            preds = logits.argmax(-1)
            win = vote(preds, self.designated, F.softmax(logits.detach().float(), -1), logits.shape[-1])
            return win, agreeing(preds, win)

    @torch.no_grad()
    def vote(self, x: Tensor) -> Tensor:
        """The EMPIR vote on ``x`` (whatever ``rule`` the ensemble uses for ``forward``)."""
        return self.vote_from_logits(self.member_logits(x))[0]

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Prediction under the ensemble's rule (= ``forward(x).argmax(1)``)."""
        return self.forward(x).argmax(1)

    def combine(self, logits: Tensor, rule: str | None = None) -> Tensor:
        """Scores (N, C) from stacked member logits under ``rule`` (default: the ensemble's rule)."""
        rule = rule or self.rule
        if rule == "mean_logits":
            return logits.mean(0)
        if rule == "mean_softmax":
            return _masked_log_mean_softmax(logits, None)
        if rule == "vote":
            win, mask = self.vote_from_logits(logits)
            return _force_argmax(_masked_log_mean_softmax(logits, mask), win)
        raise QrobustError(f"unknown ensemble rule {rule!r}; use one of {', '.join(RULES)}")

    def forward(self, x: Tensor) -> Tensor:
        return self.combine(self.member_logits(x))

    # ---- attacks ----

    def attack_target(self, mode: str, attack: str, *, combine: str | None = None) -> AttackTarget:
        """The module an attack should differentiate for threat model ``mode`` (:data:`THREAT_MODELS`) and
        attack ``attack``.

        Use it as ``atk = PGD(..., loss=target.loss); x_adv = atk(target, x, target.labels(x))`` and score
        ``x_adv`` on the ensemble itself (:func:`on_target` does this). ``combine`` (adaptive only) picks
        mean softmax (default) or mean logits.
        """
        return AttackTarget(self, mode, attack, combine=combine)


class AttackTarget(nn.Module):
    """What an attack differentiates for an ensemble (see :meth:`Ensemble.attack_target`).

    ``loss`` is the loss name to give attacks that take one (``"ce"``, ``"ce_prob"``, ``"cw"``);
    ``labels(x)`` gives the labels EMPIR used (the ensemble's own prediction on the clean input).
    """

    def __init__(self, ensemble: Ensemble, mode: str, attack: str, *, combine: str | None = None) -> None:
        super().__init__()
        kind, combine = threat_model(mode, combine)
        self.ensemble = ensemble
        self.mode = mode
        self.attack = normalize_attack_name(attack)
        self.combine = combine
        self._frozen_mask: Tensor | None = None
        if self.attack in WHOLE_ENSEMBLE_ATTACKS:
            self.output, self.loss = "ensemble", "ce"
            self.description = (f"{self.attack}: every threat model and the vote-aware objective, judged on "
                                f"the {ensemble.rule.replace('_', ' ')} (the mode only labels the row)")
        elif kind == "legacy":
            if self.attack in ("bim", "cw"):
                self.output = "designated_logits"
                self.loss = "cw" if self.attack == "cw" else "ce"
                self.description = (f"{self.attack.upper()} legacy: gradients of the designated member "
                                    f"only ({ensemble.names[ensemble.designated]}), as EMPIR's "
                                    "dict-key collision did")
            elif self.attack == "jsma":
                # CleverHans' JSMA differentiated combinedAvgCorrectProb itself (probabilities), and
                # qrobust's JSMA differentiates the output as returned.
                self.output = "agreeing_mean_softmax"
                self.loss = "ce_prob"
                self.description = ("JSMA legacy: Jacobian of the mean softmax of the members agreeing with "
                                    "the vote on the current input")
            else:
                self.output = "log_agreeing_mean_softmax"
                self.loss = "ce_prob"
                self.description = (f"{self.attack.upper()} legacy: CE on the mean softmax of the members "
                                    "agreeing with the vote on the current input, probabilities fed as "
                                    "logits")
        else:
            self.output = "log_mean_softmax" if combine == "mean_softmax" else "mean_logits"
            self.loss = "cw" if self.attack == "cw" else "ce"
            what = "CW margin" if self.attack == "cw" else "CE"
            self.description = (f"{self.attack.upper()} adaptive: {what} on the "
                                f"{combine.replace('_', ' ')} of all {len(ensemble)} members, "
                                "STE through every quantizer")

    def extra_repr(self) -> str:
        return f"mode={self.mode}, attack={self.attack}, output={self.output}, loss={self.loss}"

    @torch.no_grad()
    def labels(self, x: Tensor, batch_size: int = 500) -> Tensor:
        """The ensemble's own predictions on (clean) ``x``: the labels EMPIR's attacks used."""
        out = [self.ensemble.predict(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=x.device)

    @contextmanager
    def frozen_mask(self, x_clean: Tensor) -> Iterator[AttackTarget]:
        """Legacy only: keep the agreeing-member mask of ``x_clean`` fixed while attacking that exact batch.

        EMPIR's graph recomputed the mask on the current (adversarial) input at every step; this variant is
        for studying that choice. Forward passes on batches of another size raise an error.
        """
        if self.output not in ("log_agreeing_mean_softmax", "agreeing_mean_softmax"):
            raise QrobustError("a frozen agreeing-member mask only applies to legacy FGSM, PGD and "
                               "JSMA targets")
        with torch.no_grad():
            _, mask = self.ensemble.vote_from_logits(self.ensemble.member_logits(x_clean))
        self._frozen_mask = mask
        try:
            yield self
        finally:
            self._frozen_mask = None

    def forward(self, x: Tensor) -> Tensor:
        ens = self.ensemble
        if self.output == "ensemble":
            return ens(x)
        if self.output == "designated_logits":
            return ens.members[ens.designated](x)
        logits = ens.member_logits(x)
        if self.output in ("log_agreeing_mean_softmax", "agreeing_mean_softmax"):
            if self._frozen_mask is not None:
                if self._frozen_mask.shape[1] != x.shape[0]:
                    raise QrobustError(f"frozen mask was computed for {self._frozen_mask.shape[1]} images "
                                       f"but the attack evaluated {x.shape[0]}; attack the same batch in "
                                       "one call")
                out = _masked_log_mean_softmax(logits, self._frozen_mask)
            else:
                win, mask = ens.vote_from_logits(logits)
                out = _force_argmax(_masked_log_mean_softmax(logits, mask), win)
            return out if self.output == "log_agreeing_mean_softmax" else out.exp()
        if self.output == "log_mean_softmax":
            return _masked_log_mean_softmax(logits, None)
        return logits.mean(0)


class VoteView(nn.Module):
    """The vote-aware view of an ensemble: per-class vote scores
    (:func:`~qrobust.attacks.losses.vote_scores`) whose argmax is forced to be the vote.

    A CW-margin attack on it (APGD by gradient, Square by score) aims at what breaks the vote - a
    majority of members agreeing on one wrong class - and judges success exactly on the vote.
    """

    def __init__(self, ensemble: Ensemble, k: int | None = None, kappa: float = 0.0) -> None:
        super().__init__()
        self.ensemble, self.k, self.kappa = ensemble, k, kappa

    def forward(self, x: Tensor) -> Tensor:
        from qrobust.attacks.losses import vote_scores

        logits = self.ensemble.member_logits(x)
        win = self.ensemble.vote_from_logits(logits)[0]
        return _force_argmax(vote_scores(logits, self.k, self.kappa), win)


def on_target(attack: Any, target: AttackTarget) -> Any:
    """``attack`` differentiating ``target`` and scored on the ensemble (labels: its own prediction, as in
    EMPIR); the threat model and the target are recorded in the attack's config.

    In the legacy threat model the loss is part of what EMPIR computed, so FGSM/BIM/PGD must use
    ``target.loss``; adaptive attacks may choose their loss.
    """
    from qrobust.attacks import OnView

    loss = getattr(attack, "loss", None)
    if (target.mode == "legacy" and attack.name in ("fgsm", "bim", "pgd") and isinstance(loss, str)
            and loss != target.loss):
        raise QrobustError(f"{target.mode} {attack.name} on an ensemble needs loss={target.loss!r}, the "
                           f"attack was built with loss={loss!r}; build it with loss=target.loss")
    return OnView(attack, target, info={"ensemble_mode": target.mode, "target_output": target.output,
                                        "target": target.description})


def ensemble_attack(ensemble: Ensemble, attack: str, mode: str, *, combine: str | None = None,
                    **params: Any) -> Any:
    """Build ``attack`` (a :func:`qrobust.attacks.create_attack` name) against ``ensemble`` in threat model
    ``mode``: an :class:`~qrobust.attacks.OnView` of the ensemble's attack target.

    The loss of FGSM/BIM/PGD is set from the target (``ce_prob`` for legacy FGSM/PGD, ``ce`` otherwise)
    unless an adaptive attack names its own; other ``params`` go to the attack.
    """
    from qrobust.attacks import create_attack

    target = ensemble.attack_target(mode, attack, combine=combine)
    if target.attack in ("fgsm", "bim", "pgd") and (mode == "legacy" or "loss" not in params):
        params = {**params, "loss": target.loss}
    return on_target(create_attack(target.attack, **params), target)


__all__ = ["ATTACK_NAMES", "COMBINES", "RULES", "THREAT_MODELS", "WHOLE_ENSEMBLE_ATTACKS", "AttackTarget",
           "Ensemble", "VoteView", "agreeing", "describe_member", "ensemble_attack", "member_bits",
           "normalize_attack_name", "on_target", "threat_model", "vote"]
