"""Golem's LDAP-style filter language for offer and demand constraints.

A constraint is a filter over a flat mapping of dotted property names
(``golem.inf.mem.gib``, ``golem.runtime.name`` ...) to values.  This module
parses filter text into an immutable AST, prints it back canonically,
evaluates it against a property mapping and explains why it did not match.

Grammar
-------
::

    filter   := "(" "&" filter* ")"          -- and; (&) is true
              | "(" "|" filter* ")"          -- or;  (|) is false
              | "(" "!" filter ")"           -- not
              | "(" name op value ")"        -- leaf
    name     := [A-Za-z0-9._-]+
    op       := "=" | "<" | "<=" | ">" | ">="

Whitespace (space, tab, CR, LF, FF, VT) may appear between filters, after an
opening parenthesis, around the operator and around a value.

Literal types
-------------
The text of a value decides its Python type:

===========================  =====================  ============================
text                         meaning                Python value
===========================  =====================  ============================
``*`` (alone, with ``=``)    presence test          :class:`Present` node
``-?[0-9]+``                 integer                ``int``
``-?[0-9]+\\.[0-9]+``         decimal                ``decimal.Decimal`` (never
                                                    ``float``)
``true`` / ``false``         boolean (lower case)   ``bool``; only with ``=``
``"..."``                    quoted string          ``str``; ``\\`` escapes the
                                                    next character
``[e1, e2, ...]``            list                   ``tuple`` of the scalar
                                                    types above; no nesting;
                                                    only with ``=``
anything else                bare string            ``str``
bare text with ``*``         wildcard               :class:`Glob` node; only
                                                    with ``=``
===========================  =====================  ============================

In bare values a backslash makes the next character literal, so ``\\(``,
``\\)``, ``\\*`` and ``\\\\`` give ``(``, ``)``, ``*`` and ``\\``.  Any escaped
or quoted value is a string, so ``"4"`` and ``"true"`` are strings.  Unescaped
whitespace around a bare value is dropped.  An unescaped ``(`` inside a value
is an error.  A value starting with ``"``, ``[`` or one of ``=<>!~`` must be
quoted (or its first character escaped) because those characters start a
quoted string, a list, or are read as part of the operator.  Inside lists
``,``, ``[`` and ``]`` must also be escaped in bare elements.

Limits: at most :data:`MAX_TEXT_LENGTH` characters, :data:`MAX_DEPTH` nested
parentheses, 4000 digits in an integer and 2000 digits on either side of a
decimal point.  Anything beyond them is a :class:`ConstraintSyntaxError`.

:func:`str` on any node prints canonical text: bare strings where that parses
back to the same string, otherwise a double-quoted string, so that
``parse(str(f)) == f`` holds for every AST.

Evaluation
----------
* A property that is absent from the mapping, or whose value is ``None``, is
  missing; every leaf on a missing property is false, so ``(!(x=1))`` is true.
* ``int``, ``Decimal`` and ``float`` property values compare numerically with
  number literals (a ``float`` is read through its ``repr`` so ``0.1`` equals
  the literal ``0.1``; NaN never matches).  ``bool`` is not a number.
* Strings compare exactly with ``=`` and lexicographically with ``<`` etc.
* A comparison between different kinds (number vs. string, bool vs. number)
  is false, never an error.
* A wildcard only matches string values; ``*`` matches any run of characters.
* If the property value is a list or tuple and the literal is not a list, the
  leaf is true when any element satisfies it.  A list literal equals a list
  property with the same elements in any order (counting duplicates).

Two filters are equal when they print the same up to the spelling of numbers:
``(a=1)`` equals ``(a=1.0)``, but ``(a=1)`` differs from ``(a=true)`` and
``(a="1")``.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeAlias, Union

from golem_dask.errors import ConstraintSyntaxError

__all__ = [
    "MAX_DEPTH",
    "MAX_TEXT_LENGTH",
    "OPERATORS",
    "And",
    "Compare",
    "Filter",
    "Glob",
    "Not",
    "Or",
    "Present",
    "Scalar",
    "Value",
    "all_of",
    "eq",
    "evaluate",
    "explain",
    "ge",
    "le",
    "parse",
    "predicate",
    "present",
]

#: Deepest parenthesis nesting :func:`parse` accepts.
MAX_DEPTH = 64
#: Longest text :func:`parse` accepts, in characters.
MAX_TEXT_LENGTH = 64 * 1024
#: Comparison operators of leaf filters.
OPERATORS = ("=", "<", "<=", ">", ">=")

Scalar: TypeAlias = Union[bool, int, Decimal, str]
Value: TypeAlias = Union[Scalar, tuple[Scalar, ...]]

_WS = frozenset(" \t\n\r\f\v")
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
# Read greedily as one operator token, so that typos such as "=<" or "!=" are
# reported as unknown operators instead of silently becoming string values.
_OP_CHARS = frozenset("=<>!~")
_INT_RE = re.compile(r"-?[0-9]+")
_DEC_RE = re.compile(r"-?[0-9]+\.[0-9]+")
_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
# int() refuses longer strings by default (sys.int_max_str_digits = 4300).
_MAX_INT_DIGITS = 4000
_INT_LIMIT = 10**_MAX_INT_DIGITS
# Bounds on each side of the decimal point keep every Decimal printable in a
# form that parses back within these same limits.
_MAX_DECIMAL_DIGITS = 2000
_OPERATOR_FUNCS: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


# --------------------------------------------------------------------------- AST


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"invalid property name {name!r}: use letters, digits, '.', '-', '_'")


def _check_children(node: object, children: object) -> tuple[Filter, ...]:
    if isinstance(children, (str, bytes)) or not isinstance(children, Iterable):
        raise TypeError(f"{type(node).__name__} children must be an iterable of filters")
    result = tuple(children)
    for child in result:
        if not isinstance(child, _NODE_TYPES):
            raise TypeError(f"not a filter: {child!r}")
    return result


@dataclass(frozen=True, slots=True)
class And:
    """True when every child is true; ``(&)`` is true.

    Examples
    --------
    >>> str(And((Compare("a", "=", 1), Present("b"))))
    '(&(a=1)(b=*))'
    """

    children: tuple[Filter, ...]

    def __post_init__(self) -> None:
        # Accepting lists is convenient; storing tuples keeps nodes hashable.
        object.__setattr__(self, "children", _check_children(self, self.children))

    def __str__(self) -> str:
        return "(&" + "".join(str(c) for c in self.children) + ")"


@dataclass(frozen=True, slots=True)
class Or:
    """True when some child is true; ``(|)`` is false."""

    children: tuple[Filter, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "children", _check_children(self, self.children))

    def __str__(self) -> str:
        return "(|" + "".join(str(c) for c in self.children) + ")"


@dataclass(frozen=True, slots=True)
class Not:
    """True when ``child`` is false."""

    child: Filter

    def __post_init__(self) -> None:
        if not isinstance(self.child, _NODE_TYPES):
            raise TypeError(f"not a filter: {self.child!r}")

    def __str__(self) -> str:
        return f"(!{self.child})"


@dataclass(frozen=True, slots=True)
class Present:
    """``(name=*)``: true when the property is present and not ``None``."""

    name: str

    def __post_init__(self) -> None:
        _check_name(self.name)

    def __str__(self) -> str:
        return f"({self.name}=*)"


@dataclass(frozen=True, slots=True)
class Glob:
    """``(name=a*b)``: the string property matches a wildcard pattern.

    Parameters
    ----------
    name:
        Property name.
    parts:
        The literal pieces between the wildcards, so ``a*b*`` is
        ``("a", "b", "")``.  At least two; ``("", "")`` is :class:`Present`.
    """

    name: str
    parts: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_name(self.name)
        if isinstance(self.parts, str) or not isinstance(self.parts, Iterable):
            raise TypeError("Glob parts must be an iterable of strings")
        parts = tuple(self.parts)
        if len(parts) < 2 or not all(isinstance(p, str) for p in parts):
            raise ValueError("a Glob needs at least two string parts (one wildcard)")
        if parts == ("", ""):
            raise ValueError("the pattern '*' alone is a presence test: use Present")
        object.__setattr__(self, "parts", parts)

    @property
    def pattern(self) -> str:
        """The pattern as written in filter text, with escapes."""
        return _format_glob(self.parts)

    def matches(self, text: str) -> bool:
        """Whether ``text`` matches the pattern."""
        return _glob_match(self.parts, text)

    def __str__(self) -> str:
        return f"({self.name}={self.pattern})"


@dataclass(frozen=True, slots=True, eq=False)
class Compare:
    """``(name op value)``: compare a property with a literal.

    Parameters
    ----------
    name:
        Property name.
    op:
        One of ``=``, ``<``, ``<=``, ``>``, ``>=``.
    value:
        ``bool``, ``int``, finite ``Decimal``, ``str``, or a tuple of those (a
        list literal).  Booleans and tuples only go with ``=``.  Use
        :func:`eq` and friends to build nodes from looser Python values.
    """

    name: str
    op: str
    value: Value

    def __post_init__(self) -> None:
        _check_name(self.name)
        if self.op not in OPERATORS:
            raise ValueError(f"unknown operator {self.op!r}")
        if isinstance(self.value, tuple):
            if self.op != "=":
                raise ValueError("list values are only allowed with '='")
            for item in self.value:
                _check_scalar(item)
        else:
            _check_scalar(self.value)
            if isinstance(self.value, bool) and self.op != "=":
                raise ValueError("booleans can only be compared with '='")

    # The dataclass __eq__ would make (a=true) equal (a=1) because True == 1.
    def _key(self) -> tuple[object, ...]:
        return (self.name, self.op, _value_key(self.value))

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not Compare:
            return NotImplemented
        assert isinstance(other, Compare)
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        return f"({self.name}{self.op}{_format_value(self.value)})"


Filter: TypeAlias = Union[And, Or, Not, Compare, Present, Glob]
_NODE_TYPES = (And, Or, Not, Compare, Present, Glob)
_LEAF_TYPES = (Compare, Present, Glob)


def _check_scalar(value: object) -> None:
    if isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if abs(value) >= _INT_LIMIT:
            raise ValueError(f"integer literal has more than {_MAX_INT_DIGITS} digits")
        return
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"decimal literal must be finite, not {value}")
        exponent = value.as_tuple().exponent
        assert isinstance(exponent, int)
        if value.adjusted() >= _MAX_DECIMAL_DIGITS or exponent < -_MAX_DECIMAL_DIGITS:
            raise ValueError(
                f"decimal literal needs more than {_MAX_DECIMAL_DIGITS} digits"
                " before or after the point"
            )
        return
    raise TypeError(
        f"unsupported literal {value!r}: use bool, int, Decimal, str or a tuple of those"
    )


def _value_key(value: object) -> object:
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, Decimal)):
        return ("num", value)
    if isinstance(value, tuple):
        return ("list", tuple(_value_key(v) for v in value))
    return ("str", value)


# ---------------------------------------------------------------- formatting


def _looks_typed(text: str) -> bool:
    return bool(text in ("true", "false") or _INT_RE.fullmatch(text) or _DEC_RE.fullmatch(text))


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _format_str(text: str, in_list: bool) -> str:
    if (
        not text
        or text[0] in '"[' or text[0] in _OP_CHARS or text[0] in _WS
        or text[-1] in _WS
        or _looks_typed(text)
    ):
        return _quote(text)
    specials = "()*\\,[]" if in_list else "()*\\"
    return "".join("\\" + c if c in specials else c for c in text)


def _format_scalar(value: Scalar, in_list: bool = False) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal):
        # Fixed-point keeps exponents like 1E+2 out of the text (the grammar has
        # none) and the ".0" keeps a whole decimal a Decimal when parsed back.
        text = format(value, "f")
        return text if "." in text else text + ".0"
    return _format_str(value, in_list)


def _format_value(value: Value) -> str:
    if isinstance(value, tuple):
        return "[" + ",".join(_format_scalar(v, in_list=True) for v in value) + "]"
    return _format_scalar(value)


def _format_glob(parts: tuple[str, ...]) -> str:
    pieces = ["".join("\\" + c if c in "()*\\" else c for c in p) for p in parts]
    first, last = parts[0], parts[-1]
    # Leading/trailing characters that the parser would strip or read as a
    # quote, list or operator are escaped instead.
    if first and (first[0] in '"[' or first[0] in _OP_CHARS or first[0] in _WS) and pieces[0][0] != "\\":
        pieces[0] = "\\" + pieces[0]
    if last and last[-1] in _WS:
        pieces[-1] = pieces[-1][:-1] + "\\" + pieces[-1][-1]
    return "*".join(pieces)


def _describe(value: object) -> str:
    if isinstance(value, (bool, int, Decimal, str)):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _INT_LIMIT:
            return "a very large integer"
        return _format_scalar(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_describe(v) for v in value) + "]"
    return repr(value)


# ------------------------------------------------------------------- parsing


class _Parser:
    """Recursive-descent parser over ``text``; ``pos`` is the next character."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.n = len(text)
        self.pos = 0

    def error(self, message: str, position: int | None = None) -> ConstraintSyntaxError:
        return ConstraintSyntaxError(message, self.text, self.pos if position is None else position)

    def unbalanced(self) -> ConstraintSyntaxError:
        return self.error("unbalanced parentheses: expected ')' before the end of the text", self.n)

    def peek(self) -> str | None:
        return self.text[self.pos] if self.pos < self.n else None

    def skip_ws(self) -> bool:
        start = self.pos
        while self.pos < self.n and self.text[self.pos] in _WS:
            self.pos += 1
        return self.pos != start

    def parse(self) -> Filter:
        self.skip_ws()
        if self.pos == self.n:
            raise self.error("empty constraint: expected a filter such as '(name=value)'", 0)
        if self.text[self.pos] != "(":
            raise self.error("expected '(' at the start of a filter")
        result = self.filter(1)
        self.skip_ws()
        if self.pos < self.n:
            if self.text[self.pos] == ")":
                raise self.error("unbalanced parentheses: unexpected ')'")
            raise self.error("trailing characters after filter")
        return result

    def filter(self, depth: int) -> Filter:
        if depth > MAX_DEPTH:
            raise self.error(f"filter nested too deeply (more than {MAX_DEPTH} levels)")
        self.pos += 1  # the "(" the caller saw
        self.skip_ws()
        c = self.peek()
        if c == "&" or c == "|":
            kind = c
            self.pos += 1
            children = []
            while True:
                self.skip_ws()
                c = self.peek()
                if c is None:
                    raise self.unbalanced()
                if c == ")":
                    self.pos += 1
                    break
                if c != "(":
                    raise self.error("expected '(' or ')'")
                children.append(self.filter(depth + 1))
            return And(tuple(children)) if kind == "&" else Or(tuple(children))
        if c == "!":
            self.pos += 1
            self.skip_ws()
            c = self.peek()
            if c is None:
                raise self.unbalanced()
            if c != "(":
                raise self.error("expected '(' after '!'")
            child = self.filter(depth + 1)
            self.skip_ws()
            c = self.peek()
            if c is None:
                raise self.unbalanced()
            if c != ")":
                raise self.error("expected ')': '!' takes exactly one filter")
            self.pos += 1
            return Not(child)
        return self.leaf()

    def leaf(self) -> Filter:
        start = self.pos
        while self.pos < self.n and self.text[self.pos] in _NAME_CHARS:
            self.pos += 1
        name = self.text[start:self.pos]
        c = self.peek()
        if not name:
            if c is None:
                raise self.unbalanced()
            if c in _OP_CHARS:
                raise self.error("empty property name")
            if c == ")":
                raise self.error("empty filter: expected a property name, '&', '|' or '!'")
            raise self.error(f"expected a property name, '&', '|' or '!', found {c!r}")
        spaced = self.skip_ws()
        c = self.peek()
        if c is None:
            raise self.unbalanced()
        op_start = self.pos
        while self.pos < self.n and self.text[self.pos] in _OP_CHARS:
            self.pos += 1
        op = self.text[op_start:self.pos]
        if not op:
            if spaced or c == ")":
                raise self.error("expected an operator ('=', '<', '<=', '>', '>=')")
            raise self.error(f"invalid character {c!r} in property name")
        if op not in OPERATORS:
            raise self.error(f"unknown operator {op!r}", op_start)
        return self.value(name, op)

    def value(self, name: str, op: str) -> Filter:
        self.skip_ws()
        c = self.peek()
        if c is None:
            raise self.unbalanced()
        if c == ")":
            raise self.error("expected a value")
        if c == '"':
            text = self.quoted()
            self.close("expected ')' after the quoted string")
            return Compare(name, op, text)
        if c == "[":
            if op != "=":
                raise self.error("list values are only allowed with '='")
            items = self.list_literal()
            self.close("expected ')' after the list")
            return Compare(name, op, items)
        value_start = self.pos
        tokens, stars = self.bare(stop=")", in_list=False)
        self.pos += 1  # the closing ")"
        if stars:
            if op != "=":
                raise self.error("wildcard '*' is only allowed with '='", stars[0])
            parts = _split_tokens(tokens)
            if parts == ("", ""):
                return Present(name)
            return Glob(name, parts)
        if not tokens:
            raise self.error("expected a value", self.pos - 1)
        scalar = self.typed(tokens, value_start)
        if isinstance(scalar, bool) and op != "=":
            raise self.error("booleans can only be compared with '='", value_start)
        return Compare(name, op, scalar)

    def close(self, message: str) -> None:
        self.skip_ws()
        c = self.peek()
        if c is None:
            raise self.unbalanced()
        if c != ")":
            raise self.error(message)
        self.pos += 1

    def quoted(self) -> str:
        start = self.pos
        self.pos += 1
        out: list[str] = []
        while True:
            if self.pos >= self.n:
                raise self.error("unterminated quoted string", start)
            c = self.text[self.pos]
            if c == "\\":
                if self.pos + 1 >= self.n:
                    raise self.error("unterminated quoted string", start)
                out.append(self.text[self.pos + 1])
                self.pos += 2
                continue
            self.pos += 1
            if c == '"':
                return "".join(out)
            out.append(c)

    def bare(self, stop: str, in_list: bool) -> tuple[list[tuple[str, bool]], list[int]]:
        """Scan a bare value up to (not past) an unescaped character in ``stop``.

        Returns ``(tokens, star_positions)``; a token is ``(char, escaped)`` and
        ``("*", False)`` stands for a wildcard.  Unescaped surrounding
        whitespace is already dropped.
        """
        tokens: list[tuple[str, bool]] = []
        stars: list[int] = []
        while True:
            if self.pos >= self.n:
                if in_list:
                    raise self.error("unterminated list: expected ']'", self.n)
                raise self.unbalanced()
            c = self.text[self.pos]
            if c == "\\":
                if self.pos + 1 >= self.n:
                    raise self.error("dangling '\\' at the end of the text")
                tokens.append((self.text[self.pos + 1], True))
                self.pos += 2
                continue
            if c in stop:
                break
            if c == "(":
                raise self.error("unescaped '(' in value (write '\\(')")
            if in_list:
                if c == ")":
                    raise self.error("unterminated list: expected ']'")
                if c == "[":
                    raise self.error("nested lists are not supported")
                if c == "*":
                    raise self.error("wildcards are not allowed in lists")
            if c == "*":
                stars.append(self.pos)
            tokens.append((c, False))
            self.pos += 1
        while tokens and not tokens[-1][1] and tokens[-1][0] in _WS:
            tokens.pop()
        lead = 0
        while lead < len(tokens) and not tokens[lead][1] and tokens[lead][0] in _WS:
            lead += 1
        return tokens[lead:], stars

    def typed(self, tokens: list[tuple[str, bool]], start: int) -> Scalar:
        text = "".join(c for c, _ in tokens)
        if any(escaped for _, escaped in tokens):
            return text
        if _INT_RE.fullmatch(text):
            if len(text.lstrip("-")) > _MAX_INT_DIGITS:
                raise self.error(f"integer literal longer than {_MAX_INT_DIGITS} digits", start)
            return int(text)
        if _DEC_RE.fullmatch(text):
            whole, fraction = text.lstrip("-").split(".")
            if len(whole) > _MAX_DECIMAL_DIGITS or len(fraction) > _MAX_DECIMAL_DIGITS:
                raise self.error(
                    f"decimal literal longer than {_MAX_DECIMAL_DIGITS} digits"
                    " before or after the point",
                    start,
                )
            return Decimal(text)
        if text == "true":
            return True
        if text == "false":
            return False
        return text

    def list_literal(self) -> tuple[Scalar, ...]:
        self.pos += 1  # "["
        items: list[Scalar] = []
        self.skip_ws()
        if self.peek() == "]":
            self.pos += 1
            return ()
        while True:
            self.skip_ws()
            c = self.peek()
            if c is None:
                raise self.error("unterminated list: expected ']'", self.n)
            if c == "," or c == "]":
                raise self.error("empty list element")
            if c == '"':
                items.append(self.quoted())
            else:
                start = self.pos
                tokens, _ = self.bare(stop=",]", in_list=True)
                items.append(self.typed(tokens, start))
            self.skip_ws()
            c = self.peek()
            if c is None:
                raise self.error("unterminated list: expected ']'", self.n)
            self.pos += 1
            if c == "]":
                return tuple(items)
            if c != ",":
                raise self.error("expected ',' or ']'", self.pos - 1)


