"""Compiling and evaluating CEL expressions against a run-time activation (SPEC 3.1, 3.4).

celpy's interpreter is used, not its transpiler: the transpiler keeps per-evaluation state in
module globals, which is unsafe with many step threads evaluating at once. Each evaluation
builds a fresh ``Activation`` and ``Evaluator`` around a cached, read-only parse tree.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import celpy
import lark
from celpy import celtypes
from celpy.evaluation import Activation, CELEvalError, Evaluator, NameContainer

from mantle.expressions.functions import CALL_OVERRIDES, FUNCTIONS, type_name
from mantle.expressions.messages import error_message, key_text, reword_call_error
from mantle.expressions.syntax import ParseFailure, parse, variable_usage
from mantle.expressions.values import (
    MAX_VALUE_SIZE,
    ExpressionError,
    from_cel,
    size_error,
    to_cel,
)

__all__ = [
    "ActivationCache",
    "MAX_EVALUATION_SECONDS",
    "Program",
    "compile_expression",
    "evaluate",
    "evaluate_condition",
    "run_program",
]

# The names an expression can read (SPEC 3.1); anything else is an undeclared reference.
_VARIABLES = frozenset({"inputs", "steps", "env", "trigger", "execution", "hooks"})
_PROGRAM_CACHE_SIZE = 4096
# One evaluation may run this long. Expressions are short (MAX_EXPRESSION_LENGTH) but macros
# over large inputs nest: [..].map(x, [..].map(y, ...)) over 10,000-item lists is 10^8 steps,
# on a thread that other executions share.
MAX_EVALUATION_SECONDS = 1.0
_YIELD_EVERY = 0.002
_yield_due = [0.0]  # shared by all evaluations: a yield roughly every 2 ms of evaluating
# The GIL switch interval while a long evaluation runs (see _LongEvaluations).
CONTENDED_SWITCH_INTERVAL = 0.0005

celpy.Environment()  # sets the recursion limit celpy's recursive evaluator needs (2500)
# celpy logs activations at DEBUG and operand values at ERROR; step outputs would flood (and
# leak into) the logs, and every failure reaches the caller as an ExpressionError anyway.
logging.getLogger("celpy").setLevel(logging.CRITICAL)


@dataclass(frozen=True, slots=True)
class Program:
    """A parsed expression plus which parts of the activation it can read."""

    source: str
    tree: lark.Tree
    usage: dict[str, frozenset[str] | None] = field(hash=False, compare=False)


@functools.lru_cache(maxsize=_PROGRAM_CACHE_SIZE)
def compile_expression(expr: str) -> Program:
    """Rewrite hyphenated references, parse and cache; raise ExpressionError if invalid."""
    try:
        tree = parse(expr)
    except ParseFailure as failure:
        raise ExpressionError(f"invalid CEL expression: {failure}") from None
    usage = {name: names for name, names in variable_usage(expr).items() if name in _VARIABLES}
    return Program(expr, tree, usage)


class ActivationCache:
    """CEL forms of the parts of one activation that expressions have read so far.

    Converting step outputs is the costly part of an evaluation, so only the variables (and,
    for ``steps``/``hooks``, only the entries) a program names are converted, each once per
    cache. A cache belongs to one activation dict and must not outlive changes to it.
    """

    def __init__(self, activation: dict[str, Any]):
        self._activation = activation
        self._whole: dict[str, Any] = {}
        self._entries: dict[tuple[str, str], Any] = {}

    def variables(self, program: Program) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for root, names in program.usage.items():
            if root not in self._activation:
                continue
            if names is None or root in self._whole:
                result[root] = self._root(root)
            else:
                result[root] = self._partial(root, names)
        return result

    def _root(self, root: str) -> Any:
        if root not in self._whole:
            self._whole[root] = to_cel(self._activation[root])
        return self._whole[root]

    def _partial(self, root: str, names: frozenset[str]) -> Any:
        source = self._activation[root]
        if not isinstance(source, dict):
            return self._root(root)
        partial = celtypes.MapType()
        for name in names:
            if name in source:
                key = (root, name)
                if key not in self._entries:
                    self._entries[key] = to_cel(source[name])
                partial[celtypes.StringType(name)] = self._entries[key]
        return partial


class _LongEvaluations:
    """Shortens the GIL switch interval while an evaluation runs longer than ``_YIELD_EVERY``.

    The daemon keeps CPython's 5 ms interval: its threads hand work to each other and give up
    the GIL by themselves, and a shorter interval only forces switches (mantle.daemon). A long
    evaluation is the exception, CPU-bound work on up to eight threads at once: a thread on a
    cancel's path would wait up to an interval at each of its hand-offs, behind each busy
    thread in turn. So from an evaluation's first yield until the last such evaluation ends,
    the interval is ``CONTENDED_SWITCH_INTERVAL``. SPEC 4.6 aims at 100 ms for a cancel; with
    this, eight slow conditions delay one by less (tests/actors/test_engine_limits.py).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._before = 0.0

    def begin(self) -> None:
        with self._lock:
            if self._running == 0:
                self._before = sys.getswitchinterval()
                sys.setswitchinterval(min(self._before, CONTENDED_SWITCH_INTERVAL))
            self._running += 1

    def end(self) -> None:
        with self._lock:
            self._running -= 1
            if self._running == 0:
                sys.setswitchinterval(self._before)


