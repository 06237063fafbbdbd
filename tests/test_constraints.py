"""Tests of golem_dask.protocol.constraints."""

from __future__ import annotations

import operator
import re
import time
from itertools import permutations
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from golem_dask.errors import ConstraintSyntaxError
from golem_dask.protocol.constraints import (
    MAX_DEPTH,
    MAX_TEXT_LENGTH,
    And,
    Compare,
    Filter,
    Glob,
    Not,
    Or,
    Present,
    all_of,
    eq,
    evaluate,
    explain,
    ge,
    le,
    parse,
    present,
)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Generating nested ASTs dominates the run time; fewer examples keep the file fast.
NESTED = settings(FAST, max_examples=200)


# ------------------------------------------------------------------ examples


def test_parse_nested_example() -> None:
    f = parse("(&(a>=1)(|(b=x)(b=y))(!(c=*)))")
    assert f == And(
        (
            Compare("a", ">=", 1),
            Or((Compare("b", "=", "x"), Compare("b", "=", "y"))),
            Not(Present("c")),
        )
    )
    assert str(f) == "(&(a>=1)(|(b=x)(b=y))(!(c=*)))"


def test_whitespace_between_and_inside_filters() -> None:
    f = parse("  (& (a >= 1)\n\t(| (b = x y ) )  ( ! (c=*) ) )  ")
    assert f == And(
        (Compare("a", ">=", 1), Or((Compare("b", "=", "x y"),)), Not(Present("c")))
    )


def test_real_golem_property_names() -> None:
    text = (
        "(&(golem.com.payment.platform.erc20-devnet-glm.address=*)"
        "(golem.srv.comp.expiration>1700000000000)(golem.inf.mem.gib>=0.5)"
        "(golem.runtime.name=vm))"
    )
    f = parse(text)
    assert isinstance(f, And)
    assert f.children[0] == Present("golem.com.payment.platform.erc20-devnet-glm.address")
    assert f.children[1] == Compare("golem.srv.comp.expiration", ">", 1700000000000)
    assert f.children[2] == Compare("golem.inf.mem.gib", ">=", Decimal("0.5"))
    assert str(f) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(a=4)", 4),
        ("(a=-2)", -2),
        ("(a=0.5)", Decimal("0.5")),
        ("(a=-12.250)", Decimal("-12.250")),
        ("(a=true)", True),
        ("(a=false)", False),
        ("(a=True)", "True"),
        ("(a=vm)", "vm"),
        ('(a="4")', "4"),
        ('(a="true")', "true"),
        ('(a="")', ""),
        ('(a=" padded ")', " padded "),
        ('(a="say \\"hi\\" (\\\\)")', 'say "hi" (\\)'),
        ("(a=\\(x\\))", "(x)"),
        ("(a=\\*)", "*"),
        ("(a=x\\\\y)", "x\\y"),
        ("(a=\\4)", "4"),
        ("(a=1e3)", "1e3"),
        ("(a=.5)", ".5"),
        ("(a=a\"b)", 'a"b'),
        ("(a=x,y])", "x,y]"),
        ("(a=[])", ()),
        ("(a=[ ])", ()),
        ("(a=[vpn, inet])", ("vpn", "inet")),
        ('(a=[1,0.5,true,"2",x\\,y])', (1, Decimal("0.5"), True, "2", "x,y")),
    ],
)
def test_literal_typing(text: str, expected: object) -> None:
    f = parse(text)
    assert isinstance(f, Compare)
    assert f.value == expected
    assert type(f.value) is type(expected)
    if isinstance(expected, tuple):
        assert isinstance(f.value, tuple)
        assert [type(v) for v in f.value] == [type(v) for v in expected]
    assert parse(str(f)) == f


def test_decimals_are_never_floats() -> None:
    f = parse("(a<=0.1)")
    assert isinstance(f, Compare) and isinstance(f.value, Decimal)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(a=*)", Present("a")),
        ("(a= * )", Present("a")),
        ("(a=foo*)", Glob("a", ("foo", ""))),
        ("(a=*bar)", Glob("a", ("", "bar"))),
        ("(a=a*b*c)", Glob("a", ("a", "b", "c"))),
        ("(a=**)", Glob("a", ("", "", ""))),
        ("(a=x\\**)", Glob("a", ("x*", ""))),
        ("(a=1*)", Glob("a", ("1", ""))),
    ],
)
def test_presence_and_wildcards(text: str, expected: Filter) -> None:
    assert parse(text) == expected
    assert parse(str(expected)) == expected