def _split_tokens(tokens: list[tuple[str, bool]]) -> tuple[str, ...]:
    parts: list[str] = []
    current: list[str] = []
    for c, escaped in tokens:
        if c == "*" and not escaped:
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    parts.append("".join(current))
    return tuple(parts)


def parse(text: str) -> Filter:
    """Parse constraint text into a filter.

    Parameters
    ----------
    text:
        Filter text, e.g. ``(&(golem.inf.mem.gib>=4)(golem.runtime.name=vm))``.
        At most :data:`MAX_TEXT_LENGTH` characters and :data:`MAX_DEPTH`
        nested parentheses.

    Returns
    -------
    Filter
        The AST; ``parse(str(f)) == f``.

    Raises
    ------
    ConstraintSyntaxError
        With ``position`` at the offending character, for any malformed text.

    Examples
    --------
    >>> parse("(&(golem.inf.mem.gib>=0.5)(golem.runtime.name=vm))")
    And(children=(Compare(name='golem.inf.mem.gib', op='>=', value=Decimal('0.5')), \
Compare(name='golem.runtime.name', op='=', value='vm')))
    >>> parse('(a="4")').value
    '4'
    >>> parse("(golem.runtime.name=vm*)")
    Glob(name='golem.runtime.name', parts=('vm', ''))
    """
    if not isinstance(text, str):
        raise TypeError(f"constraint text must be str, not {type(text).__name__}")
    if len(text) > MAX_TEXT_LENGTH:
        raise ConstraintSyntaxError(
            f"constraint text longer than {MAX_TEXT_LENGTH} characters", text, MAX_TEXT_LENGTH
        )
    return _Parser(text).parse()


