"""Hand-worked values for psipo_cli.objectives (Azar et al. 2023, arXiv 2310.12036v2).

Numbers are chosen so the sigmoids are exact fractions: σ(log 3) = 3/4 and σ(−log 3) = 1/4.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from psipo_cli import objectives
from psipo_cli.objectives import (
    DEFAULT_AGGREGATION,
    OBJECTIVES,
    dpo_loss,
    ipo_loss,
    margin,
    pair_losses,
    psipo_loss,
    psipo_target,
    sequence_logps,
)

LOG3 = math.log(3)


def test_margin_is_policy_log_ratio_minus_reference_log_ratio():
    """h = (π_c − ref_c) − (π_r − ref_r): (−1 − −2) − (−3 − −1) = 1 + 2 = 3; equal ratios give 0."""
    h = margin(
        torch.tensor([-1.0, -2.0]),
        torch.tensor([-3.0, -5.0]),
        torch.tensor([-2.0, -1.0]),
        torch.tensor([-1.0, -4.0]),
    )
    assert_close(h, torch.tensor([3.0, 0.0]))


def test_dpo_loss_hand_worked_values():
    """−log σ(τh) with τ = 0.5.

    h = 0:        −log σ(0)        = log 2
    h = 2 log 3:  −log σ(log 3)    = −log(3/4) = log(4/3)
    h = −2 log 3: −log σ(−log 3)   = −log(1/4) = log 4
    """
    h = torch.tensor([0.0, 2 * LOG3, -2 * LOG3])
    assert_close(dpo_loss(h, 0.5), torch.tensor([math.log(2), math.log(4 / 3), math.log(4)]))


def test_dpo_soft_label_loss_hand_worked_values():
    """−p̂ log σ(τh) − (1 − p̂) log σ(−τh), τ = 0.5.

    p̂ = 0.5,  h = 0:        −log σ(0)                      = log 2
    p̂ = 0.75, h = 2 log 3:  −¾ log ¾ − ¼ log ¼              = 0.5623351 (the entropy: at its optimum)
    p̂ = 0.25, h = 2 log 3:  −¼ log ¾ − ¾ log ¼ = ¼·0.2876821 + ¾·1.3862944 = 1.1116413
    """
    h = torch.tensor([0.0, 2 * LOG3, 2 * LOG3])
    p_hat = torch.tensor([0.5, 0.75, 0.25])
    expected = torch.tensor(
        [
            math.log(2),
            -0.75 * math.log(0.75) - 0.25 * math.log(0.25),
            -0.25 * math.log(0.75) - 0.75 * math.log(0.25),
        ]
    )
    assert_close(dpo_loss(h, 0.5, p_hat), expected)
    assert_close(expected[1:], torch.tensor([0.5623351, 1.1116413]))


def test_dpo_soft_label_with_p_hat_one_equals_plain_dpo():
    h = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 5
    assert_close(dpo_loss(h, 0.3, torch.ones(64)), dpo_loss(h, 0.3))


def test_dpo_soft_label_optimum_is_bradley_terry_logit_over_tau():
    """d/dh = τ(σ(τh) − p̂), zero at h = logit(p̂)/τ: p̂ = 0.8, τ = 0.5 → h = 2 log 4."""
    h = torch.tensor([2 * math.log(4)], requires_grad=True)
    dpo_loss(h, 0.5, torch.tensor([0.8])).sum().backward()
    assert_close(h.grad, torch.zeros(1), atol=1e-6, rtol=0)


def test_dpo_gradient_always_pushes_margin_up_with_hard_labels():
    """d/dh −log σ(τh) = −τσ(−τh) < 0 for every h: DPO never stops increasing h (§4.2).

    float64 so σ(−τh) does not underflow to 0 at τh = 200.
    """
    for tau in (0.1, 1.0, 10.0):
        h = torch.linspace(-20, 20, 81, dtype=torch.float64, requires_grad=True)
        dpo_loss(h, tau).sum().backward()
        assert (h.grad < 0).all(), tau


def test_ipo_loss_hand_worked_values():
    """(h − 1/(2τ))²: τ = 0.5 (target 1): h = 1 → 0, h = 0 → 1; τ = 0.25 (target 2): h = −1 → 9."""
    h = torch.tensor([1.0, 0.0, -1.0])
    tau = torch.tensor([0.5, 0.5, 0.25])
    assert_close(ipo_loss(h, tau), torch.tensor([0.0, 1.0, 9.0]))


def test_ipo_loss_is_zero_at_target_margin():
    for tau in (0.1, 0.5, 1.0, 4.0):
        assert ipo_loss(torch.tensor([1 / (2 * tau)]), tau).item() == 0.0


def test_ipo_gradient_is_zero_at_target_margin_and_points_to_it_elsewhere():
    """d/dh = 2(h − 1/(2τ)): τ = 0.5 → 0 at h = 1, −2 at h = 0, +2 at h = 2."""
    h = torch.tensor([1.0, 0.0, 2.0], requires_grad=True)
    ipo_loss(h, 0.5).sum().backward()
    assert_close(h.grad, torch.tensor([0.0, -2.0, 2.0]))


def test_psipo_target_identity_hand_worked_values():
    """(p̂ − (1 − p̂))/(2τ): p̂ = 0.5 → 0; p̂ = 1, τ = 0.5 → 1 (IPO's 1/(2τ)); p̂ = 0.8, τ = 0.1 → 0.6/0.2 = 3."""
    p_hat = torch.tensor([0.5, 1.0, 0.8])
    tau = torch.tensor([0.7, 0.5, 0.1])
    assert_close(psipo_target(p_hat, tau, "identity"), torch.tensor([0.0, 1.0, 3.0]))


def test_psipo_target_logit_is_bradley_terry_logit_over_tau():
    """(logit p̂ − logit(1 − p̂))/(2τ) = logit(p̂)/τ: 0.5 → 0; 0.8, τ = 1 → log 4; 0.2, τ = 0.5 → −2 log 4."""
    p_hat = torch.tensor([0.5, 0.8, 0.2])
    tau = torch.tensor([0.3, 1.0, 0.5])
    assert_close(psipo_target(p_hat, tau, "logit"), torch.tensor([0.0, math.log(4), -2 * math.log(4)]))


def test_psipo_logit_hard_labels_are_clipped_to_a_finite_target():
    """p̂ = 1 → logit(1 − ε)/τ = log(99) at ε = 0.01, τ = 1; p̂ = 0 → −log(99); ε = 0.1 → log 9."""
    target = psipo_target(torch.tensor([1.0, 0.0]), 1.0, "logit", label_eps=0.01)
    assert torch.isfinite(target).all()
    assert_close(target, torch.tensor([math.log(99), -math.log(99)]))
    assert_close(psipo_target(torch.tensor([1.0]), 2.0, "logit", 0.1), torch.tensor([math.log(9) / 2]))


def test_psipo_identity_target_is_not_clipped():
    assert_close(psipo_target(torch.tensor([1.0]), 0.5, "identity", label_eps=0.1), torch.tensor([1.0]))


def test_psipo_loss_hand_worked_values():
    """(h − target)²: identity p̂ = 0.8, τ = 0.1, h = 1 → (1 − 3)² = 4;
    logit p̂ = 0.8, τ = 1, h = 0 → (log 4)² = 1.9218121; identity p̂ = 0.5, h = 0.5 → 0.25."""
    h = torch.tensor([1.0, 0.0, 0.5])
    p_hat = torch.tensor([0.8, 0.8, 0.5])
    tau = torch.tensor([0.1, 1.0, 1.0])
    identity = psipo_loss(h, tau, p_hat, "identity")
    logit = psipo_loss(h, tau, p_hat, "logit")
    assert_close(torch.stack([identity[0], logit[1], identity[2]]), torch.tensor([4.0, 1.9218121, 0.25]))


def test_psipo_identity_with_hard_labels_equals_ipo_exactly():
    """Identity Ψ, p̂ = 1 is IPO (eq. 28): pins that the registry wires "psipo" through the same target."""
    h = torch.randn(128, generator=torch.Generator().manual_seed(1)) * 3
    tau = torch.tensor([[0.1], [0.5], [2.0]])  # (3, 1) broadcast against (128,): (3, 128)
    ipo, ipo_target = pair_losses("ipo", h, tau)
    psipo, psipo_target_ = pair_losses("psipo", h, tau, None, "identity")
    assert_close(psipo, ipo, rtol=0, atol=0)
    assert_close(psipo_target_, ipo_target, rtol=0, atol=0)
    assert_close(pair_losses("psipo", h, tau, torch.ones(128))[0], ipo, rtol=0, atol=0)


def test_pair_losses_targets():
    """dpo: None without labels, else logit(p̂)/τ; ipo: 1/(2τ) in h's shape, labels ignored; psipo: Ψ's."""
    h = torch.zeros(3)
    p_hat = torch.tensor([0.5, 0.8, 1.0])
    assert pair_losses("dpo", h, 0.5)[1] is None
    assert_close(pair_losses("dpo", h, 1.0, p_hat)[1], torch.tensor([0.0, math.log(4), math.log(99)]))
    assert_close(pair_losses("ipo", h, 0.25, p_hat)[1], torch.full((3,), 2.0))
    assert_close(pair_losses("psipo", h, 0.5, p_hat)[1], torch.tensor([0.0, 0.6, 1.0]))
    assert_close(pair_losses("psipo", h, 0.5)[1], torch.ones(3))
    assert_close(pair_losses("dpo", h, 0.5, p_hat)[0], dpo_loss(h, 0.5, p_hat))


def test_pair_losses_keep_per_pair_shape_with_broadcast_tau():
    h = torch.zeros(2, 4, 9)  # (T, S, B) as in the bandit
    tau = torch.tensor([0.5, 1.0]).view(-1, 1, 1)  # (T, 1, 1)
    for name in OBJECTIVES:
        losses, target = pair_losses(name, h, tau, torch.full((2, 4, 9), 0.7))
        assert losses.shape == (2, 4, 9), name
        assert target.shape == (2, 4, 9), name


def test_sequence_logps_sum_and_mean():
    """sum returns the input; mean divides by length, an empty response (length 0) divides by 1."""
    logps_sum = torch.tensor([-6.0, -3.0, 0.0])
    lengths = torch.tensor([3, 1, 0])
    assert_close(sequence_logps(logps_sum, lengths, "sum"), logps_sum)
    assert_close(sequence_logps(logps_sum, lengths, "mean"), torch.tensor([-2.0, -3.0, 0.0]))


def test_unknown_names_raise_value_error_listing_valid_ones():
    h = torch.zeros(2)
    with pytest.raises(ValueError, match="dpo, ipo, psipo"):
        pair_losses("kto", h, 1.0)
    with pytest.raises(ValueError, match="identity, logit"):
        pair_losses("psipo", h, 1.0, psi="tanh")
    with pytest.raises(ValueError, match="identity, logit"):
        psipo_target(torch.ones(2), 1.0, psi="tanh")
    with pytest.raises(ValueError, match="mean, sum"):
        sequence_logps(h, torch.ones(2), "max")
    with pytest.raises(ValueError, match="label_eps"):
        psipo_target(torch.ones(2), 1.0, "logit", label_eps=0.5)


def test_registries_cover_the_three_objectives():
    assert set(OBJECTIVES) == {"dpo", "ipo", "psipo"} == set(DEFAULT_AGGREGATION)
    assert set(objectives.PSI) >= {"identity", "logit"}
    assert DEFAULT_AGGREGATION == {"dpo": "sum", "ipo": "mean", "psipo": "mean"}


def test_bradley_terry_loss_hand_worked_values() -> None:
    """eq. 5: −log σ(r_w − r_l). Δr = 0 → log 2; Δr = log 3 → −log(3/4) = log(4/3); Δr = −log 3 → log 4.
    Soft p̂ = ½ at Δr = log 3: ½·log(4/3) + ½·log 4."""
    from psipo_cli.objectives import bradley_terry_loss

    r_chosen = torch.tensor([0.0, math.log(3.0), 0.0])
    r_rejected = torch.tensor([0.0, 0.0, math.log(3.0)])
    expected = torch.tensor([math.log(2.0), math.log(4 / 3), math.log(4.0)])
    torch.testing.assert_close(bradley_terry_loss(r_chosen, r_rejected), expected)
    soft = bradley_terry_loss(r_chosen[1:2], r_rejected[1:2], torch.tensor([0.5]))
    torch.testing.assert_close(soft, torch.tensor([0.5 * math.log(4 / 3) + 0.5 * math.log(4.0)]))
