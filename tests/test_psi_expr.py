"""Ψ as an expression in q: equal to the registered Ψs where it should be, hostile text refused cleanly, and a
ΨPO run that trains with one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from psipo_cli.errors import UserError
from psipo_cli.objectives import pair_losses, psipo_target, resolve_psi
from psipo_cli.psi_expr import PsiExpressionError, compile_psi, parse
from psipo_cli.recipe.loader import load_recipe
from tests.conftest import TINY_DATA, assert_clean_error

P_HAT = torch.tensor([0.0, 0.01, 0.2, 0.5, 0.7, 0.93, 1.0])


@pytest.mark.parametrize(
    ("expression", "registered"),
    [("q", "identity"), ("log(q) - log(1 - q)", "logit"), ("-log(1/q - 1)", "logit")],
)
def test_expression_equal_to_a_registered_psi_gives_the_same_targets(expression: str, registered: str) -> None:
    for tau in (0.1, 1.0):
        assert_close(psipo_target(P_HAT, tau, expression), psipo_target(P_HAT, tau, registered))


def test_expressions_infinite_at_the_ends_are_clipped_like_logit_and_finite_ones_are_not() -> None:
    assert resolve_psi("log(q) - log(1 - q)").needs_clip and not resolve_psi("q**3").needs_clip
    # Clipped at label_eps = 0.1: p̂ = 1 gives logit(0.9) / (2τ) · 2 = logit(0.9) at τ = ½.
    target = psipo_target(torch.tensor([1.0]), 0.5, "log(q) - log(1 - q)", label_eps=0.1)
    assert_close(target, torch.logit(torch.tensor([0.9])) * 2)
    assert_close(psipo_target(torch.tensor([1.0, 0.5]), 0.5, "q**3"), torch.tensor([1.0, 0.0]))


def test_hand_worked_targets_of_expressions() -> None:
    # 2q − 1: (2p̂ − 1 − (1 − 2p̂)) / (2τ) = (4p̂ − 2) / (2τ); p̂ = 0.75, τ = 0.5 gives 1.
    assert_close(psipo_target(torch.tensor([0.75]), 0.5, "2*q - 1"), torch.tensor([1.0]))
    # tanh(4(q − ½)) at p̂ = 1: tanh(2) − tanh(−2) = 2 tanh(2).
    expected = torch.tensor([2 * torch.tanh(torch.tensor(2.0)).item()])
    assert_close(psipo_target(torch.tensor([1.0]), 0.5, "tanh(4*(q - 0.5))"), expected)
    losses, target = pair_losses("psipo", torch.zeros(1), 0.5, torch.tensor([0.75]), psi="2*q - 1")
    assert_close(target, torch.tensor([1.0]))
    assert_close(losses, torch.tensor([1.0]))


def test_every_whitelisted_function_compiles() -> None:
    for text in ("log(q + 1)", "exp(q)", "sqrt(q)", "tanh(q)", "sigmoid(q)", "log1p(q)", "expm1(q)", "+q ** 2 / 3"):
        assert compile_psi(text, 0.01).fn(torch.tensor([0.5])).isfinite().all(), text


def test_linear_psis_need_no_soft_labels_but_nonlinear_ones_do(write_recipe) -> None:
    assert resolve_psi("2*q - 1").linear and resolve_psi("identity").linear
    assert not resolve_psi("q**3").linear and not resolve_psi("logit").linear
    assert load_recipe(write_recipe(), ["objective.loss=psipo", "objective.psi=2*q - 1"]).objective.psi == "2*q - 1"
    with pytest.raises(UserError, match="needs probability estimates"):
        load_recipe(write_recipe(), ["objective.loss=psipo", "objective.psi=q**3"])


HOSTILE = [
    ("import", "__import__('os').system('x')", "only calls of log"),
    ("attribute", "q.__class__", "attribute access"),
    ("bases", "().__class__.__bases__", "attribute access"),
    ("comprehension", "[q for q in ()]", "comprehensions"),
    ("lambda", "lambda: 1", "lambda"),
    ("open", "open('f')", "function 'open' is not allowed"),
    ("os-name", "os", "unknown Ψ 'os'"),
    ("os-in-expression", "q + os", "name 'os' is not allowed"),
    ("subscript", "q[0]", "subscripts"),
    ("keyword", "log(q, base=2)", "no keyword arguments"),
    ("two-args", "log(q, 2)", "exactly one argument"),
    ("string", "q + 'a'", "only numbers"),
    ("bool", "q + True", "only numbers"),
    ("complex", "q + 1j", "only numbers"),
    ("huge-power", "q * 10**400", "finite"),  # two small constants: evaluated by torch as inf, never by Python
    ("inf-literal", "q * 1e400", "constant inf is not finite"),
    ("overflow", "exp(1000*q)", "finite"),
    ("decreasing", "1 - q", "non-decreasing on [0, 1]: decreases at q=0.001"),
    ("constant", "0*q", "constant"),
    ("long", "q" + " + q" * 2500, "at most 200"),
    ("ifexp", "q if q else 1", "conditional"),
    ("compare", "q < 1", "comparisons"),
    ("walrus", "(x := q)", "assignments (:=)"),
    ("tuple", "(q, q)", "tuples"),
    ("modulo", "q % 2", "operator Mod"),
    ("syntax", "q +", "not a valid expression"),
    ("empty", "   ", "empty"),
    ("nan", "sqrt(q - 0.5)", "finite"),
    ("null-byte", "q\x00", "not a valid expression"),
]


@pytest.mark.parametrize(("text", "fragment"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_or_useless_expressions_are_a_clean_error_naming_objective_psi(write_recipe, text, fragment) -> None:
    with pytest.raises(UserError) as err:
        load_recipe(write_recipe(objective={"loss": "psipo", "psi": text}))
    message = str(err.value)
    assert message.startswith("objective.psi: ") and fragment in message, message
    assert "\n" not in message and len(message) < 400, message


def test_the_grammar_walker_never_evaluates_python() -> None:
    # If the text were evaluated, this would raise ZeroDivisionError or run the call; instead it is refused.
    with pytest.raises(PsiExpressionError, match="only calls of"):
        parse("(1/0).__class__('x')")
    with pytest.raises(PsiExpressionError, match="function 'print'"):
        parse("print(q)")


def test_label_eps_is_the_clipping_used_by_the_check(write_recipe) -> None:
    # −exp(½/q) is infinite at 0, so p̂ is clipped: at ε = 0.01 it is −e^50, at ε = 0.001 −e^500, beyond float32.
    psi = {"loss": "psipo", "psi": "-exp(0.5/q)"}
    assert load_recipe(write_recipe(objective=psi, data={"columns": {"label": "p_chosen"}})).objective.psi
    with pytest.raises(UserError, match=r"^objective\.psi: .*finite.*label_eps=0.001"):
        load_recipe(write_recipe(objective={**psi, "label_eps": 0.001}, data={"columns": {"label": "p_chosen"}}))


def test_a_bad_psi_expression_on_the_command_line_is_one_clean_line(write_recipe, cli) -> None:
    result = cli("finetune", write_recipe(), "objective.loss=psipo", "objective.psi=__import__('os').system('x')")
    assert_clean_error(result, "objective.psi")


def test_psipo_trains_two_steps_with_an_expression_psi(tmp_path: Path, write_recipe, cli) -> None:
    recipe = write_recipe(data={"train": str(TINY_DATA / "train.jsonl"), "columns": {"label": "p_chosen"}})
    overrides = ["objective.loss=psipo", "objective.psi=2*q-1", "training.max_steps=2"]
    result = cli("finetune", recipe, *overrides)
    assert result.code == 0, result.err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["objective"]["psi"] == "2*q-1"
    assert summary["final_train"]["target"] != 0