def test_empty_and_or() -> None:
    assert parse("(&)") == And(())
    assert parse("(| )") == Or(())
    assert evaluate(parse("(&)"), {}) is True
    assert evaluate(parse("(|)"), {}) is False


def test_equality_and_hashing_by_value() -> None:
    assert parse("(a=1)") == Compare("a", "=", 1)
    assert hash(parse("(&(a=1)(b=x))")) == hash(parse("(& (a=1) (b=x) )"))
    assert parse("(a=1)") != parse("(a=true)")
    assert parse("(a=1)") != parse('(a="1")')
    assert parse("(a=[1])") != parse("(a=[true])")
    assert parse("(&(a=1))") != parse("(|(a=1))")
    assert len({parse("(a=1)"), parse("(a=1)"), parse("(a=2)")}) == 2
    with pytest.raises(AttributeError):
        parse("(a=1)").name = "b"  # type: ignore[misc]


def test_node_validation() -> None:
    with pytest.raises(ValueError):
        Compare("a b", "=", 1)
    with pytest.raises(ValueError):
        Compare("a", "!=", 1)
    with pytest.raises(ValueError):
        Compare("a", ">", True)
    with pytest.raises(ValueError):
        Compare("a", ">", (1,))
    with pytest.raises(TypeError):
        Compare("a", "=", 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Glob("a", ("", ""))
    with pytest.raises(TypeError):
        And(("(a=1)",))  # type: ignore[arg-type]


def test_canonical_text_quotes_ambiguous_strings() -> None:
    assert str(eq("x", "4")) == '(x="4")'
    assert str(eq("x", "true")) == '(x="true")'
    assert str(eq("x", "*")) == "(x=\\*)"
    assert str(eq("x", "")) == '(x="")'
    assert str(eq("x", "=y")) == '(x="=y")'
    assert str(eq("x", "a(b)")) == "(x=a\\(b\\))"
    assert str(eq("x", ["a,b", "c"])) == "(x=[a\\,b,c])"
    assert str(eq("x", 1.5)) == "(x=1.5)"
    assert str(Compare("x", "=", Decimal("1E+2"))) == "(x=100.0)"


# ------------------------------------------------------------------ builders


def test_builders() -> None:
    assert eq("golem.inf.cpu.cores", 2) == Compare("golem.inf.cpu.cores", "=", 2)
    assert ge("golem.inf.mem.gib", 0.5) == Compare("golem.inf.mem.gib", ">=", Decimal("0.5"))
    assert le("x", "b") == Compare("x", "<=", "b")
    assert present("x") == Present("x")
    assert eq("caps", ["vpn", 1]) == Compare("caps", "=", ("vpn", 1))
    assert str(eq("mem", "4GiB")) == "(mem=4GiB)"
    with pytest.raises(ValueError):
        ge("x", float("nan"))
    with pytest.raises(TypeError):
        ge("x", [1])
    with pytest.raises(TypeError):
        eq("x", object())


def test_all_of_flattens_and_drops_none() -> None:
    f = all_of(
        "(&(a=1)(b=2))",
        None,
        And((Compare("c", "=", 3), And((Present("d"),)))),
        eq("a", 1),
        Or((Present("e"),)),
    )
    assert f == And(
        (
            Compare("a", "=", 1),
            Compare("b", "=", 2),
            Compare("c", "=", 3),
            Present("d"),
            Or((Present("e"),)),
        )
    )
    assert all_of() == And(())
    with pytest.raises(ConstraintSyntaxError):
        all_of("(a=")
    with pytest.raises(TypeError):
        all_of(42)  # type: ignore[arg-type]


# ---------------------------------------------------------------- evaluation


@pytest.mark.parametrize(
    ("text", "props", "expected"),
    [
        ("(a=1)", {"a": 1}, True),
        ("(a=1)", {"a": Decimal("1.00")}, True),
        ("(a=1)", {"a": 1.0}, True),
        ("(a=0.1)", {"a": 0.1}, True),
        ("(a=1)", {"a": True}, False),
        ("(a=true)", {"a": 1}, False),
        ("(a=true)", {"a": True}, True),
        ("(a=1)", {"a": "1"}, False),
        ('(a="1")', {"a": 1}, False),
        ("(a>=4)", {"a": "8"}, False),
        ("(a<b)", {"a": "a"}, True),
        ("(a<b)", {"a": "c"}, False),
        ("(a>=0.5)", {"a": 0.5}, True),
        ("(a>1)", {"a": float("nan")}, False),
        ("(a>1)", {"a": Decimal("NaN")}, False),
        ("(a<1)", {"a": float("-inf")}, True),
        ("(a=1)", {}, False),
        ("(a=1)", {"a": None}, False),
        ("(!(a=1))", {}, True),
        ("(a=*)", {"a": 0}, True),
        ("(a=*)", {"a": None}, False),
        ("(a=vm*)", {"a": "vm-nvidia"}, True),
        ("(a=*vm)", {"a": "vm-nvidia"}, False),
        ("(a=v*n*a)", {"a": "vm-nvidia"}, True),
        ("(a=ab*ba)", {"a": "aba"}, False),
        ("(a=1*)", {"a": 12}, False),
        ("(caps=vpn)", {"caps": ["inet", "vpn"]}, True),
        ("(caps=gpu)", {"caps": ["inet", "vpn"]}, False),
        ("(caps=v*)", {"caps": ("inet", "vpn")}, True),
        ("(n>=4)", {"n": [1, 2, 8]}, True),
        ("(n=[1,2])", {"n": [2, 1]}, True),
        ("(n=[1,1])", {"n": [1, 2]}, False),
        ("(n=[1,2])", {"n": [1, 2, 3]}, False),
        ("(n=[1])", {"n": 1}, False),
        ("(n=[])", {"n": []}, True),
        ("(a=x)", {"a": {"x": 1}}, False),
    ],
)
def test_evaluate_examples(text: str, props: dict[str, object], expected: bool) -> None:
    assert evaluate(parse(text), props) is expected


def test_glob_evaluation_is_fast() -> None:
    f = parse("(a=" + "a*" * 200 + "b)")
    start = time.monotonic()
    assert evaluate(f, {"a": "a" * 20000}) is False
    assert time.monotonic() - start < 1


# ------------------------------------------------------------------- explain


def test_explain_and() -> None:
    f = parse("(&(golem.inf.mem.gib>=64)(golem.runtime.name=docker)(golem.inf.cpu.cores>=1))")
    props = {"golem.inf.mem.gib": 24, "golem.inf.cpu.cores": 4}
    assert explain(f, props) == [
        "golem.inf.mem.gib>=64 (offer has 24)",
        "golem.runtime.name=docker (missing)",
    ]
    assert explain(f, {**props, "golem.inf.mem.gib": 64, "golem.runtime.name": "docker"}) == []


def test_explain_or_not_and_values() -> None:
    assert explain(parse("(|(b=x)(b=y))"), {"b": "z"}) == [
        "none of the alternatives matched: b=x (offer has z); b=y (offer has z)"
    ]
    assert explain(parse("(|)"), {}) == ["(|) never matches"]
    assert explain(parse("(!(c=*))"), {"c": 5}) == ["!(c=*) (offer has 5)"]
    assert explain(parse("(!(&(a=1)))"), {"a": 1}) == ["(!(&(a=1))) (the negated filter matched)"]
    assert explain(parse("(caps=gpu)"), {"caps": ["vpn", "4"]}) == ['caps=gpu (offer has [vpn, "4"])']
    assert explain(parse("(x>=1.5)"), {"x": 0.25}) == ["x>=1.5 (offer has 0.25)"]
    nested = parse("(&(a=1)(&(b=2)(c=3)))")
    assert explain(nested, {"a": 1, "b": 3}) == ["b=2 (offer has 3)", "c=3 (missing)"]


# --------------------------------------------------------------- bad syntax


@pytest.mark.parametrize(
    ("text", "position", "message"),
    [
        ("", 0, "empty constraint"),
        ("a=1", 0, "expected '('"),
        ("(a=1", 4, "unbalanced parentheses"),
        ("(&(a=1)", 7, "unbalanced parentheses"),
        ("(a=1))", 5, "unbalanced parentheses"),
        ("(a=1) (b=2)", 6, "trailing characters after filter"),
        ("(a=<1)", 2, "unknown operator '=<'"),
        ("(a!=1)", 2, "unknown operator '!='"),
        ("(=1)", 1, "empty property name"),
        ("( >=1)", 2, "empty property name"),
        ("()", 1, "empty filter"),
        ("(a$=1)", 2, "invalid character '$' in property name"),
        ("(a b=1)", 3, "expected an operator"),
        ("(a)", 2, "expected an operator"),
        ("(a=)", 3, "expected a value"),
        ("(a>= )", 5, "expected a value"),
        ("(&(a=1)x)", 7, "expected '(' or ')'"),
        ("(!(a=1)(b=2))", 7, "expected ')'"),
        ("(!a=1)", 2, "expected '(' after '!'"),
        ("(a>=x*)", 5, "wildcard"),
        ("(a=b(c)", 4, "unescaped '('"),
        ('(a="x)', 3, "unterminated quoted string"),
        ('(a="x" y)', 7, "expected ')'"),
        ("(a=x\\", 4, "dangling"),
        ("(a<[1])", 3, "list values are only allowed with '='"),
        ("(a>true)", 3, "booleans can only be compared with '='"),
        ("(a=[1,,2])", 6, "empty list element"),
        ("(a=[1,])", 6, "empty list element"),
        ("(a=[1,2)", 7, "expected ']'"),
        ('(a=["x" y])', 8, "expected ',' or ']'"),
        ("(a=[[1]])", 4, "nested lists"),
        ("(a=[x*])", 5, "wildcards are not allowed in lists"),
        ("(a=[1] x)", 7, "expected ')' after the list"),
        ("((a=1))", 1, "expected a property name"),
    ],
)
def test_malformed_positions(text: str, position: int, message: str) -> None:
    with pytest.raises(ConstraintSyntaxError) as info:
        parse(text)
    assert info.value.position == position
    assert message in str(info.value)
    assert info.value.text == text
    assert isinstance(info.value, ValueError)


def test_depth_limit() -> None:
    ok = "(!" * (MAX_DEPTH - 1) + "(a=1)" + ")" * (MAX_DEPTH - 1)
    assert parse(ok) is not None
    too_deep = "(!" * MAX_DEPTH + "(a=1)" + ")" * MAX_DEPTH
    with pytest.raises(ConstraintSyntaxError) as info:
        parse(too_deep)
    assert info.value.position == 2 * MAX_DEPTH
    assert "nested too deeply" in str(info.value)


def test_huge_inputs_fail_fast() -> None:
    start = time.monotonic()
    for text in ["(" * 100_000, "(&" * 30_000, "(a=" + "1" * 5000 + ")"]:
        with pytest.raises(ConstraintSyntaxError):
            parse(text)
    with pytest.raises(ConstraintSyntaxError) as info:
        parse("(a=" + "x" * MAX_TEXT_LENGTH + ")")
    assert info.value.position == MAX_TEXT_LENGTH
    assert time.monotonic() - start < 2


def test_parse_rejects_non_text() -> None:
    with pytest.raises(TypeError):
        parse(b"(a=1)")  # type: ignore[arg-type]


# ---------------------------------------------------------------- hypothesis

NAMES = st.from_regex(r"[A-Za-z0-9._-]{1,12}", fullmatch=True)
DECIMALS = st.decimals(
    min_value=Decimal("-1e6"), max_value=Decimal("1e6"), places=3, allow_nan=False
)
SCALARS = st.one_of(st.booleans(), st.integers(), DECIMALS, st.text(max_size=12))


@st.composite
def compares(draw: st.DrawFn, names: st.SearchStrategy[str], scalars: st.SearchStrategy[Any]) -> Compare:
    name = draw(names)
    if draw(st.integers(0, 5)) == 0:
        value = tuple(draw(st.lists(scalars, max_size=4)))
        return Compare(name, "=", value)
    value = draw(scalars)
    op = "=" if isinstance(value, bool) else draw(st.sampled_from(["=", "<", "<=", ">", ">="]))
    return Compare(name, op, value)


def globs(names: st.SearchStrategy[str], text: st.SearchStrategy[str]) -> st.SearchStrategy[Glob]:
    return st.builds(
        Glob, names, st.lists(text, min_size=2, max_size=4).map(tuple).filter(lambda p: p != ("", ""))
    )


def filters(leaves: st.SearchStrategy[Filter]) -> st.SearchStrategy[Filter]:
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=4).map(lambda c: And(tuple(c))),
            st.lists(children, max_size=4).map(lambda c: Or(tuple(c))),
            children.map(Not),
        ),
        max_leaves=12,
    )


