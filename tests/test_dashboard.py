"""The Grafana dashboard in systemd/: its JSON model, its PromQL, and the metrics it reads.

Every expression is parsed by the real ``promtool`` (as recording rules in a
rules file: ``promtool check rules`` parses PromQL offline), and every metric
name it uses is checked against a live ``/metrics`` scrape of a running
daemon (the object-store families, which have samples only once a store was
used, against the exposition of the daemon's own ``ObjectStoreCollector``).
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import child_env
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from daemon.objectstore.traffic import Traffic
from daemon.supervisor import metrics as metrics_module

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "systemd" / "ckpt-exporter.grafana.json"
README = REPO / "README.md"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
MODEL_QUERY = "label_values(ckpt_exporter_exports_total, model)"
#: Series Prometheus itself adds to every scrape target, not in the daemon's exposition.
SCRAPE_SERIES = {"up"}

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (Debian package 'prometheus'; .ci/run installs it)",
)


# --- The dashboard ---------------------------------------------------------------------------


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows included, and the panels inside collapsed rows."""
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def model_variable_expr(dash: dict[str, Any]) -> str:
    """The ``model`` variable's ``label_values(metric, model)`` as the PromQL it amounts to."""
    (model,) = [v for v in dash["templating"]["list"] if v["name"] == "model"]
    m = re.fullmatch(r"label_values\((\w+), model\)", model["query"]["query"])
    assert m, model["query"]
    return f"group by (model) ({m.group(1)})"


