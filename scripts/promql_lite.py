"""A small PromQL evaluator over a handful of /metrics scrapes (the dashboard preview's engine).

It understands the subset the Grafana dashboard uses, and nothing else (a
dashboard expression outside it fails tests/deploy/test_dashboard.py):

- selectors ``name{label="v", label=~"regex"}`` (a matcher whose value holds a
  Grafana variable, ``$namespace``, matches everything), with an optional
  range ``[5m]`` or ``[$__rate_interval]``;
- ``rate(...)`` and ``increase(...)`` over a range (no extrapolation: the
  difference between the first and the last sample inside the window);
- ``sum``/``max``/``min``/``avg`` with an optional ``by (labels)``;
- ``histogram_quantile(q, ...)`` with linear interpolation inside a bucket;
- ``/ * + -`` between vectors with identical label sets, or with a number.

Samples come from Prometheus text exposition: ``parse_scrapes`` reads the
``# scrape t=<seconds>`` blocks that scripts/scrape_metrics.py writes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

Labels = frozenset  # of (name, value) pairs
Vector = dict  # Labels -> float

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_TOKEN = re.compile(r'\s*(?:(?P<num>\d+(?:\.\d+)?)|(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)'
                    r'|(?P<braces>\{[^}]*\})|(?P<range>\[[^\]]+\])|(?P<op>[()/*+\-,]))')
AGGREGATIONS = {"sum": sum, "max": max, "min": min, "avg": lambda v: sum(v) / len(v)}


def parse_exposition(text: str, extra_labels: dict[str, str] | None = None) -> dict[tuple[str, Labels], float]:
    """``{(metric name, labels): value}`` of one scrape; ``extra_labels`` plays Prometheus' target labels."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            raise ValueError(f"not a sample line: {line!r}")
        labels = dict(extra_labels or {})
        labels.update((k, v) for k, v in _LABEL.findall(m.group(3) or ""))
        out[(m.group(1), Labels(labels.items()))] = float(m.group(4))
    return out


def parse_scrapes(text: str, extra_labels: dict[str, str] | None = None) -> list[tuple[float, dict]]:
    """The ``# scrape t=<seconds>`` blocks of a file written by scripts/scrape_metrics.py, in time order."""
    blocks = re.split(r"^# scrape t=([0-9.]+)\n", text, flags=re.M)
    return [(float(t), parse_exposition(body, extra_labels)) for t, body in zip(blocks[1::2], blocks[2::2])]