# ---------------------------------------------------------------- evaluation


def _glob_match(parts: tuple[str, ...], text: str) -> bool:
    # Leftmost-first matching of the middle pieces is enough for '*'-only
    # patterns and runs in linear time, unlike a backtracking regex.
    first, last = parts[0], parts[-1]
    if len(text) < len(first) + len(last) or not text.startswith(first) or not text.endswith(last):
        return False
    pos, end = len(first), len(text) - len(last)
    for piece in parts[1:-1]:
        found = text.find(piece, pos, end)
        if found < 0:
            return False
        pos = found + len(piece)
    return True


def _as_number(value: object) -> int | Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return None
        # repr gives the shortest text that round-trips, so 0.1 -> Decimal("0.1").
        return Decimal(repr(value))
    if isinstance(value, Decimal):
        return None if value.is_nan() else value
    return None


def _scalar_holds(actual: object, op: str, literal: Scalar) -> bool:
    if isinstance(literal, bool):
        return isinstance(actual, bool) and actual == literal
    if isinstance(literal, (int, Decimal)):
        number = _as_number(actual)
        return number is not None and _OPERATOR_FUNCS[op](number, literal)
    return isinstance(actual, str) and _OPERATOR_FUNCS[op](actual, literal)


def _list_equals(actual: object, literal: tuple[Scalar, ...]) -> bool:
    if not isinstance(actual, (list, tuple)) or len(actual) != len(literal):
        return False
    # Equality of scalars is an equivalence relation, so greedy pairing finds a
    # perfect matching whenever one exists.
    remaining = list(actual)
    for item in literal:
        for i, candidate in enumerate(remaining):
            if not isinstance(candidate, (list, tuple)) and _scalar_holds(candidate, "=", item):
                del remaining[i]
                break
        else:
            return False
    return True