_long_evaluations = _LongEvaluations()
_SIZED = (str, bytes, list)
# All the strings, bytes and lists the operators and functions of one evaluation may return,
# in characters, bytes or items (memory for eight evaluations at once stays in the gigabytes).
MAX_BUILT_SIZE = 2 * MAX_VALUE_SIZE


class _Evaluator(Evaluator):
    """celpy's interpreter with ``default()`` and messages fit for users.

    celpy's own messages for undeclared names embed ``repr`` of the whole activation, which is
    both slow and a leak of every input and step output into an error string.
    """

    def __init__(self, ast: lark.Tree, activation: Activation, deadline: float,
                 long: list[bool] | None = None, built: list[int] | None = None):
        super().__init__(ast, activation)
        self._deadline = deadline
        self.long = long if long is not None else [False]  # shared with sub-evaluators
        self.built = built if built is not None else [0]  # so is this (see _bounded)

    def sub_evaluator(self, ast: lark.Tree) -> Evaluator:
        return _Evaluator(ast, self.activation, self._deadline, self.long, self.built)

    def _bounded(self, result: Any) -> Any:
        """``result`` of an operator or function, unless it, or all that this evaluation has
        built so far, is over its limit. Copying is fast enough that the time limit alone
        let ``a + a`` double into gigabytes, and a macro make a hundred copies of a large
        input; a function that can multiply its input (replace, flatten) checks before."""
        if isinstance(result, _SIZED):
            size = len(result)
            self.built[0] += size
            if size > MAX_VALUE_SIZE:
                return CELEvalError(size_error())
            if self.built[0] > MAX_BUILT_SIZE:
                return CELEvalError(f"one evaluation built more than {MAX_BUILT_SIZE} "
                                    "characters or items in all")
        return result

    def visit(self, tree: lark.Tree) -> Any:
        # A Python exception, not a CELEvalError: CEL absorbs errors (true || error is true),
        # and running out of time must end the evaluation, not become a value.
        now = time.monotonic()
        if now > self._deadline:
            raise _OutOfTime()
        if now > _yield_due[0]:
            # A long evaluation lets waiting threads have the interpreter lock now and then
            # (a cancel's hand-offs), instead of only at CPython's switch interval, when
            # another evaluation thread may take it just as well.
            _yield_due[0] = now + _YIELD_EVERY
            if not self.long[0]:
                self.long[0] = True
                _long_evaluations.begin()
            time.sleep(0)
        return super().visit(tree)

    def addition(self, tree: lark.Tree) -> Any:
        # Visited for every operand of every expression: one child (no "+" or "-") passes the
        # operand through at once, as celpy does but without its call tracing wrapper (an
        # override through super() cost a third of a template-heavy step's preparation).
        if len(tree.children) == 1:
            return self.visit_children(tree)[0]
        return self._bounded(super().addition(tree))

    def primary(self, tree: lark.Tree) -> Any:
        child = tree.children[0]
        if child.data == "ident_arg" and child.children[0].value == "default":
            return self._default(child)
        if child.data == "ident":
            name = child.children[0].value
            try:
                return self.ident_value(name)
            except KeyError:
                return CELEvalError(f"undeclared reference to {name!r}", tree=tree)
        return super().primary(tree)

    def _default(self, call: lark.Tree) -> Any:
        """``default(v, fallback)``: v unless it is null or fails to evaluate."""
        arguments = call.children[1].children if len(call.children) == 2 else []
        if len(arguments) != 2:
            return CELEvalError(f"default: expects 2 arguments, got {len(arguments)}")
        value = self.visit(arguments[0])
        if value is None or isinstance(value, CELEvalError):
            return self.visit(arguments[1])
        return value

    def function_eval(self, name_token: lark.Token, exprlist: Iterable[Any] | None = None) -> Any:
        name = name_token.value
        if name not in self.activation.functions:
            return CELEvalError(f"undeclared function {name!r}", token=name_token)
        arguments = list(exprlist or [])
        if name in CALL_OVERRIDES:
            for argument in arguments:
                if isinstance(argument, CELEvalError):
                    return argument
            return self._bounded(CALL_OVERRIDES[name](*arguments))
        result = super().function_eval(name_token, arguments)
        return self._bounded(reword_call_error(result, name, arguments))

    def method_eval(
        self, object: Any, method_ident: lark.Token, exprlist: Iterable[Any] | None = None
    ) -> Any:
        name = method_ident.value
        if name not in self.activation.functions:
            return CELEvalError(f"undeclared method {name!r}", token=method_ident)
        arguments = list(exprlist or []) if not isinstance(exprlist, CELEvalError) else exprlist
        result = super().method_eval(object, method_ident, arguments)
        called = [object, *arguments] if isinstance(arguments, list) else []
        return self._bounded(reword_call_error(result, name, called))

    def member_dot(self, tree: lark.Tree) -> Any:
        """``e.f``: visits ``e`` once and words the failure itself (celpy's embeds reprs)."""
        member_tree, name_token = tree.children
        member = self.visit(member_tree)
        name = name_token.value
        if isinstance(member, CELEvalError):
            return member
        if isinstance(member, celtypes.MapType):
            try:
                return member[name]
            except KeyError:
                return CELEvalError(f"no such key: {name!r}", tree=tree)
        if isinstance(member, NameContainer) and name in member:
            return member[name].value
        return CELEvalError(f"cannot select {name!r} from a {type_name(member)} value", tree=tree)

    def member_index(self, tree: lark.Tree) -> Any:
        result = super().member_index(tree)
        if not isinstance(result, CELEvalError) or result.__cause__ is None:
            return result
        cause = result.__cause__
        if isinstance(cause, KeyError):
            return CELEvalError(f"no such key: {key_text(cause.args[0])}", tree=tree)
        if isinstance(cause, IndexError):
            return CELEvalError("index out of range", tree=tree)
        return CELEvalError(f"cannot index: {cause}", tree=tree)