ANY_LEAF: st.SearchStrategy[Filter] = st.one_of(
    compares(NAMES, SCALARS), st.builds(Present, NAMES), globs(NAMES, st.text(max_size=8))
)


@NESTED
@given(filters(ANY_LEAF))
def test_round_trip_through_text(f: Filter) -> None:
    text = str(f)
    assert parse(text) == f
    assert str(parse(text)) == text


# Small pools so that generated literals and property values often collide.
POOL_NAMES = st.sampled_from(["a", "b", "c"])
POOL_STRINGS = st.sampled_from(["", "a", "ab", "b", "ba", "4", "true", "x*y"])
POOL_NUMBERS = st.one_of(
    st.integers(-2, 3), st.sampled_from([Decimal("0.5"), Decimal("1.0"), Decimal("-2.25")])
)
POOL_SCALARS = st.one_of(st.booleans(), POOL_NUMBERS, POOL_STRINGS)
POOL_LEAF: st.SearchStrategy[Filter] = st.one_of(
    compares(POOL_NAMES, POOL_SCALARS),
    st.builds(Present, POOL_NAMES),
    globs(POOL_NAMES, st.sampled_from(["", "a", "b"])),
)
PROP_SCALARS = st.one_of(
    POOL_SCALARS, st.sampled_from([0.5, 1.0, -2.25, 3.0, float("nan")]), st.none()
)
PROPS = st.dictionaries(
    POOL_NAMES,
    st.one_of(PROP_SCALARS, st.lists(PROP_SCALARS, max_size=3), st.tuples(PROP_SCALARS)),
)