def _leaf_holds(f: Compare | Present | Glob, actual: object) -> bool:
    if isinstance(f, Present):
        return True
    if isinstance(f, Compare) and isinstance(f.value, tuple):
        return _list_equals(actual, f.value)
    elements = actual if isinstance(actual, (list, tuple)) else (actual,)
    for element in elements:
        if isinstance(element, (list, tuple)):
            continue
        if isinstance(f, Glob):
            if isinstance(element, str) and _glob_match(f.parts, element):
                return True
        else:
            assert not isinstance(f.value, tuple)
            if _scalar_holds(element, f.op, f.value):
                return True
    return False


def evaluate(f: Filter, props: Mapping[str, object]) -> bool:
    """Evaluate a filter against a flat property mapping.

    Parameters
    ----------
    f:
        A filter from :func:`parse` or the builders.
    props:
        Dotted property name to value; a ``None`` value counts as missing.

    Returns
    -------
    bool
        Whether ``props`` satisfies ``f``.

    Examples
    --------
    >>> evaluate(parse("(&(golem.inf.mem.gib>=4)(golem.runtime.name=vm*))"),
    ...          {"golem.inf.mem.gib": 8.0, "golem.runtime.name": "vm-nvidia"})
    True
    >>> evaluate(parse("(!(golem.inf.cpu.cores=1))"), {})
    True
    >>> evaluate(parse("(golem.runtime.capabilities=vpn)"),
    ...          {"golem.runtime.capabilities": ["inet", "vpn"]})
    True
    """
    if isinstance(f, And):
        return all(evaluate(c, props) for c in f.children)
    if isinstance(f, Or):
        return any(evaluate(c, props) for c in f.children)
    if isinstance(f, Not):
        return not evaluate(f.child, props)
    if isinstance(f, _LEAF_TYPES):
        actual = props.get(f.name)
        return actual is not None and _leaf_holds(f, actual)
    raise TypeError(f"not a filter: {f!r}")


