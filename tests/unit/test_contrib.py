"""The operators' kit in contrib/: the Grafana dashboard and the Prometheus rules.

Every PromQL expression they hold may name only series relayd exports (computed here from
the code, not from a list), with only the labels those series carry; the rules pass
``promtool check rules`` and their unit tests; docs/operations.md lists the same alerts.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from relayd.metric_series import CounterFamily, GaugeFamily, HistogramFamily
from relayd.metrics import RelayMetrics, _affinity_families, _cache_families, _families
from relayd.workers.admin import DaemonMetrics
from relayd.workers.merge import PER_WORKER

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "contrib" / "grafana" / "relayd.json"
RULES = REPO / "contrib" / "prometheus" / "relayd-rules.yml"
RULES_TEST = REPO / "contrib" / "prometheus" / "relayd-rules.test.yml"
OPERATIONS = REPO / "docs" / "operations.md"

DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
#: Labels Prometheus adds to every scraped series (the target's).
TARGET_LABELS = frozenset({"job", "instance"})

# -- what relayd exports ----------------------------------------------------------------

#: (family name, type, label names) of one metric family.
FamilyInfo = tuple[str, str, tuple[str, ...]]


def registry_families(registry: CollectorRegistry) -> Iterator[FamilyInfo]:
    """The families of ``registry`` with their label names.

    Names and types come from ``registry.collect()``. A labelled metric with no child yet
    has no samples, so the label names are read from the registered collectors
    (prometheus-client keeps them in ``_labelnames``, relayd.metric_series families in
    ``labelnames``).
    """
    labels: dict[str, tuple[str, ...]] = {}
    for collector in registry._collector_to_names:
        if isinstance(collector, MetricWrapperBase):
            labels[collector._name] = tuple(collector._labelnames)
        elif isinstance(collector, (CounterFamily, GaugeFamily, HistogramFamily)):
            labels[collector.name] = collector.labelnames
    for family in registry.collect():
        yield family.name, family.type, labels.get(family.name, ())


def built_families(families: Iterable[Any]) -> Iterator[FamilyInfo]:
    """Families made at scrape time (``*MetricFamily`` objects), with their label names."""
    for family in families:
        yield family.name, family.type, tuple(getattr(family, "_labelnames", ()))


def exported_series() -> dict[str, frozenset[str]]:
    """Every sample name relayd can export, with the label names it may carry.

    Counters export ``NAME_total`` and ``NAME_created``, histograms ``_bucket`` (with
    ``le``), ``_count``, ``_sum`` and ``_created``, gauges ``NAME``. The families of
    :data:`~relayd.workers.merge.PER_WORKER` get a ``worker`` label with workers.
    """
    cache_stats = {
        "lookups": {"hit": 0}, "shared_hits": 0, "coalesced": 0, "stores": 0,
        "memory": {"evictions": 0, "entries": 0, "bytes": 0}, "shared": None,
    }
    affinity_stats = {"repins": {"gone": 0}, "hits": 0, "misses": 0, "pins": 0, "errors": 0}
    families = [
        *registry_families(RelayMetrics().registry),
        *built_families(_families()),
        *built_families(_cache_families(cache_stats)),
        *built_families(_affinity_families(affinity_stats)),
        *registry_families(DaemonMetrics().registry),
    ]
    series: dict[str, frozenset[str]] = {}
    for name, kind, labels in families:
        allowed = TARGET_LABELS | set(labels)
        if name in PER_WORKER:
            allowed |= {"worker"}
        if kind == "counter":
            samples = {f"{name}_total": allowed, f"{name}_created": allowed}
        elif kind == "histogram":
            samples = {f"{name}_{suffix}": allowed for suffix in ("count", "sum", "created")}
            samples[f"{name}_bucket"] = allowed | {"le"}
        elif kind == "gauge":
            samples = {name: allowed}
        else:
            raise AssertionError(f"{name}: metric type {kind!r} is not handled here")
        for sample, sample_labels in samples.items():
            series[sample] = series.get(sample, frozenset()) | sample_labels
    return series


EXPORTED = exported_series()

# -- PromQL -----------------------------------------------------------------------------

#: PromQL functions and aggregation operators (all of them, not only those used).
FUNCTIONS = frozenset("""
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes
    clamp clamp_max clamp_min cos cosh count_over_time days_in_month day_of_month
    day_of_week day_of_year deg delta deriv exp floor histogram_quantile holt_winters hour
    idelta increase irate label_join label_replace last_over_time ln log10 log2
    mad_over_time max_over_time min_over_time minute month pi predict_linear
    present_over_time quantile_over_time rad rate resets round scalar sgn sin sinh sort
    sort_desc sqrt stddev_over_time stdvar_over_time sum_over_time tan tanh time timestamp
    vector year
    sum min max avg group stddev stdvar count count_values bottomk topk quantile
