"""The paper's tabular examples (Azar et al. 2023, arXiv 2310.12036v2, §5.3–5.4) on the same loss code.

A softmax policy over A actions with one free logit per action, a uniform reference policy, and the
paper's optimiser: Adam, learning rate 0.01, 18,000 steps, mini-batches of 9 pairs drawn with
replacement, 10 seeds. Losses come only from `objectives.margin` and `objectives.pair_losses`.

`closed_form` gives the optimum the training should reach: with tabular logits s and a uniform
reference, h(y_w, y_l) = s_w − s_l, so the sampled IPO/ΨPO loss is least squares on the comparison graph.
`optimise` is the Adam loop; `bandit_online` runs it on pairs drawn from the policy instead of a dataset.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from psipo_cli import objectives
from psipo_cli.errors import UserError

Z_95 = 1.96  # two-sided 95% quantile of the standard normal


@dataclass(frozen=True)
class Pair:
    """One preference: action `winner` preferred to action `loser` with probability `p_hat`."""

    winner: int
    loser: int
    p_hat: float = 1.0


def parse_actions(spec: str) -> list[str]:
    """Action names from "a,b,c"; at least two, none empty, no duplicates."""
    names = [name.strip() for name in spec.split(",")]
    for name in names:
        if not name:
            raise UserError(f"empty action name in {spec!r}", where="actions")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise UserError(f"action {name!r} is listed twice", where="actions")
        seen.add(name)
    if len(names) < 2:
        raise UserError(f"need at least two actions, got {spec!r}", where="actions")
    return names


def parse_pairs(spec: str, actions: list[str]) -> list[Pair]:
    """Pairs from "a>b,b>c:0.8,a>c": `w>l` means w ≻ l, `:p` its probability (default 1). May repeat."""
    index = {name: i for i, name in enumerate(actions)}
    pairs = []
    for raw in spec.split(","):
        item = raw.strip()
        where = f"pair {item!r}"
        sides, sep, label = item.partition(":")
        names = [name.strip() for name in sides.split(">")]
        if len(names) != 2 or not all(names) or (sep and ":" in label):
            raise UserError("expected 'winner>loser' or 'winner>loser:p'", where=where)
        for name in names:
            if name not in index:
                raise UserError(f"unknown action {name!r}; actions: {', '.join(actions)}", where=where)
        if names[0] == names[1]:
            raise UserError(f"an action cannot be compared with itself ({names[0]!r})", where=where)
        try:
            p_hat = float(label) if sep else 1.0
        except ValueError:
            raise UserError(f"label {label.strip()!r} is not a number", where=where) from None
        if not 0 <= p_hat <= 1:
            raise UserError(f"label {p_hat} is outside [0, 1]", where=where)
        pairs.append(Pair(index[names[0]], index[names[1]], p_hat))
    return pairs


@dataclass
class BanditRun:
    """Result of `train_bandit`: T = len(taus), S seeds, A actions, K recorded steps."""

    taus: list[float]
    probs: Tensor  # (T, S, A) final π
    curves: Tensor  # (K, T, S, A) π at each of curve_steps
    curve_steps: list[int]  # 0, record_every, 2·record_every, ..., steps


def check_settings(objective: str, taus: list[float], psi: str) -> None:
    """The checks every bandit run shares, offline or online: τ range, objective and Ψ names."""
    if not taus or not all(0 < tau < math.inf for tau in taus):
        raise UserError(f"every tau must be in (0, inf), got {taus}", where="tau")
    if objective not in objectives.OBJECTIVES:
        raise UserError(f"unknown objective {objective!r}; valid: {', '.join(objectives.OBJECTIVES)}")
    if psi not in objectives.PSI:
        raise UserError(f"unknown psi {psi!r}; valid: {', '.join(objectives.PSI)}")


def _check(n_actions: int, pairs: list[Pair], objective: str, taus: list[float], psi: str) -> None:
    if n_actions < 2:
        raise UserError(f"need at least two actions, got {n_actions}", where="actions")
    if not pairs:
        raise UserError("need at least one pair", where="pairs")
    for pair in pairs:
        if not (0 <= pair.winner < n_actions and 0 <= pair.loser < n_actions) or pair.winner == pair.loser:
            raise UserError(f"{pair} does not name two different actions of {n_actions}", where="pairs")
        if not 0 <= pair.p_hat <= 1:
            raise UserError(f"{pair} has a label outside [0, 1]", where="pairs")
    check_settings(objective, taus, psi)


def check_optimiser(steps: int, lr: float, batch: int, seeds: int, record_every: int) -> None:
    for name, value in (("steps", steps), ("batch", batch), ("seeds", seeds), ("record_every", record_every)):
        if value < 1:
            raise UserError(f"must be at least 1, got {value}", where=name)
    if not lr > 0:
        raise UserError(f"must be positive, got {lr}", where="lr")


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch single-threaded inside, restoring the setting after.

    The tensors are tiny (T·S·A numbers): intra-op threads only add synchronisation, and on a busy 2-core
    machine they made each step ~30x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# Draws one mini-batch per (τ, seed): given the current logits (T, S, A), detached, and the run's generator,
# returns chosen and rejected action ids (T, S, batch) and p̂ = P(chosen ≻ rejected) (T, S, batch).
PairSampler = Callable[[Tensor, torch.Generator], tuple[Tensor, Tensor, Tensor]]


def train_bandit(
    n_actions: int,
    pairs: list[Pair],
    objective: str,
    taus: list[float],
    psi: str = "identity",
    steps: int = 18_000,
    lr: float = 0.01,
    batch: int = 9,
    seeds: int = 10,
    seed: int = 0,
    record_every: int = 100,
    label_eps: float = 0.01,
) -> BanditRun:
    """Train T·S tabular policies at once, one per (τ, seed), from π = π_ref (all logits zero).

    Each (τ, seed) draws its own batch indices. The loss summed over (τ, seed) is a sum of independent
    per-run batch means, so each run's logits get only their own gradient, and Adam is elementwise: this
    equals T·S separate runs. Objectives that ignore soft labels (IPO) see each drawn pair as w ≻ l with
    probability p̂ and l ≻ w otherwise (an annotator's vote), whose expectation is the identity-Ψ target.
    """
    _check(n_actions, pairs, objective, taus, psi)
    check_optimiser(steps, lr, batch, seeds, record_every)
    winners = torch.tensor([pair.winner for pair in pairs])  # (P,)
    losers = torch.tensor([pair.loser for pair in pairs])  # (P,)
    p_hats = torch.tensor([pair.p_hat for pair in pairs])  # (P,)

    def sample(logits: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        idx = torch.randint(len(pairs), (*logits.shape[:2], batch), generator=generator)  # (T, S, batch)
        return winners[idx], losers[idx], p_hats[idx]

    # Draw votes only when some label is soft, so hard-label runs of every objective share one RNG stream.
    vote = not objectives.OBJECTIVES[objective].uses_p_hat and bool((p_hats < 1).any())
    with single_thread():
        return optimise(n_actions, sample, vote, objective, taus, psi, steps, lr, seeds, seed, record_every, label_eps)


def optimise(
    n_actions: int,
    sample: PairSampler,
    vote: bool,
    objective: str,
    taus: list[float],
    psi: str,
    steps: int,
    lr: float,
    seeds: int,
    seed: int,
    record_every: int,
    label_eps: float,
) -> BanditRun:
    """The Adam loop shared by the offline (`train_bandit`) and online (`bandit_online`) bandits.

    `sample` draws each step's pairs; with `vote`, a pair is presented as chosen ≻ rejected with probability
    p̂ and swapped otherwise (for objectives that ignore soft labels). π_ref is uniform, so the margin's
    reference terms are the same constant log(1/A) for every action.
    """
    generator = torch.Generator().manual_seed(seed)
    uses_p_hat = objectives.OBJECTIVES[objective].uses_p_hat
    tau = torch.tensor(taus).view(-1, 1, 1)  # (T, 1, 1), broadcasts over seeds and batch
    ref_logp = torch.tensor(-math.log(n_actions))  # log π_ref(y) = log(1/A) for every action
    logits = torch.zeros(len(taus), seeds, n_actions, requires_grad=True)  # (T, S, A)
    optimizer = torch.optim.Adam([logits], lr=lr, fused=True)  # fused: fewer ops per step
    curves, curve_steps = [F.softmax(logits.detach(), -1)], [0]
    for step in range(1, steps + 1):
        chosen, rejected, p_hat = sample(logits.detach(), generator)  # (T, S, batch) each
        if vote:
            flip = torch.rand(chosen.shape, generator=generator) >= p_hat  # (T, S, batch)
            chosen, rejected = torch.where(flip, rejected, chosen), torch.where(flip, chosen, rejected)
        logps = F.log_softmax(logits, -1)  # (T, S, A)
        h = objectives.margin(logps.gather(-1, chosen), logps.gather(-1, rejected), ref_logp, ref_logp)
        losses, _ = objectives.pair_losses(
            objective, h, tau, p_hat if uses_p_hat else None, psi, label_eps
        )  # (T, S, batch)
        optimizer.zero_grad(set_to_none=True)
        losses.mean(-1).sum().backward()  # (T, S) -> (); independent gradient per (τ, seed)
        optimizer.step()
        if step % record_every == 0 or step == steps:
            curves.append(F.softmax(logits.detach(), -1))
            curve_steps.append(step)
    return BanditRun(list(taus), curves[-1], torch.stack(curves), curve_steps)  # curves (K, T, S, A)


def closed_form(
    n_actions: int,
    pairs: list[Pair],
    objective: str,
    tau: float,
    psi: str = "identity",
    label_eps: float = 0.01,
) -> Tensor | None:
    """The optimum π (A,) of the expected mini-batch loss, or None where it is not finite.

    IPO/ΨPO: minimise Σ_pairs (s_w − s_l − target)² over logits s, with targets from
    `objectives.pair_losses` (for IPO with soft labels, the expected voted target (2p̂ − 1)/(2τ)).
    Repeated pairs weigh more. s is unique only up to a constant per connected component of the
    comparison graph; the min-norm solution (zero mean logit in each component, via pinv) is returned,
    which for a disconnected graph fixes the mass between components arbitrarily (training from zero
    logits with Adam need not end at that split). Actions in no pair keep logit 0.

    DPO: None unless every p̂ is strictly inside (0, 1); hard labels push h to infinity (§4.2). With
    soft labels the least-squares solution with target logit(p̂)/τ is exact when those targets are
    consistent (a tree, or two actions); otherwise it is refined to DPO's own optimum (the Bradley–Terry
    fit) by L-BFGS on the same loss, which stays in the min-norm subspace.
    """
    _check(n_actions, pairs, objective, [tau], psi)
    p_hats = torch.tensor([pair.p_hat for pair in pairs], dtype=torch.float64)  # (P,)
    if objective == "dpo" and not bool(((p_hats > 0) & (p_hats < 1)).all()):
        return None
    rows = torch.arange(len(pairs))
    winners = torch.tensor([pair.winner for pair in pairs])  # (P,)
    losers = torch.tensor([pair.loser for pair in pairs])  # (P,)
    incidence = torch.zeros(len(pairs), n_actions, dtype=torch.float64)  # (P, A): h = incidence @ s
    incidence[rows, winners], incidence[rows, losers] = 1.0, -1.0
    eps = 0.0 if objective == "dpo" else label_eps  # p̂ ∈ (0, 1): DPO's loss itself never clips
    _, targets = objectives.pair_losses(objective, torch.zeros_like(p_hats), tau, p_hats, psi, eps)  # (P,)
    if not objectives.OBJECTIVES[objective].uses_p_hat:
        targets = (2 * p_hats - 1) * targets  # expected target under voted labels
    s = torch.linalg.pinv(incidence) @ targets  # (A,) min-norm least squares
    if objective == "dpo":
        s = _refine(s, winners, losers, p_hats, tau)
    return F.softmax(s, -1)


def _refine(s: Tensor, winners: Tensor, losers: Tensor, p_hats: Tensor, tau: float) -> Tensor:
    """Minimise the mean soft-label DPO loss over logits s (A,) from s; it is convex in s."""
    s = s.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [s], max_iter=500, tolerance_grad=1e-12, tolerance_change=0, line_search_fn="strong_wolfe"
    )

    def loss() -> Tensor:
        optimizer.zero_grad()
        h = objectives.margin(s[winners], s[losers], torch.tensor(0.0), torch.tensor(0.0))  # (P,)
        value = objectives.pair_losses("dpo", h, tau, p_hats)[0].mean()
        value.backward()
        return value

    optimizer.step(loss)
    return s.detach()


@dataclass
class BanditSummary:
    """Seed mean and 95% interval of π per τ and action; `curve_*` the same at each recorded step."""

    taus: list[float]
    mean: Tensor  # (T, A)
    low: Tensor  # (T, A)
    high: Tensor  # (T, A)
    curve_steps: list[int]
    curve_mean: Tensor  # (K, T, A)
    curve_low: Tensor  # (K, T, A)
    curve_high: Tensor  # (K, T, A)


def _interval(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean over the seed axis (-2) ± 1.96·std/√S, clamped to [0, 1]; zero width for one seed."""
    seeds = x.shape[-2]
    mean = x.mean(-2)  # (..., S, A) -> (..., A)
    half = Z_95 * x.std(-2) / math.sqrt(seeds) if seeds > 1 else torch.zeros_like(mean)
    return mean, (mean - half).clamp(0, 1), (mean + half).clamp(0, 1)


def summarize(run: BanditRun) -> BanditSummary:
    """Mean over seeds and a normal-approximation 95% confidence interval for that mean.

    The interval is mean ± 1.96·std/√S (sample std), i.e. how well S seeds pin the average run, not the
    spread of single runs; with the paper's 10 seeds it is an approximation.
    """
    mean, low, high = _interval(run.probs)
    curve_mean, curve_low, curve_high = _interval(run.curves)
    return BanditSummary(run.taus, mean, low, high, run.curve_steps, curve_mean, curve_low, curve_high)