Predicate: TypeAlias = Callable[[Mapping[str, object]], bool]


def predicate(f: Filter) -> Predicate:
    """``f`` as a function of a property mapping, equal to ``evaluate(f, props)``.

    :func:`evaluate` walks the tree on every call; a predicate has looked at the tree
    once, so a filter checked against many offers (a demand on a hub, an offer's own
    constraint against every demand) costs a few closure calls per leaf.

    Examples
    --------
    >>> fits = predicate(parse("(&(golem.inf.mem.gib>=4)(golem.runtime.name=vm*))"))
    >>> fits({"golem.inf.mem.gib": 8.0, "golem.runtime.name": "vm-nvidia"}), fits({})
    (True, False)
    """
    if isinstance(f, And):
        children = tuple(predicate(c) for c in f.children)

        def every(props: Mapping[str, object]) -> bool:
            for child in children:
                if not child(props):
                    return False
            return True

        return every
    if isinstance(f, Or):
        alternatives = tuple(predicate(c) for c in f.children)

        def some(props: Mapping[str, object]) -> bool:
            for child in alternatives:
                if child(props):
                    return True
            return False

        return some
    if isinstance(f, Not):
        negated = predicate(f.child)
        return lambda props: not negated(props)
    if isinstance(f, _LEAF_TYPES):
        return _leaf_predicate(f)
    raise TypeError(f"not a filter: {f!r}")