def expressions(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """``(where, expr)`` for each query target of each panel, and the model variable's query."""
    out = [
        (f"panel {p['id']} {p['title']!r} target {t['refId']}", t["expr"])
        for p in all_panels(dash)
        for t in p.get("targets", [])
    ]
    return [*out, ("variable model", model_variable_expr(dash))]


# --- Grafana variables -----------------------------------------------------------------------

#: Concrete values for Grafana's variables, as Grafana would interpolate them.
#: ``$model`` is multi-valued with "All" = ``.*``; Grafana formats a multi-value
#: selection for Prometheus as a regex alternation.
VARIABLES = {
    "model": "(resnet|bert)",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
}


def substitute(expr: str) -> str:
    """``expr`` with ``$name``, ``${name}`` and ``${name:format}`` replaced by :data:`VARIABLES`."""

    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in VARIABLES:
            raise KeyError(f"unknown Grafana variable ${name} in {expr!r}")
        return VARIABLES[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)


# --- A small PromQL tokenizer ----------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:ms|[smhdwy])*
                (?:\d+(?:ms|[smhdwy]))*)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>==|!=|=~|!~|>=|<=|[-+*/%^<>=(){}\[\],@])
    """,
    re.X,
)
#: Keywords followed by a parenthesised list of label names.
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
#: Other words that are never metric names.
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
_AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip


@dataclass
class Parsed:
    """What the dashboard test needs from one expression."""

    #: ``(metric, [(label, operator, value), ...])`` for each vector selector.
    selectors: list[tuple[str, list[tuple[str, str, str]]]] = field(default_factory=list)
    #: Label names in ``by``/``without``/``on``/``ignoring``/``group_*`` lists.
    grouping: set[str] = field(default_factory=set)

    @property
    def metrics(self) -> set[str]:
        return {name for name, _ in self.selectors}


def tokenize(expr: str) -> list[tuple[str, str]]:
    """``(kind, text)`` tokens of ``expr``; kinds: string, number, ident, op."""
    tokens, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot tokenize {expr[pos:]!r} in {expr!r}")
        kind = m.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append((kind, m.group()))
        pos = m.end()
    return tokens


def _unquote(s: str) -> str:
    return s[1:-1] if s[0] == "`" else str(ast.literal_eval(s))


def parse(expr: str) -> Parsed:
    """Vector selectors and grouping labels of ``expr``.

    Function and aggregation names (an identifier before ``(``, or an
    aggregation before ``by``/``without``), keywords, label names, string
    literals, numbers and durations are not metric names. A selector with no
    name, ``{__name__="x", ...}``, names ``x``.
    """
    toks = tokenize(expr)
    out = Parsed()
    i = 0

    def matchers(start: int) -> tuple[list[tuple[str, str, str]], int]:
        """The matchers of a ``{...}`` opening at ``start``; the index after its ``}``."""
        found, j = [], start + 1
        while toks[j][1] != "}":
            if toks[j][1] == ",":
                j += 1
                continue
            (k1, label), (_, op), (k3, value) = toks[j : j + 3]
            assert k1 == "ident" and k3 == "string" and op in ("=", "!=", "=~", "!~"), toks[j:]
            found.append((label, op, _unquote(value)))
            j += 3
        return found, j + 1

    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1][1] if i + 1 < len(toks) else ""
        if text == "[":  # a range or subquery: durations only
            i = next(j for j in range(i, len(toks)) if toks[j][1] == "]") + 1
        elif text == "{":  # a selector without a metric name
            found, i = matchers(i)
            names = [v for label, op, v in found if label == "__name__" and op == "="]
            out.selectors.append((names[0] if names else "", found))
        elif kind != "ident":
            i += 1
        elif text.lower() in _LABEL_LISTS:
            i += 1
            if nxt == "(":
                end = next(j for j in range(i, len(toks)) if toks[j][1] == ")")
                out.grouping |= {t for k, t in toks[i + 1 : end] if k == "ident"}
                i = end + 1
        elif (
            text.lower() in _KEYWORDS
            or nxt == "("  # a function, or an aggregation with its arguments first
            or (text in _AGGREGATIONS and nxt.lower() in ("by", "without"))
        ):
            i += 1
        elif nxt == "{":
            found, i = matchers(i + 1)
            out.selectors.append((text, found))
        else:
            out.selectors.append((text, []))
            i += 1
    return out


def test_the_extractor_finds_metrics_not_functions_keywords_labels_or_strings() -> None:
    p = parse(
        "histogram_quantile(0.95, sum by (phase, le) "
        '(rate(ckpt_exporter_phase_duration_seconds_bucket{model=~"a|b"}[5m])))'
    )
    assert p.grouping == {"phase", "le"}
    assert p.selectors == [
        ("ckpt_exporter_phase_duration_seconds_bucket", [("model", "=~", "a|b")])
    ]

    p = parse(
        "sum without (instance) (rate(a_total[5m] offset 1h)) / ignoring (reason) "
        "group_left (model) b_total > bool 0 and on(model) c unless d @ start()"
    )
    assert p.metrics == {"a_total", "b_total", "c", "d"}
    assert p.grouping == {"instance", "reason", "model"}

    # Strings (even ones that look like metrics), numbers, durations, subqueries, NaN/Inf.
    p = parse(
        'label_replace(up{job="x", instance!~"y.*"}, "ckpt_fake", "$1", "job", "(.*)") '
        "or max_over_time(deriv(m:rec[5m])[1h:30s]) * 1e3 + 0x1f - Inf < NaN"
    )
    assert p.metrics == {"up", "m:rec"}
    assert ("up", [("job", "=", "x"), ("instance", "!~", "y.*")]) in p.selectors

    # An aggregation with its grouping after the arguments; a name-less selector;
    # metric names that share a prefix with keywords or functions.
    p = parse(
        'count(on_disk) by (model) + {__name__="byte_total", le="+Inf"} '
        "- sum(rate_limited) - time() - topk(3, offset_x)"
    )
    assert p.metrics == {"on_disk", "byte_total", "rate_limited", "offset_x"}
    assert p.grouping == {"model"}

    with pytest.raises(ValueError, match="cannot tokenize"):
        parse('rate(x{a="unterminated}[5m])')


def test_grafana_variables_are_substituted() -> None:
    expr = 'rate(x{model=~"$model", m=~"${model}", n=~"${model:regex}"}[$__rate_interval])'
    assert substitute(expr) == (
        'rate(x{model=~"(resnet|bert)", m=~"(resnet|bert)", n=~"(resnet|bert)"}[1m])'
    )
    with pytest.raises(KeyError, match="instance"):
        substitute('up{instance="$instance"}')


# --- The JSON model --------------------------------------------------------------------------


def test_dashboard_is_a_grafana_json_model_with_its_variables() -> None:
    dash = load()
    assert dash["schemaVersion"] >= 39  # Grafana 10.4 / 11; newer versions migrate it up
    assert dash["uid"] == "ckpt-exporter" and dash["id"] is None and dash["title"]
    assert "__inputs" not in dash  # the datasource is chosen by the variable, not at import

    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    model = variables["model"]
    assert model["type"] == "query" and model["datasource"] == DATASOURCE
    assert model["definition"] == MODEL_QUERY and model["query"]["query"] == MODEL_QUERY
    # Multi-valued with "All" as a regex, so model=~"$model" selects every model.
    assert model["multi"] and model["includeAll"] and model["allValue"] == ".*"
    assert parse(model_variable_expr(dash)).metrics == {"ckpt_exporter_exports_total"}


def test_every_panel_has_a_unique_id_the_datasource_variable_and_a_place() -> None:
    dash = load()
    panels = all_panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    assert all(isinstance(i, int) and i > 0 for i in ids)
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 15
    occupied: set[tuple[int, int]] = set()
    for p in panels:
        where = f"panel {p['id']} {p.get('title')!r}"
        if p["type"] == "row":
            assert "targets" not in p, where
        else:
            assert p["datasource"] == DATASOURCE, where
            assert p["targets"], where
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs)), where
            for t in p["targets"]:
                assert t["datasource"] == DATASOURCE, f"{where} target {t['refId']}"
                assert t["expr"].strip(), where
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, where
        cells = {(g["x"] + dx, g["y"] + dy) for dx in range(g["w"]) for dy in range(g["h"])}
        assert not cells & occupied, f"{where} overlaps another panel"
        occupied |= cells


def test_panels_cover_what_the_daemon_reports() -> None:
    used = set().union(*(parse(substitute(e)).metrics for _, e in expressions(load())))
    # Every metric the daemon registers is on the dashboard somewhere.
    registry = metrics_module.Metrics().registry
    families = {m.name for m in registry.collect()} | {
        m.name for m in metrics_module.ObjectStoreCollector().collect()
    }
    shown = {re.sub(r"_(total|bucket|count|sum|info)$", "", n) for n in used}
    assert families - shown == set(), f"not on the dashboard: {sorted(families - shown)}"


# --- promtool --------------------------------------------------------------------------------


def promtool_check_rules(
    tmp: Path, exprs: list[tuple[str, str]]
) -> subprocess.CompletedProcess[str]:
    """Each expression as a recording rule in one rules file, checked by ``promtool``."""
    rules = [
        {"record": f"dashboard:expr_{i}", "expr": expr, "labels": {"where": where}}
        for i, (where, expr) in enumerate(exprs)
    ]
    path = tmp / "dashboard.rules.yml"
    # JSON is YAML: no YAML library needed, and every string is quoted safely.
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}, indent=1))
    return subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )


@needs_promtool
def test_promtool_check_rules_rejects_a_broken_expression(tmp_path: Path) -> None:
    """The check below would catch a bad expression: promtool parses PromQL here."""
    for bad in ("sum(rate(x_total[5m])", "rate(x_total)", 'x{model=~"$model"}[$__rate_interval]'):
        r = promtool_check_rules(tmp_path, [("bad", bad)])
        assert r.returncode != 0, (bad, r.stdout + r.stderr)


@needs_promtool
def test_every_expression_parses_with_promtool(tmp_path: Path) -> None:
    exprs = [(where, substitute(expr)) for where, expr in expressions(load())]
    r = promtool_check_rules(tmp_path, exprs)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert f"SUCCESS: {len(exprs)} rules found" in out, out


# --- A live daemon ---------------------------------------------------------------------------


def _config(tmp: Path) -> Path:
    """Two models whose checkpoint dirs are empty: no export runs, so no TensorFlow."""
    lines = [
        "[daemon]",
        'metrics_address = "127.0.0.1:0"',
        'log_format = "json"',
        "rescan_interval_seconds = 1",
    ]
    for name in ("resnet", "bert"):
        (tmp / "ckpts" / name).mkdir(parents=True)
        lines += [
            "",
            "[[models]]",
            f'name = "{name}"',
            f'checkpoint_dir = "ckpts/{name}"',
            f'base_path = "serving/{name}"',
            'builder = "daemon.demo.model:build_model"',
        ]
    path = tmp / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def live_exposition(tmp_path: Path) -> Iterator[str]:
    """``/metrics`` of a running ``ckpt-exporter run`` once both models are initialised."""
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--config", str(_config(tmp_path))],
            env=child_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        body = ""
        while time.monotonic() < deadline and proc.poll() is None:
            events = [
                json.loads(line)
                for line in log_path.read_text(errors="replace").splitlines()
                if line.startswith("{")
            ]
            listening = [e for e in events if e["event"] == "metrics_listening"]
            if listening:
                port = listening[-1]["address"].rsplit(":", 1)[1]
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    body = r.read().decode()
                if all(f'model="{m}"' in body for m in ("resnet", "bert")):
                    break
            time.sleep(0.1)
        else:
            raise AssertionError(f"no /metrics with both models; log:\n{log_path.read_text()}")
        yield body
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def series(exposition: str) -> dict[str, list[dict[str, str]]]:
    """Sample name (as PromQL sees it, with its suffix) -> the label sets it has."""
    out: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            out.setdefault(s.name, []).append(s.labels)
    return out


def object_store_exposition(monkeypatch: pytest.MonkeyPatch) -> str:
    """The daemon's ObjectStoreCollector after one of each kind of traffic, as backends count it.

    A fresh :class:`Traffic` stands in for the process-wide one (left untouched).
    """
    traffic = Traffic()
    traffic.request("s3", "upload", "ok")
    traffic.request("s3", "get", "not_found")
    traffic.uploaded("s3", 10)
    traffic.downloaded("s3", 20)
    traffic.retry("s3")
    monkeypatch.setattr(metrics_module, "TRAFFIC", traffic)
    registry = CollectorRegistry()
    registry.register(metrics_module.ObjectStoreCollector())
    return generate_latest(registry).decode()


def test_every_metric_on_the_dashboard_is_in_a_live_scrape(
    live_exposition: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = series(live_exposition)
    store = series(object_store_exposition(monkeypatch))
    assert store and all(n.startswith("ckpt_exporter_object_store_") for n in store)
    # Object-store families are declared in the live exposition (HELP/TYPE) but have
    # no samples until a store is used; the collector's exposition above has them.
    for name in store:
        family = re.sub(r"_total$", "", name)
        assert re.search(rf"^# TYPE {family}(_total)? counter$", live_exposition, re.M), family
        assert name not in live, f"{name}: object-store traffic in a daemon that used none?"
    known = {**live, **store}
    # The scrape job whose `up` the dashboard reads is the README's.
    assert re.search(r"^\s*- job_name: ckpt-exporter$", README.read_text(), re.M)

    for where, expr in expressions(load()):
        parsed = parse(substitute(expr))
        for name, matchers in parsed.selectors:
            if name in SCRAPE_SERIES:
                assert matchers == [("job", "=", "ckpt-exporter")], where
                continue
            assert name, f"{where}: a selector without a metric name"
            assert name in known, f"{where}: {name} is not in the daemon's /metrics"
            labels = {k for labelset in known[name] for k in labelset}
            for label, op, value in matchers:
                assert label in labels, f"{where}: {name} has no label {label}"
                if op == "=":
                    values = {ls.get(label) for ls in known[name]}
                    assert value in values, f"{where}: {name}{{{label}={value!r}}}: {values}"
        # Every grouping label is a label of a metric the expression reads.
        labels = {k for n in parsed.metrics - SCRAPE_SERIES for ls in known[n] for k in ls}
        assert parsed.grouping <= labels, f"{where}: {sorted(parsed.grouping - labels)}"
    # The model variable's metric carries the model label for every configured model.
    models = {ls["model"] for ls in live["ckpt_exporter_exports_total"]}
    assert models == {"resnet", "bert"}
