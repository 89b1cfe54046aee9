"""The defaults quoted in the docs' key tables (docs/learner.md, docs/generator.md) are the code's:
each value is the class's default, and where a run sets another (agro_dist/run/config.py's
_LEARNER_DEFAULTS / _GENERATOR_DEFAULTS) the cell says so as "(run: X)". docs/config.md, the run's
whole reference, is generated and checked in tests/test_config.py."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest
import yaml

from agro_dist.actors.generator import GeneratorConfig
from agro_dist.learner.config import LearnerConfig
from agro_dist.run.config import _GENERATOR_DEFAULTS, _LEARNER_DEFAULTS

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
UNQUOTED = object()  # a cell that describes rather than quotes a value ("-", "task's", "= model")


def split_top(cell: str):
    """``a, (b, c), d`` -> [a, (b, c), d]: commas outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in cell:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return out


def parse_value(text: str):
    """A quoted default: its value and the run's where the cell says "(run: X)"."""
    text = text.replace("`", "").strip()
    run = None
    m = re.search(r"\(run: ([^)]*)\)", text)
    if m:
        run = parse_value(m.group(1))[0]
        text = (text[:m.start()] + text[m.end():]).strip()
    if not text.startswith("("):
        text = re.sub(r"\s*\(.*\)$", "", text).strip()  # a remark: "0 (off)", "None (= 1; ...)"
    if text in ("-", "task's") or text.startswith("="):
        return UNQUOTED, run
    if text == "None":
        return None, run
    if text.startswith("("):
        text = "[" + text[1:-1] + "]"
    try:
        return float(text) if re.fullmatch(r"[-+0-9.e]+", text) else yaml.safe_load(text), run
    except yaml.YAMLError:
        return text, run


def table_rows(path: str, header: str):
    lines = open(path).read().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(header))
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        yield re.findall(r"`([a-z_]+)`", cells[0]), cells[1]


def same(a, b) -> bool:
    if isinstance(b, tuple):
        b = list(b)
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return abs(a - b) <= 1e-12 * max(1.0, abs(b))
    return a == b


@pytest.mark.parametrize("doc,header,cls,run_defaults", [
    ("learner.md", "| key | default |", LearnerConfig, _LEARNER_DEFAULTS),
    ("generator.md", "| `GeneratorConfig` key | default |", GeneratorConfig, _GENERATOR_DEFAULTS),
])
def test_every_default_in_the_docs_key_tables_is_the_codes(doc, header, cls, run_defaults):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = {n: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default) for n, f in fields.items()}
    seen, wrong = set(), []
    for keys, cell in table_rows(os.path.join(DOCS, doc), header):
        values = split_top(cell)
        assert len(values) == len(keys), f"{doc}: {keys} has {len(values)} defaults: {cell!r}"
        for key, text in zip(keys, values):
            assert key in fields, f"{doc} documents {key!r}, which {cls.__name__} does not have"
            seen.add(key)
            value, run = parse_value(text)
            if value is not UNQUOTED and not same(value, defaults[key]):
                wrong.append(f"{key}: docs say {value!r}, the code {defaults[key]!r}")
            want_run = run_defaults.get(key)
            if want_run is not None and not same(want_run, defaults[key]) and (run is None or not same(run, want_run)):
                wrong.append(f"{key}: a run sets {want_run!r}; the docs should say (run: {want_run})")
            if run is not None and not same(run, want_run if want_run is not None else defaults[key]):
                wrong.append(f"{key}: docs say run: {run!r}, a run sets {want_run!r}")
    assert not wrong, f"{doc}: " + "; ".join(wrong)
    missing = set(fields) - seen
    assert not missing, f"{doc} does not document {sorted(missing)}"