def _leaf_predicate(f: Compare | Present | Glob) -> Predicate:
    # Fast paths for the common exact types; anything else goes through _leaf_holds, so
    # every answer is the one evaluate() gives.
    name = f.name
    if isinstance(f, Present):
        return lambda props: props.get(name) is not None
    if isinstance(f, Glob):
        parts = f.parts

        def glob(props: Mapping[str, object]) -> bool:
            actual = props.get(name)
            if type(actual) is str:
                return _glob_match(parts, actual)
            return actual is not None and _leaf_holds(f, actual)

        return glob
    literal, compare = f.value, _OPERATOR_FUNCS[f.op]
    if isinstance(literal, (int, Decimal)) and not isinstance(literal, bool):
        def number(props: Mapping[str, object]) -> bool:
            actual = props.get(name)
            kind = type(actual)
            if kind is int:
                return bool(compare(actual, literal))
            if kind is Decimal:
                assert isinstance(actual, Decimal)
                return not actual.is_nan() and bool(compare(actual, literal))
            return actual is not None and _leaf_holds(f, actual)

        return number
    if isinstance(literal, str):
        def text(props: Mapping[str, object]) -> bool:
            actual = props.get(name)
            if type(actual) is str:
                return bool(compare(actual, literal))
            return actual is not None and _leaf_holds(f, actual)

        return text

    def general(props: Mapping[str, object]) -> bool:
        actual = props.get(name)
        return actual is not None and _leaf_holds(f, actual)

    return general


