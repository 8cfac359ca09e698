"""A structural check of PromQL for dashboard linting, without a Prometheus at hand.

Catches what breaks dashboards silently: unbalanced brackets (outside string literals), unknown
functions, malformed label matchers and range durations, and ``ray_retort_*`` names that
``cluster/metrics.py`` does not define. It is not a parser: the integration test sends every
dashboard query to a real Prometheus.
"""

from __future__ import annotations

import re

PROMQL_FUNCTIONS = frozenset(
    [
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "group",
        "limitk",
        "limit_ratio",
        "rate",
        "irate",
        "increase",
        "delta",
        "idelta",
        "deriv",
        "predict_linear",
        "changes",
        "resets",
        "histogram_quantile",
        "abs",
        "ceil",
        "floor",
        "round",
        "exp",
        "ln",
        "log2",
        "log10",
        "sqrt",
        "clamp",
        "clamp_min",
        "clamp_max",
        "scalar",
        "vector",
        "time",
        "timestamp",
        "label_replace",
        "label_join",
        "sort",
        "sort_desc",
        "absent",
        "absent_over_time",
        "avg_over_time",
        "min_over_time",
        "max_over_time",
        "sum_over_time",
        "count_over_time",
        "last_over_time",
        "quantile_over_time",
        "stddev_over_time",
        "present_over_time",
    ]
)
PROMQL_KEYWORDS = frozenset(
    [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
    ]
)
_DURATION = re.compile(
    r"^(\d+(ms|s|m|h|d|w|y))+$|^\$\w+$|^\d+(ms|s|m|h|d|w|y)?:\d*(ms|s|m|h|d|w|y)?$|^\d+\w*:$"
)
_MATCHER = re.compile(r'^\s*[a-zA-Z_]\w*\s*(=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"\s*$')


def promql_problems(expr: str, known_metric) -> list[str]:
    """Structural check of one PromQL expression (the real parse is Prometheus's, in the integration
    test): balanced brackets outside strings, known functions, well-formed label matchers and range
    durations, and every ``ray_retort_*`` name defined in ``cluster.metrics``."""
    problems: list[str] = []
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for i, ch in enumerate(stripped):
        if ch in "([{":
            stack.append((ch, i))
        elif ch in ")]}":
            if not stack or stack[-1][0] != pairs[ch]:
                return [f"unbalanced {ch!r} at {i}"]
            stack.pop()
    if stack:
        return [f"unclosed {stack[-1][0]!r} at {stack[-1][1]}"]
    for m in re.finditer(r"([a-zA-Z_][\w:]*)\s*\(", stripped):
        if m.group(1) not in PROMQL_FUNCTIONS and m.group(1) not in PROMQL_KEYWORDS:
            problems.append(f"unknown function {m.group(1)!r}")
    for body in _matcher_blocks(expr):
        for part in _split_matchers(body):
            if part.strip() and not _MATCHER.match(part):
                problems.append(f"bad label matcher {part.strip()!r}")
    for rng in re.findall(r"\[([^\]]*)\]", stripped):
        if not _DURATION.match(rng.strip()):
            problems.append(f"bad range {rng!r}")
    for name in re.findall(r"\bray_retort_\w+", stripped):
        if not known_metric(name):
            problems.append(f"metric {name!r} is not defined in cluster/metrics.py")
    return problems


def _matcher_blocks(expr: str) -> list[str]:
    """The text inside each ``{...}`` of ``expr``, braces inside string literals ignored."""
    blocks, cur, depth, in_str, esc = [], "", 0, False, False
    for ch in expr:
        if in_str:
            esc, in_str = (ch == "\\" and not esc), not (ch == '"' and not esc)
        elif ch == '"':
            in_str = True
        elif ch == "{":
            depth += 1
            if depth == 1:
                cur = ""
                continue
        elif ch == "}":
            depth -= 1
            if depth == 0:
                blocks.append(cur)
                continue
        if depth:
            cur += ch
    return blocks


def _split_matchers(body: str) -> list[str]:
    parts, cur, in_str, esc = [], "", False, False
    for ch in body:
        if in_str:
            cur += ch
            in_str = not (ch == '"' and not esc)
            esc = ch == "\\" and not esc
        elif ch == '"':
            cur, in_str = cur + ch, True
        elif ch == ",":
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [*parts, cur]


def known_retort_metric(name: str) -> bool:
    from cluster import metrics as M

    for m in M.ALL:
        suffixes = ("_bucket", "_sum", "_count") if m.kind == "histogram" else ("",)
        if any(name == M.exported(m, s) for s in suffixes):
            return True
    return False