_REF_OPS = {"=": operator.eq, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def _ref_number(v: object) -> Decimal | None:
    if type(v) is int:
        return Decimal(v)
    if type(v) is float:
        return None if v != v else Decimal(str(v))
    if type(v) is Decimal:
        return None if v.is_nan() else v
    return None


def _ref_scalar(actual: object, op: str, literal: object) -> bool:
    if type(literal) is bool:
        return type(actual) is bool and op == "=" and actual == literal
    if type(literal) is str:
        return type(actual) is str and _REF_OPS[op](actual, literal)
    number = _ref_number(actual)
    return number is not None and _REF_OPS[op](number, Decimal(literal))  # type: ignore[arg-type]


def _ref_same_elements(actual: object, literal: tuple[object, ...]) -> bool:
    if not isinstance(actual, (list, tuple)) or len(actual) != len(literal):
        return False
    # Try every assignment: lists here have at most 4 elements.
    return any(
        all(_ref_scalar(a, "=", lit) for a, lit in zip(perm, literal))
        for perm in permutations(actual)
    )


def reference(f: Filter, props: dict[str, object]) -> bool:
    if isinstance(f, And):
        return all(reference(c, props) for c in f.children)
    if isinstance(f, Or):
        return any(reference(c, props) for c in f.children)
    if isinstance(f, Not):
        return not reference(f.child, props)
    if props.get(f.name) is None:
        return False
    actual = props[f.name]
    if isinstance(f, Present):
        return True
    if isinstance(f, Compare) and isinstance(f.value, tuple):
        return _ref_same_elements(actual, f.value)
    candidates = list(actual) if isinstance(actual, (list, tuple)) else [actual]
    if isinstance(f, Glob):
        regex = ".*".join(re.escape(p) for p in f.parts)
        return any(type(c) is str and re.fullmatch(regex, c, re.DOTALL) is not None for c in candidates)
    return any(_ref_scalar(c, f.op, f.value) for c in candidates)


@FAST
@given(filters(POOL_LEAF), PROPS)
def test_evaluate_agrees_with_reference(f: Filter, props: dict[str, object]) -> None:
    expected = reference(f, props)
    assert evaluate(f, props) is expected
    reasons = explain(f, props)
    assert (reasons == []) is expected
    assert all(isinstance(r, str) and r for r in reasons)


FILTER_ALPHABET = st.sampled_from(list('()&|!=<>~*\\"[], \tabc01.-truefals'))


def _parse_or_syntax_error(text: str) -> None:
    try:
        f = parse(text)
    except ConstraintSyntaxError as exc:
        assert 0 <= exc.position <= len(text)
        assert exc.text == text
    else:
        assert parse(str(f)) == f


@FAST
@given(st.text(max_size=60))
def test_random_text_only_raises_syntax_errors(text: str) -> None:
    _parse_or_syntax_error(text)


@FAST
@given(st.text(FILTER_ALPHABET, max_size=60))
def test_filterish_text_only_raises_syntax_errors(text: str) -> None:
    _parse_or_syntax_error(text)


@NESTED
@given(filters(ANY_LEAF), st.data())
def test_mutated_filters_only_raise_syntax_errors(f: Filter, data: st.DataObject) -> None:
    text = str(f)
    assume(text)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(text)))
        if data.draw(st.booleans()) and i < len(text):
            text = text[:i] + text[i + 1 :]
        else:
            text = text[:i] + data.draw(FILTER_ALPHABET) + text[i:]
    _parse_or_syntax_error(text)