def explain(f: Filter, props: Mapping[str, object]) -> list[str]:
    """Say why a filter does not match a property mapping.

    Parameters
    ----------
    f:
        The filter.
    props:
        The property mapping, as for :func:`evaluate`.

    Returns
    -------
    list of str
        ``[]`` when ``evaluate(f, props)`` is true.  Otherwise one line per
        failing leaf of a top-level ``&``, naming the clause and the actual
        value; a ``|`` gives one line listing why each alternative failed; a
        ``!`` names the negated clause that matched.

    Examples
    --------
    >>> explain(parse("(&(golem.inf.mem.gib>=64)(golem.runtime.name=docker))"),
    ...         {"golem.inf.mem.gib": 24})
    ['golem.inf.mem.gib>=64 (offer has 24)', 'golem.runtime.name=docker (missing)']
    >>> explain(parse("(|(b=x)(b=y))"), {"b": "z"})
    ['none of the alternatives matched: b=x (offer has z); b=y (offer has z)']
    >>> explain(parse("(!(c=*))"), {"c": 5})
    ['!(c=*) (offer has 5)']
    """
    if evaluate(f, props):
        return []
    return _reasons(f, props)


def _leaf_body(f: Compare | Present | Glob) -> str:
    return str(f)[1:-1]


def _reasons(f: Filter, props: Mapping[str, object]) -> list[str]:
    # Only called on filters known to be false for props.
    if isinstance(f, And):
        lines: list[str] = []
        for child in f.children:
            if not evaluate(child, props):
                lines.extend(_reasons(child, props))
        return lines
    if isinstance(f, Or):
        if not f.children:
            return ["(|) never matches"]
        details = [line for child in f.children for line in _reasons(child, props)]
        return ["none of the alternatives matched: " + "; ".join(details)]
    if isinstance(f, Not):
        child = f.child
        if isinstance(child, _LEAF_TYPES):
            return [f"!({_leaf_body(child)}) (offer has {_describe(props.get(child.name))})"]
        return [f"{f} (the negated filter matched)"]
    actual = props.get(f.name)
    if actual is None:
        return [f"{_leaf_body(f)} (missing)"]
    return [f"{_leaf_body(f)} (offer has {_describe(actual)})"]


