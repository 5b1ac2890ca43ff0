"""CEL expressions and ``{{ }}`` templates (SPEC section 3).

Validation uses the text functions (``find_templates``, ``step_references``, ``syntax_error``);
execution uses ``evaluate_condition`` for ``if`` and ``resolve_params`` for params. Both read
expressions through ``rewrite_hyphens`` so ``steps.fetch-data`` means ``steps["fetch-data"]``.
"""

from mantle.expressions.evaluation import (
    MAX_EVALUATION_SECONDS,
    ActivationCache,
    compile_expression,
    evaluate,
    evaluate_condition,
)
from mantle.expressions.syntax import (
    MAX_EXPRESSION_LENGTH,
    MAX_TEMPLATE_LENGTH,
    find_templates,
    rewrite_hyphens,
    step_references,
    syntax_error,
)
from mantle.expressions.templates import resolve_params, resolve_string
from mantle.expressions.values import ExpressionError

__all__ = [
    "MAX_EVALUATION_SECONDS",
    "MAX_EXPRESSION_LENGTH",
    "MAX_TEMPLATE_LENGTH",
    "ActivationCache",
    "ExpressionError",
    "compile_expression",
    "evaluate",
    "evaluate_condition",
    "find_templates",
    "resolve_params",
    "resolve_string",
    "rewrite_hyphens",
    "step_references",
    "syntax_error",
]
