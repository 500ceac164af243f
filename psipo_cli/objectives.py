"""Per-pair preference losses of Azar et al. 2023, arXiv 2310.12036v2, as pure tensor functions.

Inputs are per-sequence log-probabilities of shape (B,) (or anything broadcastable, e.g. the bandit's
(T, S, B) with `tau` of shape (T, 1, 1)); outputs are per-pair losses, never reduced. Equation numbers
are those of v2. The trainer never branches on the objective's name: it calls `pair_losses`, which
dispatches through `OBJECTIVES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from psipo_cli.psi_expr import CompiledPsi, PsiExpressionError, compile_psi

# Ψ maps a preference probability to a utility in the ΨPO objective. "identity" gives IPO, "logit" with
# Bradley–Terry preferences gives the RLHF/DPO optimum (Proposition 1).
PSI: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda q: q,
    "logit": torch.logit,  # log(q / (1 - q)), infinite at q ∈ {0, 1}
}
# Ψs that are infinite at 0 or 1: p̂ is clipped into [label_eps, 1 − label_eps] before they see it.
_PSI_NEEDS_CLIP = frozenset({"logit"})

# Which per-sequence log-prob each objective uses by default (see `sequence_logps`). DPO's paper and
# TRL sum the response tokens' log-probs. TRL's IPO, a choice agreed with the IPO paper's authors, uses
# the token mean so that τ's scale does not depend on response length. ΨPO generalises IPO (identity Ψ
# is IPO), so it follows IPO.
DEFAULT_AGGREGATION: dict[str, str] = {"dpo": "sum", "ipo": "mean", "psipo": "mean"}


@lru_cache(maxsize=64)
def resolve_psi(name: str, label_eps: float = 0.01) -> CompiledPsi:
    """Ψ by registered name, or else a checked expression in q (see psi_expr); ValueError saying why if neither.

    Compiled expressions are cached: the trainer looks Ψ up on every step.
    """
    if name in PSI:
        return CompiledPsi(name, PSI[name], needs_clip=name in _PSI_NEEDS_CLIP, linear=name == "identity")
    try:
        return compile_psi(name, label_eps)
    except PsiExpressionError as err:
        if name.isidentifier() and len(name) <= 40:  # most likely a misspelt name, not an attempted expression
            valid = f"{', '.join(sorted(PSI))}, or an expression in q such as 2*q - 1"
            raise ValueError(f"unknown Ψ {name!r}; valid: {valid}") from None
        raise ValueError(f"invalid Ψ expression: {err}") from None


def check_psi(name: str, label_eps: float = 0.01) -> None:
    """Raise ValueError saying why if `name` is neither a registered Ψ nor a usable expression in q."""
    resolve_psi(name, label_eps)


def sequence_logps(logps_sum: Tensor, lengths: Tensor, aggregation: str) -> Tensor:
    """Per-sequence log-prob from summed token log-probs, (B,) -> (B,).

    "sum" is the paper's log π(y|x) (h in eq. 9 and 28 is defined on whole sequences). "mean" divides by
    the response length (clamped to ≥ 1 so an empty response gives 0, not NaN): a deviation from the
    paper that TRL's IPO makes so τ does not scale with length.
    """
    if aggregation == "sum":
        return logps_sum
    if aggregation == "mean":
        return logps_sum / lengths.clamp(min=1)
    raise ValueError(f"unknown aggregation {aggregation!r}; valid: mean, sum")


def margin(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor) -> Tensor:
    """Log-ratio margin h_π(y_w, y_l) = log[π(y_w) π_ref(y_l) / (π(y_l) π_ref(y_w))], as in eq. 9 and 28.

    All four inputs are aggregated per-sequence log-probs (B,); returns (B,).
    """
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_loss(h: Tensor, tau: float | Tensor, p_hat: Tensor | None = None) -> Tensor:
    """DPO, eq. 9: −log σ(τh), per pair, (B,) -> (B,).

    With soft labels p̂ (probability that the chosen response is preferred) this is the cross-entropy
    −p̂ log σ(τh) − (1 − p̂) log σ(−τh), whose optimum h = logit(p̂)/τ is the Bradley–Terry one;
    p̂ = None means p̂ = 1, i.e. eq. 9. (The soft form is an extension, not in the paper; p̂ = 1 − ε is
    conservative DPO / label smoothing.) F.logsigmoid keeps it finite for large |τh|.
    """
    logits = tau * h
    if p_hat is None:
        return -F.logsigmoid(logits)
    return -p_hat * F.logsigmoid(logits) - (1 - p_hat) * F.logsigmoid(-logits)


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, p_hat: Tensor | None = None) -> Tensor:
    """Reward-model loss, eq. 4–5: −log σ(r(y_w) − r(y_l)), per pair, (B,), (B,) -> (B,).

    Bradley–Terry says p*(y ≻ y') = σ(r(y) − r(y')) (eq. 4); fitting r by maximum likelihood on the pairs is
    eq. 5. With soft labels it is the cross-entropy against p̂ — the same function as DPO's with h = r_w − r_l
    and τ = 1, so it is written once.
    """
    return dpo_loss(r_chosen - r_rejected, 1.0, p_hat)


def ipo_loss(h: Tensor, tau: float | Tensor) -> Tensor:
    """IPO, sampled form (eq. 28, Algorithm 1): (h − 1/(2τ))², per pair, (B,) -> (B,)."""
    return (h - 1 / (2 * tau)) ** 2


def psipo_target(p_hat: Tensor, tau: float | Tensor, psi: str = "identity", label_eps: float = 0.01) -> Tensor:
    """Target margin (Ψ(p̂) − Ψ(1 − p̂)) / (2τ) for one pair with preference probability p̂, (B,) -> (B,).

    From the root-finding form of the ΨPO optimum (eq. 20–22) with μ taken as ½/½ over the pair's two
    responses. Identity Ψ: (p̂ − ½)/τ, so hard labels give IPO's 1/(2τ). Logit Ψ: logit(p̂)/τ, infinite
    at p̂ ∈ {0, 1}; hard labels are handled by first clipping p̂ into [label_eps, 1 − label_eps], so
    p̂ = 1 gives logit(1 − ε)/τ (a deviation: the paper leaves this Ψ undefined on hard labels).
    Ψs that are finite on [0, 1] (identity) are not clipped. `psi` may also be an expression in q
    (psi_expr, e.g. "2*q - 1"); it is clipped like the logit when it is infinite at 0 or 1.
    """
    if not 0 <= label_eps < 0.5:
        raise ValueError(f"label_eps must be in [0, 0.5), got {label_eps}")
    spec = resolve_psi(psi, label_eps)
    if spec.needs_clip:
        p_hat = p_hat.clamp(label_eps, 1 - label_eps)
    return (spec.fn(p_hat) - spec.fn(1 - p_hat)) / (2 * tau)


def psipo_loss(h: Tensor, tau: float | Tensor, p_hat: Tensor, psi: str = "identity", label_eps: float = 0.01) -> Tensor:
    """ΨPO regression (h − psipo_target(p̂))², per pair, (B,) -> (B,); generalises eq. 28 to soft labels.

    Identity Ψ with p̂ = 1 is exactly IPO. A non-linear Ψ needs real probability estimates: averaging
    hard labels is unbiased only for the identity (Proposition 3).
    """
    return (h - psipo_target(p_hat, tau, psi, label_eps)) ** 2


@dataclass(frozen=True)
class Objective:
    """One registry entry. Both functions take (h, tau, p_hat | None, psi, label_eps).

    `uses_p_hat` is False where the loss ignores soft labels (IPO): a caller holding soft labels must
    then present each pair as w ≻ l with probability p̂ and l ≻ w otherwise, which is unbiased for the
    identity Ψ (Proposition 3).
    """

    loss: Callable[[Tensor, float | Tensor, Tensor | None, str, float], Tensor]
    target: Callable[[Tensor, float | Tensor, Tensor | None, str, float], Tensor | None]
    uses_p_hat: bool


def _hard_if_none(h: Tensor, p_hat: Tensor | None) -> Tensor:
    return torch.ones_like(h) if p_hat is None else p_hat


OBJECTIVES: dict[str, Objective] = {
    # DPO's Ψ is implicitly the logit; `psi` is ignored. With soft labels its optimum is logit(p̂)/τ; for
    # p̂ ∈ {0, 1} the optimum is infinite and the reported target is the clipped logit(1 − ε)/τ, a yardstick.
    "dpo": Objective(
        loss=lambda h, tau, p, psi, eps: dpo_loss(h, tau, p),
        target=lambda h, tau, p, psi, eps: None if p is None else psipo_target(p, tau, "logit", eps),
        uses_p_hat=True,
    ),
    # IPO is hard-label by definition (eq. 28): p_hat and psi are ignored.
    "ipo": Objective(
        loss=lambda h, tau, p, psi, eps: ipo_loss(h, tau),
        # zeros_like + : broadcast to the losses' shape, as the other targets are
        target=lambda h, tau, p, psi, eps: torch.zeros_like(h) + 1 / (2 * tau),
        uses_p_hat=False,
    ),
    "psipo": Objective(
        loss=lambda h, tau, p, psi, eps: psipo_loss(h, tau, _hard_if_none(h, p), psi, eps),
        target=lambda h, tau, p, psi, eps: psipo_target(_hard_if_none(h, p), tau, psi, eps),
        uses_p_hat=True,
    ),
}


def pair_losses(
    objective: str,
    h: Tensor,
    tau: float | Tensor,
    p_hat: Tensor | None = None,
    psi: str = "identity",
    label_eps: float = 0.01,
) -> tuple[Tensor, Tensor | None]:
    """Per-pair losses (B,) and the margin each pair is pushed towards (B,), or None (DPO without labels).

    `objective` is a key of OBJECTIVES; p_hat = None means hard labels. For "dpo" the target is
    logit(clip(p̂))/τ (None without p_hat); for "ipo" it is 1/(2τ); for "psipo" psipo_target.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    check_psi(psi, label_eps)
    entry = OBJECTIVES[objective]
    return entry.loss(h, tau, p_hat, psi, label_eps), entry.target(h, tau, p_hat, psi, label_eps)
