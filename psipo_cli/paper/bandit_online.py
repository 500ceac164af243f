"""Online IPO, online ΨPO and IPO-MD on the tabular bandit (Calandriello et al. 2024, arXiv 2403.08635).

The offline bandit (`bandit.train_bandit`) regresses h on pairs drawn from a fixed dataset. Online, both actions of
a pair are drawn from the current policy π (gradients stopped through the sampling), or for IPO-MD from the
geometric mixture π_β ∝ π^(1−β)·π_ref^β, and labelled by a preference model: a matrix P[i, j] = P(i ≻ j) with
P[j, i] = 1 − P[i, j] and P[i, i] = ½, which may hold preferences no reward explains (a cycle a≻b, b≻c, c≻a). The
step is the offline one: the same `objectives.pair_losses` on h = s_y − s_y' (π_ref uniform), through the same Adam
loop (`bandit.optimise`). Identity Ψ regresses h on (p̂ − ½)/τ (online IPO); `--psi` gives online ΨPO.

`online_fixed_point` is the closed form to compare with, computed without the training code. With μ the sampling
policy, the expected loss is least squares over pairs weighted μ(y)μ(y') with an antisymmetric target, whose
minimiser (paper-notes, "Online IPO"; the root-finding form, Azar et al. eq. 20–22) is
    log π(y)/π_ref(y) = G(y ≻ μ)/τ + const,  G(y ≻ μ) = Σ_y' μ(y')·½(Ψ(P[y, y']) − Ψ(P[y', y])),
which for identity Ψ is P(y ≻ μ) − ½. Online IPO (μ = π) stops at π*(y) ∝ π_ref(y)·exp(P(y ≻ π*)/τ), the
KL-regularised Nash equilibrium of the preference game (Munos et al. 2023). IPO-MD (μ = π_β) stops at
π ∝ π_ref·exp(P(· ≻ π_β)/τ) instead: not π* for β > 0. Its mixture π_β then satisfies
log π_β = log π_ref + (1 − β)·P(· ≻ π_β)/τ + const, i.e. π_β is the Nash equilibrium at τ/(1 − β).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from psipo_cli import objectives
from psipo_cli.errors import UserError
from psipo_cli.paper.bandit import BanditRun, check_optimiser, check_settings, optimise, parse_pairs, single_thread

# The losses whose online fixed point `online_fixed_point` gives: their target depends on p̂ only. Online DPO's
# stationary point solves E_{y'~π} σ(τ·h(y, y')) = P(y ≻ π), a different equation left out here.
ONLINE_OBJECTIVES = ("ipo", "psipo")
FIXED_POINT_TOL = 1e-12  # max |Δπ| between damped iterations at which the closed form counts as converged


def parse_preferences(spec: str, actions: list[str]) -> Tensor:
    """The preference matrix P (A, A), float64, from the `--pairs` syntax "a>b:0.8,b>c:0.8,c>a:0.8".

    `w>l:p` sets P[w, l] = p and P[l, w] = 1 − p (p defaults to 1); pairs not listed are ½, as is the diagonal.
    Listing a pair twice in the same direction is an error, and so is the reverse direction with a probability
    other than 1 − p; the reverse with exactly 1 − p is accepted (it says the same thing).
    """
    pairs = parse_pairs(spec, actions)  # item syntax, action names and label range checked there
    items = [raw.strip() for raw in spec.split(",")]  # one per pair, in order
    preference = torch.full((len(actions), len(actions)), 0.5, dtype=torch.float64)
    given: dict[tuple[int, int], str] = {}
    for pair, item in zip(pairs, items, strict=True):
        where = f"pair {item!r}"
        if (pair.winner, pair.loser) in given:
            raise UserError(
                f"P({actions[pair.winner]} ≻ {actions[pair.loser]}) is already given by "
                f"{given[pair.winner, pair.loser]!r}; a preference matrix holds each pair once",
                where=where,
            )
        if (pair.loser, pair.winner) in given and not math.isclose(
            float(preference[pair.winner, pair.loser]), pair.p_hat, abs_tol=1e-9
        ):
            raise UserError(
                f"contradicts {given[pair.loser, pair.winner]!r}, which makes P({actions[pair.winner]} ≻ "
                f"{actions[pair.loser]}) = {float(preference[pair.winner, pair.loser]):g}",
                where=where,
            )
        given[pair.winner, pair.loser] = item
        preference[pair.winner, pair.loser], preference[pair.loser, pair.winner] = pair.p_hat, 1 - pair.p_hat
    return preference


def check_preference(preference: Tensor) -> None:
    """P must be square (A ≥ 2), in [0, 1], with P + Pᵀ = 1 (so P[i, i] = ½)."""
    if preference.ndim != 2 or preference.shape[0] != preference.shape[1] or preference.shape[0] < 2:
        raise UserError(f"must be an A×A matrix with A ≥ 2, got shape {tuple(preference.shape)}", where="preference")
    if not bool(((preference >= 0) & (preference <= 1)).all()):
        raise UserError("entries must be probabilities in [0, 1]", where="preference")
    if not torch.allclose(preference + preference.T, torch.ones_like(preference), rtol=0, atol=1e-9):
        raise UserError("P[i, j] + P[j, i] must be 1 for every i, j", where="preference")


def _check_online(preference: Tensor, objective: str, taus: list[float], psi: str, mixture: float) -> None:
    check_preference(preference)
    check_settings(objective, taus, psi)
    if objective not in ONLINE_OBJECTIVES:
        raise UserError(f"online mode supports {', '.join(ONLINE_OBJECTIVES)}, got {objective!r}", where="loss")
    if not 0 <= mixture <= 1:
        raise UserError(f"must be in [0, 1], got {mixture:g}", where="mixture")


def train_online(
    preference: Tensor,
    objective: str,
    taus: list[float],
    psi: str = "identity",
    mixture: float = 0.0,
    steps: int = 18_000,
    lr: float = 0.01,
    batch: int = 9,
    seeds: int = 10,
    seed: int = 0,
    record_every: int = 100,
    label_eps: float = 0.01,
) -> BanditRun:
    """Train T·S tabular policies from π = π_ref, drawing each step's pairs from the policy itself.

    Each (τ, seed) draws `batch` pairs (y, y'), y and y' independently from π_β ∝ π^(1−β)·π_ref^β (β = `mixture`;
    β = 0 is π: online IPO; β > 0 is IPO-MD, Calandriello et al. 2024), with no gradient through the draw, and
    labels them p̂ = P[y, y']. ΨPO regresses on the soft label; IPO, which ignores soft labels, sees y ≻ y' with
    probability p̂ (an annotator's vote), unbiased for its identity Ψ. A pair y = y' has h = 0 and no gradient.
    """
    _check_online(preference, objective, taus, psi, mixture)
    check_optimiser(steps, lr, batch, seeds, record_every)
    n_actions = preference.shape[0]
    table = preference.float()  # (A, A), looked up per drawn pair
    ref_logp = -math.log(n_actions)  # π_ref uniform

    def sample(logits: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        # log π_β = (1 − β)·log π + β·log π_ref + const; softmax normalises (T, S, A)
        probs = F.softmax((1 - mixture) * F.log_softmax(logits, -1) + mixture * ref_logp, -1)
        draws = torch.multinomial(probs.view(-1, n_actions), 2 * batch, replacement=True, generator=generator)
        draws = draws.view(*logits.shape[:2], 2 * batch)  # (T, S, 2·batch), i.i.d. per (τ, seed)
        chosen, rejected = draws[..., :batch], draws[..., batch:]  # (T, S, batch) each
        return chosen, rejected, table[chosen, rejected]

    vote = not objectives.OBJECTIVES[objective].uses_p_hat
    with single_thread():
        return optimise(n_actions, sample, vote, objective, taus, psi, steps, lr, seeds, seed, record_every, label_eps)


def game_payoff(preference: Tensor, psi: str = "identity", label_eps: float = 0.01) -> Tensor:
    """G[y, y'] = ½(Ψ(P[y, y']) − Ψ(P[y', y])) (A, A), antisymmetric: the margin target times τ of pair (y, y').

    Identity Ψ: P − ½. Ψs infinite at 0 or 1 (logit) see P clipped into [ε, 1 − ε], ε = `label_eps`, as the
    loss's labels are.
    """
    spec = objectives.resolve_psi(psi, label_eps)
    p = preference.double()
    if spec.needs_clip:
        p = p.clamp(label_eps, 1 - label_eps)
    return 0.5 * (spec.fn(p) - spec.fn(p.T))


def online_fixed_point(
    preference: Tensor,
    tau: float,
    psi: str = "identity",
    mixture: float = 0.0,
    ref: Tensor | None = None,
    label_eps: float = 0.01,
    max_iter: int = 200_000,
) -> Tensor:
    """The π (A,) online ΨPO stops at: π(y) ∝ π_ref(y)·exp(G(y ≻ π_β)/τ), by damped fixed-point iteration.

    G is `game_payoff` (identity Ψ: P − ½, so with β = 0 this is the KL-regularised Nash equilibrium
    π*(y) ∝ π_ref(y)·exp(P(y ≻ π*)/τ)); π_β ∝ π^(1−β)·π_ref^β is the sampling policy (β = `mixture`).
    Iterates π ← (1 − η)π + η·normalise(π_ref·exp(G·π_β/τ)) from π_ref until max |Δπ| < 1e-12.

    Step size: near the fixed point (β = 0) the map's Jacobian is D·G/τ with D = diag π − ππᵀ, a PSD matrix times
    an antisymmetric one, so its eigenvalues are imaginary, |λ| ≤ L = ‖D‖₂‖G‖₂/τ, and the damped map's are
    1 − η + iηλ, inside the unit circle for η < 2/(1 + L²). Each iteration takes η = min(0.1, 1/(1 + L²)), with
    ‖D‖₂ bounded by min(½, trace D) at the current π (small near a vertex, where small steps would crawl).
    Raises UserError if it has not converged after `max_iter` iterations (very small τ: 0.01 with a logit Ψ on
    hard preferences).
    """
    check_preference(preference)
    if not 0 < tau < math.inf:
        raise UserError(f"must be positive and finite, got {tau:g}", where="tau")
    if not 0 <= mixture <= 1:
        raise UserError(f"must be in [0, 1], got {mixture:g}", where="mixture")
    n_actions = preference.shape[0]
    ref = torch.full((n_actions,), 1 / n_actions, dtype=torch.float64) if ref is None else ref.double()
    payoff = game_payoff(preference, psi, label_eps)  # (A, A)
    gain = float(torch.linalg.matrix_norm(payoff, 2)) / tau  # ‖G‖₂/τ
    pi, change = ref.clone(), math.inf
    for _ in range(max_iter):
        bound = gain * min(0.5, 1 - float(pi @ pi))  # ≥ |λ| of the Jacobian at π
        eta = min(0.1, 1 / (1 + bound**2))
        mix = pi ** (1 - mixture) * ref**mixture
        mix = mix / mix.sum()  # π_β (A,)
        wins = payoff @ mix  # G(y ≻ π_β) (A,)
        target = ref * torch.exp((wins - wins.max()) / tau)  # shifted by a constant: no overflow at small τ
        step = (1 - eta) * pi + eta * target / target.sum()
        change = float((step - pi).abs().max())
        pi = step
        if change < FIXED_POINT_TOL:
            return pi
    raise UserError(
        f"the damped fixed-point iteration did not converge in {max_iter} iterations (last change {change:.1e})",
        where=f"closed form at tau={tau:g}",
    )
