"""Safe Ψ expressions: `objective.psi` as arithmetic in the variable q, compiled to torch ops without eval.

The text is parsed with `ast.parse(mode="eval")` and compiled by walking a whitelist of node types into
closures over torch functions; nothing else is ever executed (no `eval`, `exec` or `compile`). Grammar:

    expr  := number | q | expr (+ - * / **) expr | -expr | +expr | (expr) | f(expr)
    f     := log | exp | sqrt | tanh | sigmoid | log1p | expm1

A compiled Ψ is then checked on a grid of [0, 1]: finite (where it is infinite at 0 or 1 only, p̂ is clipped
into [ε, 1 − ε] as for the logit Ψ, and the grid with it), non-decreasing, and not constant, since
Ψ(p̂) − Ψ(1 − p̂) ≡ 0 would give every pair the target margin 0.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

MAX_LENGTH = 200  # characters; also keeps ast.parse far from Python's nesting limits
VARIABLE = "q"
FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "log": torch.log,
    "exp": torch.exp,
    "sqrt": torch.sqrt,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "log1p": torch.log1p,
    "expm1": torch.expm1,
}
_BINARY: dict[type[ast.operator], Callable[[Tensor, Tensor], Tensor]] = {
    ast.Add: torch.add,
    ast.Sub: torch.sub,
    ast.Mult: torch.mul,
    ast.Div: torch.div,
    ast.Pow: torch.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Tensor], Tensor]] = {ast.USub: torch.neg, ast.UAdd: lambda x: x}
GRID_POINTS = 1001
# Rounding slack for the monotonicity and constancy checks, relative to Ψ's range on the grid.
_REL_TOL = 1e-9

Psi = Callable[[Tensor], Tensor]


class PsiExpressionError(ValueError):
    """An `objective.psi` expression that is not allowed or not a usable Ψ; the message says why."""


@dataclass(frozen=True)
class CompiledPsi:
    """A checked Ψ: the torch function, whether p̂ must be clipped before it, and whether Ψ(q) − Ψ(1 − q) is
    linear in q (then averaging hard labels is unbiased, Proposition 3, and soft labels are optional)."""

    text: str
    fn: Psi
    needs_clip: bool
    linear: bool


_NODE_NAMES = {
    ast.Attribute: "attribute access ('.')",
    ast.Subscript: "subscripts ('[]')",
    ast.Lambda: "lambda",
    ast.IfExp: "conditional expressions (if/else)",
    ast.ListComp: "comprehensions",
    ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions",
    ast.GeneratorExp: "comprehensions",
    ast.Compare: "comparisons",
    ast.BoolOp: "and/or",
    ast.JoinedStr: "strings",
    ast.List: "lists",
    ast.Tuple: "tuples",
    ast.Set: "sets",
    ast.Dict: "dicts",
    ast.NamedExpr: "assignments (:=)",
}


def _not_allowed(node: ast.AST) -> PsiExpressionError:
    what = _NODE_NAMES.get(type(node), f"{type(node).__name__} nodes")
    return PsiExpressionError(f"{what} not allowed; use numbers, q, + - * / ** and {', '.join(FUNCTIONS)}")


def _constant(value: object) -> Psi:
    # bool is an int subclass; complex, str, bytes, None and Ellipsis are refused too.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PsiExpressionError(f"constant {value!r} is not allowed; only numbers")
    try:
        number = float(value)
    except OverflowError:
        raise PsiExpressionError("a number is too large") from None
    if number != number or abs(number) == float("inf"):
        raise PsiExpressionError(f"constant {value!r} is not finite")
    return lambda q: torch.full_like(q, number)


def _call(node: ast.Call) -> Psi:
    if not isinstance(node.func, ast.Name):
        raise PsiExpressionError(f"only calls of {', '.join(FUNCTIONS)} are allowed")
    name = node.func.id
    if name not in FUNCTIONS:
        raise PsiExpressionError(f"function '{name}' is not allowed; use one of {', '.join(FUNCTIONS)}")
    if node.keywords:
        raise PsiExpressionError(f"'{name}' takes no keyword arguments")
    if len(node.args) != 1 or isinstance(node.args[0], ast.Starred):
        raise PsiExpressionError(f"'{name}' takes exactly one argument")
    func, arg = FUNCTIONS[name], _compile(node.args[0])
    return lambda q: func(arg(q))


def _compile(node: ast.AST) -> Psi:
    """The torch closure for one whitelisted node; anything else raises PsiExpressionError."""
    if isinstance(node, ast.Constant):
        return _constant(node.value)
    if isinstance(node, ast.Name):
        if node.id != VARIABLE:
            raise PsiExpressionError(f"name '{node.id}' is not allowed; the variable is {VARIABLE}")
        return lambda q: q
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        op, left, right = _BINARY[type(node.op)], _compile(node.left), _compile(node.right)
        return lambda q: op(left(q), right(q))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        unary, operand = _UNARY[type(node.op)], _compile(node.operand)
        return lambda q: unary(operand(q))
    if isinstance(node, ast.Call):
        return _call(node)
    if isinstance(node, (ast.BinOp, ast.UnaryOp)):
        symbol = type(node.op).__name__
        raise PsiExpressionError(f"operator {symbol} is not allowed; use + - * / **")
    raise _not_allowed(node)


def parse(text: str) -> Psi:
    """The torch function of `text`, checked against the grammar only (see `compile_psi` for the Ψ checks)."""
    if len(text) > MAX_LENGTH:
        raise PsiExpressionError(f"expression is {len(text)} characters; at most {MAX_LENGTH}")
    if not text.strip():
        raise PsiExpressionError("expression is empty")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        raise PsiExpressionError(f"not a valid expression ({err.msg})") from None
    except (ValueError, RecursionError, MemoryError):  # null bytes; nesting the parser cannot hold
        raise PsiExpressionError("not a valid expression") from None
    return _compile(tree.body)


def _grid(lo: float, hi: float) -> Tensor:
    return torch.linspace(0.0, 1.0, GRID_POINTS, dtype=torch.float64).clamp(lo, hi)


def _evaluate(fn: Psi, q: Tensor) -> Tensor:
    try:
        with torch.no_grad():
            return fn(q)
    except (RuntimeError, ArithmeticError) as err:
        raise PsiExpressionError(f"cannot be evaluated ({str(err).splitlines()[0]})") from None


def _check_finite(fn: Psi, q: Tensor) -> None:
    """Finite in float64 and in float32 (the dtype the targets are computed in)."""
    for dtype in (torch.float64, torch.float32):
        values = _evaluate(fn, q.to(dtype))
        bad = ~torch.isfinite(values)
        if bad.any():
            at = float(q[bad.nonzero()[0, 0]])
            raise PsiExpressionError(f"Ψ must be finite on [0, 1]: Ψ({at:.3g}) = {float(values[bad][0])}")


def _check_shape(fn: Psi, q: Tensor) -> bool:
    """Fail unless Ψ is non-decreasing and not constant on the grid; return whether Ψ(q) − Ψ(1 − q) is linear."""
    values = _evaluate(fn, q)
    span = float(values.abs().max()) or 1.0
    steps = values.diff()
    falls = steps < -_REL_TOL * span
    if falls.any():
        raise PsiExpressionError(f"Ψ must be non-decreasing on [0, 1]: decreases at q={float(q[1:][falls][0]):.3g}")
    signal = values - _evaluate(fn, 1 - q)  # what psipo_target regresses the margin to, times 2τ
    if float(signal.abs().max()) <= _REL_TOL * span:
        raise PsiExpressionError(
            "Ψ is constant: Ψ(p̂) − Ψ(1 − p̂) is 0 (up to rounding) for every p̂, which gives no training signal"
        )
    slope = signal[-1] / (2 * q[-1] - 1)
    return bool(torch.allclose(signal, slope * (2 * q - 1), rtol=1e-6, atol=_REL_TOL * span))


def compile_psi(text: str, label_eps: float) -> CompiledPsi:
    """Parse and check `text`; p̂ is clipped into [label_eps, 1 − label_eps] where Ψ is infinite at 0 or 1."""
    fn = parse(text)
    ends = _evaluate(fn, torch.tensor([0.0, 1.0], dtype=torch.float64))
    needs_clip = not bool(torch.isfinite(ends).all())
    q = _grid(label_eps, 1 - label_eps) if needs_clip else _grid(0.0, 1.0)
    _check_finite(fn, q)
    linear = _check_shape(fn, q)
    return CompiledPsi(text, fn, needs_clip, linear)