def parse_duration(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not m:
        raise ValueError(f"bad duration {text!r}")
    return float(m.group(1)) * units[m.group(2)]


@dataclass
class Selector:
    name: str
    matchers: list[tuple[str, str, str]]  # (label, op, value)
    range_s: float | None = None

    def matches(self, labels: Labels) -> bool:
        d = dict(labels)
        for label, op, value in self.matchers:
            if "$" in value:  # a Grafana variable: all values
                continue
            have = d.get(label, "")
            ok = {"=": have == value, "!=": have != value,
                  "=~": re.fullmatch(value, have) is not None, "!~": re.fullmatch(value, have) is None}[op]
            if not ok:
                return False
        return True


class Parser:
    """Recursive descent over the subset above; ``parse()`` returns a tree of tuples."""

    def __init__(self, expr: str, variables: dict[str, str]):
        for name, value in variables.items():
            expr = expr.replace(name, value)
        self.tokens = self._tokenize(expr)
        self.pos = 0

    @staticmethod
    def _tokenize(expr: str) -> list[tuple[str, str]]:
        tokens, pos = [], 0
        while pos < len(expr.rstrip()):
            m = _TOKEN.match(expr, pos)
            if not m or m.end() == pos:
                raise ValueError(f"cannot parse {expr[pos:]!r}")
            kind = m.lastgroup
            tokens.append((kind, m.group(kind)))
            pos = m.end()
        return tokens

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if tok is None or (value is not None and tok[1] != value):
            raise ValueError(f"expected {value!r}, got {tok}")
        self.pos += 1
        return tok

    def parse(self):
        tree = self.expr()
        if self.peek() is not None:
            raise ValueError(f"unexpected {self.peek()}")
        return tree

    def expr(self):
        left = self.term()
        while self.peek() and self.peek()[1] in "+-":
            op = self.take()[1]
            left = ("binop", op, left, self.term())
        return left

    def term(self):
        left = self.atom()
        while self.peek() and self.peek()[1] in "*/":
            op = self.take()[1]
            left = ("binop", op, left, self.atom())
        return left

    def _by(self) -> list[str]:
        self.take("by")
        self.take("(")
        labels = []
        while self.peek()[1] != ")":
            labels.append(self.take()[1])
            if self.peek()[1] == ",":
                self.take(",")
        self.take(")")
        return labels

    def atom(self):
        kind, value = self.take()
        if kind == "num":
            return ("num", float(value))
        if value == "(":
            inner = self.expr()
            self.take(")")
            return inner
        if kind != "name":
            raise ValueError(f"unexpected {value!r}")
        if value in AGGREGATIONS:
            by = self._by() if self.peek()[1] == "by" else None
            self.take("(")
            inner = self.expr()
            self.take(")")
            if by is None and self.peek() and self.peek()[1] == "by":
                by = self._by()
            return ("agg", value, by or [], inner)
        if value in ("rate", "increase"):
            self.take("(")
            inner = self.atom()
            self.take(")")
            if inner[0] != "sel" or inner[1].range_s is None:
                raise ValueError(f"{value}() needs a range selector")
            return (value, inner[1])
        if value == "histogram_quantile":
            self.take("(")
            q = float(self.take()[1])
            self.take(",")
            inner = self.expr()
            self.take(")")
            return ("hq", q, inner)
        matchers = []
        if self.peek() and self.peek()[0] == "braces":
            body = self.take()[1][1:-1]
            matchers = re.findall(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', body)
        range_s = None
        if self.peek() and self.peek()[0] == "range":
            range_s = parse_duration(self.take()[1][1:-1])
        return ("sel", Selector(value, matchers, range_s))


def _instant(sel: Selector, sample: dict) -> Vector:
    return {labels: v for (name, labels), v in sample.items() if name == sel.name and sel.matches(labels)}


def _histogram_quantile(q: float, vec: Vector) -> Vector:
    groups: dict[Labels, list[tuple[float, float]]] = {}
    for labels, v in vec.items():
        d = dict(labels)
        le = d.pop("le", None)
        if le is not None:
            groups.setdefault(Labels(d.items()), []).append((float(le), v))
    out = {}
    for labels, buckets in groups.items():
        buckets.sort()
        total = buckets[-1][1]
        if total <= 0:
            continue
        rank, prev_bound, prev_count = q * total, 0.0, 0.0
        for bound, count in buckets:
            if count >= rank:
                if math.isinf(bound):
                    out[labels] = prev_bound
                else:
                    width = count - prev_count
                    out[labels] = prev_bound + (bound - prev_bound) * ((rank - prev_count) / width if width else 1.0)
                break
            prev_bound, prev_count = bound, count
    return out


def evaluate(tree, scrapes: list[tuple[float, dict]], i: int) -> Vector | float:
    """Value of ``tree`` at scrape ``i`` (a vector, or a number for numeric literals)."""
    kind = tree[0]
    if kind == "num":
        return tree[1]
    if kind == "sel":
        return _instant(tree[1], scrapes[i][1])
    if kind in ("rate", "increase"):
        sel, t_now = tree[1], scrapes[i][0]
        window = [j for j in range(i + 1) if t_now - scrapes[j][0] <= sel.range_s]
        if len(window) < 2:
            return {}
        first, last = _instant(sel, scrapes[window[0]][1]), _instant(sel, scrapes[i][1])
        dt = t_now - scrapes[window[0]][0]
        out = {}
        for labels, v in last.items():
            if labels in first:
                delta = v - first[labels] if v >= first[labels] else v  # counter reset
                out[labels] = delta / dt if kind == "rate" else delta
        return out
    if kind == "agg":
        _, fn, by, inner = tree
        groups: dict[Labels, list[float]] = {}
        for labels, v in evaluate(inner, scrapes, i).items():
            key = Labels((k, val) for k, val in labels if k in by)
            groups.setdefault(key, []).append(v)
        return {k: AGGREGATIONS[fn](v) for k, v in groups.items()}
    if kind == "hq":
        return _histogram_quantile(tree[1], evaluate(tree[2], scrapes, i))
    if kind == "binop":
        _, op, lt, rt = tree
        a, b = evaluate(lt, scrapes, i), evaluate(rt, scrapes, i)
        fn = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y,
              "/": lambda x, y: x / y if y else math.nan}[op]
        if isinstance(a, float) and isinstance(b, float):
            return fn(a, b)
        if isinstance(a, float):
            return {k: fn(a, v) for k, v in b.items()}
        if isinstance(b, float):
            return {k: fn(v, b) for k, v in a.items()}
        return {k: fn(v, b[k]) for k, v in a.items() if k in b}
    raise ValueError(f"unknown node {kind}")


def metric_names(tree) -> set[str]:
    """Every metric name an expression selects."""
    if isinstance(tree, Selector):
        return {tree.name}
    if isinstance(tree, tuple):
        return set().union(*(metric_names(t) for t in tree))
    if isinstance(tree, list):
        return set().union(*(metric_names(t) for t in tree)) if tree else set()
    return set()