""".split())
KEYWORDS = frozenset(
    "and or unless bool offset inf nan by without on ignoring group_left group_right".split()
)
LABEL_LISTS = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^{}]*)\}")
MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*""\s*')
IDENTIFIER = re.compile(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*")


def promql_problems(expr: str, series: dict[str, frozenset[str]] = EXPORTED) -> list[str]:
    """What is wrong with the names in ``expr``: metric names relayd does not export,
    selector labels the metric does not carry, unknown functions. Empty when all is well.

    Every identifier outside strings, label matchers, ranges and label lists (``by (...)``
    and the like) is a function (followed by ``(``), a keyword, or a metric name, and a
    metric name must be one of ``series``. Grafana's ``$variables`` are ignored.
    """
    problems: list[str] = []
    text = STRING.sub('""', expr)
    text = re.sub(r"\$\{[^}]*\}|\$\w+", "", text)
    for selector in SELECTOR.finditer(text):
        name, matchers = selector.group(1), selector.group(2)
        if not name:
            problems.append(f"a selector without a metric name: {selector.group(0)}")
            continue
        if name not in series:
            continue  # reported below, with the bare names
        for matcher in filter(str.strip, matchers.split(",")):
            match = MATCHER.fullmatch(matcher)
            if not match:
                problems.append(f"{name}: cannot read the matcher {matcher.strip()!r}")
            elif match.group(1) not in series[name]:
                problems.append(f"{name} has no label {match.group(1)!r}")
    text = SELECTOR.sub(lambda m: m.group(1) or "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = LABEL_LISTS.sub("", text)
    for identifier in IDENTIFIER.finditer(text):
        word = identifier.group(0)
        if text[identifier.end():].lstrip().startswith("("):
            if word not in FUNCTIONS:
                problems.append(f"unknown function {word}()")
        elif word.lower() not in KEYWORDS and word not in series:
            problems.append(f"relayd exports no metric {word}")
    return problems


def test_exported_series_come_from_the_code() -> None:
    assert "relayd_requests_total" in EXPORTED
    assert "relayd_requests" not in EXPORTED
    assert EXPORTED["relayd_request_duration_seconds_bucket"] >= {"api", "provider", "le"}
    assert "le" not in EXPORTED["relayd_request_duration_seconds_count"]
    assert "relayd_backend_breaker_state" in EXPORTED  # _families()
    assert "worker" in EXPORTED["relayd_backend_healthy"]
    assert "worker" in EXPORTED["relayd_client_connections_accepted_total"]
    assert "worker" not in EXPORTED["relayd_requests_total"]
    assert "relayd_cache_lookups_total" in EXPORTED  # _cache_families()
    assert "relayd_affinity_repins_total" in EXPORTED  # _affinity_families()
    assert EXPORTED["relayd_workers"] == TARGET_LABELS | {"state"}  # DaemonMetrics
    assert "worker" in EXPORTED["relayd_worker_restarts_total"]


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("rate(relayd_requests_totl[5m])", "relayd exports no metric relayd_requests_totl"),
        ("sum(rate(relayd_requests[5m]))", "relayd exports no metric relayd_requests"),
        ("relayd_request_duration_seconds", "no metric relayd_request_duration_seconds"),
        ("up == 0", "relayd exports no metric up"),
        ('relayd_workers{status="starting"} > 0', "relayd_workers has no label 'status'"),
        ('relayd_requests_total{worker="1"}', "relayd_requests_total has no label 'worker'"),
        ('{__name__="relayd_workers"}', "a selector without a metric name"),
        ("histogram_quantil(0.5, relayd_queue_wait_seconds_bucket)", "unknown function"),
        ("relayd_streams_open + relayd_stream_open", "no metric relayd_stream_open"),
    ],
)
def test_promql_problems_finds_bad_names(expr: str, problem: str) -> None:
    problems = promql_problems(expr)
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize(
    "expr",
    [
        'sum by (le) (rate(relayd_queue_wait_seconds_bucket{job=~"$job", le="+Inf"}[5m]))',
        'sum without (worker) (label_replace(relayd_backend_healthy, "x", "${1}", "backend",'
        ' "(.*)")) offset 5m',
        "relayd_streams_open / on(instance) group_left relayd_requests_in_flight > bool 1e3",
    ],
)
def test_promql_problems_accepts_good_expressions(expr: str) -> None:
    assert promql_problems(expr) == []


# -- the dashboard ----------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


def panels(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included; rows themselves too."""
    for panel in document["panels"]:
        yield panel
        yield from panel.get("panels", ())


def dashboard_exprs(document: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every query of the dashboard."""
    for panel in panels(document):
        for target in panel.get("targets", ()):
            yield f"panel {panel['title']!r}", target["expr"]
    for annotation in document["annotations"]["list"]:
        if "expr" in annotation:
            yield f"annotation {annotation['name']!r}", annotation["expr"]
    for variable in document["templating"]["list"]:
        query = variable["query"]
        query = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert match, f"variable {variable['name']}: {query}"
        assert match.group(2) in EXPORTED["relayd_build_info"], query
        yield f"variable {variable['name']!r}", match.group(1)


def test_dashboard_is_importable() -> None:
    document = dashboard()
    assert document["schemaVersion"] >= 36
    assert document["id"] is None and document["uid"] == "relayd"
    assert document["__inputs"] == [{
        "name": "DS_PROMETHEUS", "label": "Prometheus",
        "description": document["__inputs"][0]["description"],
        "type": "datasource", "pluginId": "prometheus", "pluginName": "Prometheus",
    }]
    variables = {v["name"]: v for v in document["templating"]["list"]}
    assert set(variables) == {"job", "instance"}
    assert variables["instance"]["definition"].startswith("label_values(relayd_build_info")
    for variable in variables.values():
        assert variable["datasource"] == DATASOURCE


def test_dashboard_panels_query_prometheus() -> None:
    document = dashboard()
    assert document["panels"]
    ids = [panel["id"] for panel in panels(document)]
    assert len(ids) == len(set(ids))
    queries = 0
    for panel in panels(document):
        if panel["type"] == "row":
            assert not panel.get("targets"), panel["title"]
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"] == DATASOURCE, panel["title"]
            queries += 1
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
    assert queries >= 20


def test_dashboard_queries_name_only_exported_metrics() -> None:
    exprs = list(dashboard_exprs(dashboard()))
    problems = [f"{where}: {p}" for where, expr in exprs for p in promql_problems(expr)]
    assert problems == []
    named = {m for _where, expr in exprs for m in re.findall(r"relayd_[a-z_]+", expr)}
    for metric in [
        "relayd_requests_total", "relayd_request_duration_seconds_bucket",
        "relayd_time_to_first_byte_seconds_bucket", "relayd_relay_overhead_seconds_bucket",
        "relayd_streams_open", "relayd_requests_in_flight", "relayd_tokens_total",
        "relayd_backend_healthy", "relayd_backend_breaker_state",
        "relayd_limit_rejections_total", "relayd_config_reloads_total",
        "relayd_config_last_reload_success_timestamp_seconds", "relayd_worker_restarts_total",
        "relayd_workers", "relayd_client_connections_accepted_total",
        "relayd_upstream_attempts_total", "relayd_failovers_total",
        "relayd_edge_rejections_total", "relayd_queue_refusals_total",
        "relayd_client_disconnects_total",
    ]:
        assert metric in named, f"no panel shows {metric}"


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses every query, Grafana's variables filled in as Grafana would."""
    variables = {"$__rate_interval": "5m", "$job": ".*", "$instance": ".*"}
    records = []
    for index, (_where, expr) in enumerate(dashboard_exprs(dashboard())):
        for variable, value in variables.items():
            expr = expr.replace(variable, value)
        assert not re.search(r"\$(?!\{1\})", expr), expr  # only label_replace's ${1} is left
        records.append({"record": f"dashboard:query_{index}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    result = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_aggregates_away_the_worker_label() -> None:
    """Per-worker series are only used inside an aggregation that names its labels, so
    a panel shows the same series with one process or with workers."""
    for _where, expr in dashboard_exprs(dashboard()):
        for name in re.findall(r"relayd_[a-z_]+", expr):
            if "worker" in EXPORTED.get(name, ()) and name != "relayd_worker_restarts_total":
                assert re.search(r"\b(?:min|max|sum|avg) (?:by|without) \(", expr), expr


# -- the rules --------------------------------------------------------------------------


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is missing: install the Debian package prometheus "
            "(sh scripts/system-deps.sh)"
        )
    return path


def test_rules_are_alerts_with_severity_and_annotations() -> None:
    for rule in rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert re.fullmatch(r"Relayd[A-Z][A-Za-z]+", rule["alert"]), rule
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]


def test_rules_name_only_exported_metrics() -> None:
    problems = [f"{rule['alert']}: {p}" for rule in rules() for p in promql_problems(rule["expr"])]
    assert problems == []


def test_rules_aggregate_away_the_worker_label() -> None:
    for rule in rules():
        for name in re.findall(r"relayd_[a-z_]+", rule["expr"]):
            if "worker" in EXPORTED[name] and name != "relayd_worker_restarts_total":
                assert "without (worker)" in rule["expr"], rule["alert"]


def test_promtool_check_rules() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_test_rules() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", str(RULES_TEST)], capture_output=True, text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {
        test["alertname"]
        for case in yaml.safe_load(RULES_TEST.read_text())["tests"]
        for test in case["alert_rule_test"]
    }
    assert tested == {rule["alert"] for rule in rules()}


# -- the docs ---------------------------------------------------------------------------


def suggested_alerts_section() -> str:
    """docs/operations.md's "Suggested alerts" section, up to the next heading."""
    lines = OPERATIONS.read_text().splitlines()
    start = lines.index("### Suggested alerts") + 1
    section, fenced = [], False
    for line in lines[start:]:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,3} ", line):
            break
        section.append(line)
    return "\n".join(section)


def test_docs_list_the_rules_alerts() -> None:
    section = suggested_alerts_section()
    table = re.findall(r"^\| `(Relayd\w+)` \| (\w+) \|", section, re.MULTILINE)
    assert table == [(rule["alert"], rule["labels"]["severity"]) for rule in rules()]
    assert set(re.findall(r"\bRelayd[A-Z]\w+", section)) == {rule["alert"] for rule in rules()}
    assert "contrib/prometheus/relayd-rules.yml" in section
    assert "/usr/share/relayd/prometheus/relayd-rules.yml" in section


def test_docs_name_the_dashboard() -> None:
    text = OPERATIONS.read_text()
    dashboard_section = text.split("\n### Dashboard\n", 1)[1].split("\n#", 1)[0]
    assert "contrib/grafana/relayd.json" in dashboard_section
    assert "/usr/share/relayd/grafana/relayd.json" in dashboard_section