class _OutOfTime(Exception):
    """An evaluation passed MAX_EVALUATION_SECONDS."""


def run_program(program: Program, variables: dict[str, Any]) -> Any:
    """Evaluate a compiled program with CEL-typed variables; return the CEL result."""
    activation = Activation(vars=variables, functions=FUNCTIONS)
    evaluator = _Evaluator(program.tree, activation, time.monotonic() + MAX_EVALUATION_SECONDS)
    try:
        result = evaluator.evaluate()
    except _OutOfTime:
        raise ExpressionError(
            f"evaluation took longer than {MAX_EVALUATION_SECONDS:g}s") from None
    except CELEvalError as error:
        raise ExpressionError(error_message(error)) from None
    except RecursionError:
        raise ExpressionError("expression is nested too deeply") from None
    except ExpressionError:
        raise
    except Exception as error:  # celpy lets Python errors escape for some odd operand types
        raise ExpressionError(f"{type(error).__name__}: {error}") from None
    finally:
        if evaluator.long[0]:
            _long_evaluations.end()
    return result


def _evaluate_cel(expr: str, activation: dict[str, Any], cache: ActivationCache | None) -> Any:
    program = compile_expression(expr)
    try:
        variables = (cache or ActivationCache(activation)).variables(program)
    except RecursionError:
        raise ExpressionError("a variable's value is nested too deeply") from None
    except OverflowError:  # a JSON integer beyond a double (an HTTP response's, say)
        raise ExpressionError("a variable's value holds a number beyond a double") from None
    return run_program(program, variables)


def evaluate(
    expr: str,
    activation: dict[str, Any],
    cache: ActivationCache | None = None,
    budget: list[int] | None = None,
) -> Any:
    """Evaluate ``expr`` and return a plain JSON-able value; raise ExpressionError.

    ``cache`` lets several expressions over the same activation share converted values;
    ``budget`` lets several results share one size limit (``from_cel``).
    """
    result = _evaluate_cel(expr, activation, cache)
    try:
        return from_cel(result, budget)
    except RecursionError:
        raise ExpressionError("result is nested too deeply") from None


def evaluate_condition(
    expr: str, activation: dict[str, Any], cache: ActivationCache | None = None
) -> bool:
    """Evaluate an ``if`` expression, which must yield a boolean (SPEC 3)."""
    result = _evaluate_cel(expr, activation, cache)
    if not isinstance(result, celtypes.BoolType | bool):
        raise ExpressionError(f"condition must evaluate to a boolean, got {type_name(result)}")
    return bool(result)
