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
indexing, a lambda) is refused with a ``QueryError`` before anything is evaluated. A backtick
inside a backticked name is written twice (`a``b` is the column a`b).

The work is bounded, so a short query cannot run for hours or fill the memory: integers stay
within MAX_INT_BITS (``9 ** 9 ** 9`` is refused before it is computed), text within MAX_TEXT
characters (``'a' * 10**10`` and ``model * 40000000`` are refused), and text is never
``%``-formatted.
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
_BACKTICKED = re.compile(r"`((?:[^`]|``)*)`")
_PLACEHOLDER = re.compile(r"_ablate_column_([0-9]+)")
MAX_LENGTH = 2000  # a table filter, not a program; also keeps the parser's recursion shallow
MAX_INT_BITS = 10_000  # about 3,000 digits: more than any number in a table
MAX_TEXT = 10_000  # characters of a text a query makes


class QueryError(ValueError):
    """A query that is not allowed or cannot be evaluated: the message is one line."""


def filter_rows(df: pd.DataFrame, query: str) -> pd.DataFrame:
    """The rows of ``df`` for which ``query`` is true. Raises QueryError."""
    return df[_Evaluator(df, query).condition()]


def _bits(x) -> int:
    """The size in bits of the Python integers in ``x`` (numpy's are fixed-size: 0)."""
    if isinstance(x, bool):
        return 1
    if isinstance(x, int):
        return x.bit_length()
    if isinstance(x, pd.Series) and x.dtype == object:
        return max((v.bit_length() for v in x if isinstance(v, int) and not isinstance(v, bool)), default=0)
    return 0


def _text_length(x) -> int:
    """The length of the longest text in ``x`` (0 where it holds none)."""
    if isinstance(x, str):
        return len(x)
    if isinstance(x, pd.Series) and not pd.api.types.is_numeric_dtype(x) and not pd.api.types.is_bool_dtype(x):
        return max((len(v) for v in x if isinstance(v, str)), default=0)
    return 0


def _count(x) -> int:
    """The largest integer in ``x``: how many times a text would be repeated by it."""
    if isinstance(x, (bool, int)):
        return int(x)
    if isinstance(x, pd.Series) and (pd.api.types.is_integer_dtype(x) or x.dtype == object):
        values = [v for v in x if isinstance(v, (int,)) or pd.api.types.is_integer(v)]
        return int(max(values, default=0))
    return 0


def _bounded(op: type, a, b) -> None:
    """Refuse an operation whose result would exceed MAX_INT_BITS or MAX_TEXT, before it runs."""
    if op is ast.Mod and _text_length(a):
        raise QueryError("'%' on text formats it, which a query may not do")
    if op is ast.Mult:
        for text, n in ((a, b), (b, a)):
            if _text_length(text) and _text_length(text) * max(_count(n), 0) > MAX_TEXT:
                raise QueryError(f"text repeated {_count(n):,} times would be {_text_length(text) * _count(n):,} "
                                 f"characters; a query makes at most {MAX_TEXT:,}")
        if _bits(a) + _bits(b) > MAX_INT_BITS:
            raise QueryError(f"a product of about {_bits(a) + _bits(b):,} bits; a query's numbers have at most "
                             f"{MAX_INT_BITS:,}")
    if op is ast.Add and _text_length(a) + _text_length(b) > MAX_TEXT:
        raise QueryError(f"text of more than {MAX_TEXT:,} characters; a query makes at most {MAX_TEXT:,}")
    if op is ast.Pow and (_bits(a) - 1) * max(_count(b), 0) > MAX_INT_BITS:  # 2 ** n has n + 1 bits
        raise QueryError(f"a power of about {(_bits(a) - 1) * _count(b):,} bits; a query's numbers have at most "
                         f"{MAX_INT_BITS:,}")


class _Evaluator:
    def __init__(self, df: pd.DataFrame, query: str):
        self.df = df
        self.columns = [str(c) for c in df.columns]
        if len(query) > MAX_LENGTH:
            raise QueryError(f"longer than {MAX_LENGTH} characters")
        # `any column name` becomes a placeholder identifier that Python's grammar accepts.
        self.quoted: dict[str, str] = {}

        def placeholder(m: re.Match) -> str:
            if not m.group(1):
                raise QueryError("`` is an empty column name; a backtick inside a backticked name is written "
                                 "twice (`a``b` is the column a`b)")
            name = f"_ablate_column_{len(self.quoted)}"
            self.quoted[name] = m.group(1).replace("``", "`")
            return f" {name} "  # a token of its own, never glued to the text around it

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
        except OverflowError:
            raise QueryError("a number beyond what a float holds (about 1.8e308)") from None
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
                left, right = self.eval(node.left), self.eval(node.right)
                _bounded(type(node.op), left, right)
                return _ARITH[type(node.op)](left, right)
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
            text = ast.unparse(node)
        except Exception:  # noqa: BLE001
            return type(node).__name__
        return repr(_PLACEHOLDER.sub(lambda m: "`" + self.quoted.get(m.group(0), "").replace("`", "``") + "`", text))
