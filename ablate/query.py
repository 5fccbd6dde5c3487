"""``ablate table -q``: a row filter that can read the table's columns and nothing else.

pandas' own ``DataFrame.query`` resolves ``@name`` to the caller's Python objects and calls
their methods, so a query could run a shell command. Here the expression is parsed with
Python's grammar and only these nodes are evaluated, over the table's columns:

    column names              model, patch_size, `train.lr` (backticks), train.lr
    literals                  'adaln-zero', 4, 1e-4, True, False, None, ['a', 'b'], ('a', 'b')
    comparisons               ==  !=  <  <=  >  >=  (chained: 1 < gflops < 5)
    membership                block in ['adaln', 'adaln-zero'],  seed not in [0]
    logic                     and  or  not  (and their element-wise spellings & | ~)
    arithmetic                +  -  *  /  //  %  **, unary - and +

Anything else (a function call, an attribute that is not a dotted column name, ``@name``,
indexing, a lambda) is refused with a ``QueryError`` before anything is evaluated.
"""
from __future__ import annotations

import ast
import operator
import re

import pandas as pd

from .registry import did_you_mean

_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}
_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_LOGIC = {ast.BitAnd: operator.and_, ast.BitOr: operator.or_}
_BACKTICKED = re.compile(r"`([^`]*)`")
MAX_LENGTH = 2000  # a table filter, not a program; also keeps the parser's recursion shallow


class QueryError(ValueError):
    """A query that is not allowed or cannot be evaluated: the message is one line."""


def filter_rows(df: pd.DataFrame, query: str) -> pd.DataFrame:
    """The rows of ``df`` for which ``query`` is true. Raises QueryError."""
    return df[_Evaluator(df, query).condition()]


class _Evaluator:
    def __init__(self, df: pd.DataFrame, query: str):
        self.df = df
        self.columns = [str(c) for c in df.columns]
        if len(query) > MAX_LENGTH:
            raise QueryError(f"longer than {MAX_LENGTH} characters")
        # `any column name` becomes a placeholder identifier that Python's grammar accepts.
        self.quoted: dict[str, str] = {}

        def placeholder(m: re.Match) -> str:
            name = f"_ablate_column_{len(self.quoted)}"
            self.quoted[name] = m.group(1)
            return name

        text = _BACKTICKED.sub(placeholder, query)
        try:
            self.tree = ast.parse(text.strip(), mode="eval")
        except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
            if "@" in text:  # pandas' @name: a Python variable of the caller
                raise QueryError("'@' names a Python variable; a query may only name columns") from None
            raise QueryError(f"not a valid expression: {getattr(e, 'msg', None) or e}") from None

    def condition(self) -> pd.Series:
        try:
            value = self.eval(self.tree.body)
        except QueryError:
            raise
        except RecursionError:
            raise QueryError("nested too deeply") from None
        except Exception as e:  # noqa: BLE001  -- a type mismatch such as block > 3
            raise QueryError(f"cannot evaluate: {type(e).__name__}: {' '.join(str(e).split())}") from None
        if not (isinstance(value, pd.Series) and pd.api.types.is_bool_dtype(value)):
            raise QueryError("not a condition on the columns (true or false for each row), "
                             "e.g. \"block == 'adaln-zero' and patch_size == 2\"")
        return value

    # ----- nodes ----------------------------------------------------------------------
    def eval(self, node: ast.AST):
        if isinstance(node, ast.BoolOp):
            values = [self.truth(v) for v in node.values]
            out = values[0]
            for v in values[1:]:
                out = (out & v) if isinstance(node.op, ast.And) else (out | v)
            return out
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, (ast.Not, ast.Invert)):
                value = self.truth(node.operand)
                return (not value) if isinstance(value, bool) else ~value
            if isinstance(node.op, ast.USub):
                return -self.eval(node.operand)
            if isinstance(node.op, ast.UAdd):
                return +self.eval(node.operand)
        if isinstance(node, ast.BinOp):
            if type(node.op) in _LOGIC:
                return _LOGIC[type(node.op)](self.truth(node.left), self.truth(node.right))
            if type(node.op) in _ARITH:
                return _ARITH[type(node.op)](self.eval(node.left), self.eval(node.right))
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool, type(None))):
            return node.value
        if isinstance(node, (ast.Name, ast.Attribute)):
            return self.df[self.column(node)]
        raise QueryError(f"{self.describe(node)} is not allowed; a query may contain column names, literals, "
                         "comparisons, in, and/or/not and arithmetic")

    def compare(self, node: ast.Compare):
        out, left = None, node.left
        for op, right in zip(node.ops, node.comparators):
            if isinstance(op, (ast.In, ast.NotIn)):
                result = self.member(left, right)
                result = ~result if isinstance(op, ast.NotIn) else result
            elif type(op) in _COMPARE:
                result = _COMPARE[type(op)](self.eval(left), self.eval(right))
            else:  # is, is not
                raise QueryError("'is' is not allowed; compare with == or !=")
            out = result if out is None else out & result
            left = right
        return out

    def member(self, left: ast.AST, right: ast.AST) -> pd.Series:
        if not isinstance(right, (ast.List, ast.Tuple, ast.Set)):
            raise QueryError("'in' takes a list of literals, e.g. block in ['adaln', 'adaln-zero']")
        values = [self.eval(v) for v in right.elts]
        if any(isinstance(v, pd.Series) for v in values):
            raise QueryError("'in' takes a list of literals, not columns")
        series = self.eval(left)
        if not isinstance(series, pd.Series):
            raise QueryError("the left side of 'in' must be a column")
        return series.isin(values)

    def truth(self, node: ast.AST):
        value = self.eval(node)
        if isinstance(value, pd.Series) and not pd.api.types.is_bool_dtype(value):
            raise QueryError(f"{self.describe(node)} is not a condition; compare it, e.g. {self.describe(node)} == ...")
        if not isinstance(value, (pd.Series, bool)):
            raise QueryError(f"{value!r} is not a condition")
        return value

    def column(self, node: ast.AST) -> str:
        """A name, `quoted name` or dotted name (train.lr) that is a column of the table."""
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            raise QueryError(f"{self.describe(node)} is not allowed; a query may only name columns")
        parts.append(self.quoted.get(node.id, node.id))
        name = ".".join(reversed(parts))
        if name not in self.columns:
            raise QueryError(f"no column {name!r}{did_you_mean(name, self.columns)}")
        return name

    def describe(self, node: ast.AST) -> str:
        kinds = {ast.Call: "a function call", ast.Subscript: "indexing", ast.Lambda: "a lambda",
                 ast.Attribute: "an attribute", ast.Starred: "*", ast.Dict: "a mapping",
                 ast.NamedExpr: "':='", ast.IfExp: "'if ... else'", ast.JoinedStr: "an f-string"}
        for kind, text in kinds.items():
            if isinstance(node, kind):
                return text
        try:
            return repr(ast.unparse(node))
        except Exception:  # noqa: BLE001
            return type(node).__name__