# ------------------------------------------------------------------ builders


def _scalar(value: object) -> Scalar:
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"constraint values must be finite, not {value!r}")
        return Decimal(repr(value))
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"constraint values must be finite, not {value}")
        return value
    raise TypeError(f"unsupported constraint value {value!r}")


def _literal(value: object, allow_list: bool) -> Value:
    if allow_list and isinstance(value, (list, tuple)):
        return tuple(_scalar(v) for v in value)
    return _scalar(value)


def eq(name: str, value: object) -> Compare:
    """Build ``(name=value)``.

    Parameters
    ----------
    name:
        Property name.
    value:
        ``bool``, ``int``, ``float`` (stored as ``Decimal``), ``Decimal``,
        ``str`` (always a string, never a wildcard), or a list/tuple of those.

    Examples
    --------
    >>> str(eq("golem.runtime.name", "vm"))
    '(golem.runtime.name=vm)'
    >>> str(eq("golem.srv.caps.multi-activity", True))
    '(golem.srv.caps.multi-activity=true)'
    >>> str(eq("x", "4"))
    '(x="4")'
    """
    return Compare(name, "=", _literal(value, allow_list=True))


def ge(name: str, value: object) -> Compare:
    """Build ``(name>=value)`` for a number or string ``value``.

    Examples
    --------
    >>> str(ge("golem.inf.cpu.threads", 2))
    '(golem.inf.cpu.threads>=2)'
    >>> str(ge("golem.inf.mem.gib", 0.5))
    '(golem.inf.mem.gib>=0.5)'
    """
    return Compare(name, ">=", _literal(value, allow_list=False))


def le(name: str, value: object) -> Compare:
    """Build ``(name<=value)`` for a number or string ``value``.

    Examples
    --------
    >>> str(le("golem.com.pricing.model.linear.coeffs", 1))
    '(golem.com.pricing.model.linear.coeffs<=1)'
    """
    return Compare(name, "<=", _literal(value, allow_list=False))


def present(name: str) -> Present:
    """Build ``(name=*)``.

    Examples
    --------
    >>> str(present("golem.node.debug.subnet"))
    '(golem.node.debug.subnet=*)'
    """
    return Present(name)


def all_of(*filters_or_texts: Filter | str | None) -> And:
    """Combine filters into one ``&``.

    Parameters
    ----------
    *filters_or_texts:
        Filters or filter text (parsed with :func:`parse`); ``None`` is
        skipped.  Nested ``&`` filters are flattened and repeated children
        kept once, in first-seen order.

    Returns
    -------
    And

    Examples
    --------
    >>> str(all_of("(golem.runtime.name=vm)", ge("golem.inf.mem.gib", 4), None,
    ...            all_of(present("golem.inf.cpu.cores"))))
    '(&(golem.runtime.name=vm)(golem.inf.mem.gib>=4)(golem.inf.cpu.cores=*))'
    """
    flat: list[Filter] = []
    seen: set[Filter] = set()

    def add(f: Filter) -> None:
        if isinstance(f, And):
            for child in f.children:
                add(child)
        elif f not in seen:
            seen.add(f)
            flat.append(f)

    for item in filters_or_texts:
        if item is None:
            continue
        if isinstance(item, str):
            add(parse(item))
        elif isinstance(item, _NODE_TYPES):
            add(item)
        else:
            raise TypeError(f"expected a filter, filter text or None, not {item!r}")
    return And(tuple(flat))
