"""Tests for the monitoring artefacts in deploy/: the alerting rules and the Grafana dashboard.

They name only metrics (and labels) that smsp really exports, the dashboard is
a well-formed Grafana model whose queries parse as PromQL, and a live
``/metrics`` scrape passes ``promtool check metrics``.  promtool comes from
Debian's prometheus package, which ``make test`` installs: a missing promtool
fails these tests, it never skips them.  ``make promtool`` runs ``promtool
check rules`` and the rules' unit tests (deploy/prometheus-rules.test.yaml).
"""

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import smsp
from testkit import EMAIL, make_config, running

DEPLOY = Path(__file__).parent / "deploy"
RULES = DEPLOY / "prometheus-rules.yaml"
RULE_TESTS = DEPLOY / "prometheus-rules.test.yaml"
DASHBOARD = DEPLOY / "grafana-dashboard.json"

# Labels Prometheus or smsp put on every series, on top of a family's own.
TARGET_LABELS = {"job", "instance", "worker"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not on PATH; `make test` installs it (Debian package "
                    "prometheus)")
    return subprocess.run([path, *args], input=stdin, capture_output=True, text=True,
                          timeout=60, check=False)


# ------------------------------------------------------ names out of PromQL ---

PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
                   "group_right", "offset", "bool", "inf", "nan"}
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
SELECTOR = re.compile(r"(?<![\w.:])([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# Not inside a number or a duration (1e3, 10m), whole, and not a function call.
IDENTIFIER = re.compile(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()")


def _without_strings(expr: str) -> str:
    """Label values and regexes blanked: they may hold anything, even `$job` or braces."""
    return STRING.sub('""', expr)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana query) selects."""
    text = _without_strings(expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers: label names
    text = LABEL_LIST.sub(" ", text)  # grouping and matching lists: label names
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries: durations, $__range
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables elsewhere
    return {name for name in IDENTIFIER.findall(text) if name.lower() not in PROMQL_KEYWORDS}


def matcher_labels(expr: str) -> set[tuple[str, str]]:
    """(metric name, label name) for each label matcher written after a metric name."""
    found = set()
    for name, matchers in SELECTOR.findall(_without_strings(expr)):
        if name.lower() not in PROMQL_KEYWORDS:
            found.update((name, label) for label in MATCHER_LABEL.findall(matchers))
    return found


@pytest.mark.parametrize(("expr", "names"), [
    ('histogram_quantile(0.99, sum by (le, provider) (rate(smsp_a_seconds_bucket'
     '{job=~"$job",route="/email"}[$__rate_interval])))', {"smsp_a_seconds_bucket"}),
    ("sum by (job, from) (rate(a_total[10m])) / on (job) group_left sum(b_total) > bool 0.05",
     {"a_total", "b_total"}),
    ("increase(c_total[10m]) > 0 or (c_total > 0 unless c_total offset 10m)", {"c_total"}),
    ('1e3 * max without (provider) (g) and on() vector(1) > Inf', {"g"}),
    ('label_replace(up, "dst", "$1", "src", "(.*)")', {"up"}),
    ('sum(rate(x_count[5m])) by (le) / sum(rate(x_sum[5m:1m]))', {"x_count", "x_sum"}),
    ("count by (version) (smsp_build_info)", {"smsp_build_info"}),
])
def test_metric_names_finds_selected_metrics_and_nothing_else(expr: str, names: set[str]
                                                              ) -> None:
    assert metric_names(expr) == names


def test_matcher_labels_names_each_label_with_its_metric() -> None:
    expr = 'a{x="1", y=~"a,b}"} / b{z!="{"} + rate(c[5m])'
    assert matcher_labels(expr) == {("a", "x"), ("a", "y"), ("b", "z")}


# ------------------------------------------------- what the artefacts query ---


def load_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load(RULES.read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    flat = []
    for panel in dashboard["panels"]:
        flat.append(panel)
        flat.extend(panel.get("panels", ()))  # a collapsed row holds its panels
    return [p for p in flat if p["type"] != "row"]


def variable_selector(variable: dict[str, Any]) -> str:
    """The series selector of a `label_values(selector, label)` variable query."""
    query = variable["query"]
    text = query["query"] if isinstance(query, dict) else query
    found = re.fullmatch(r"label_values\(\s*(.+?)\s*,\s*[a-zA-Z_]\w*\s*\)", text)
    assert found, f"variable {variable['name']}: not label_values(selector, label): {text}"
    return found.group(1)


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    queries = [(f"panel {p['title']!r} {t['refId']}", t["expr"])
               for p in panels(dashboard) for t in p["targets"]]
    queries += [(f"variable {v['name']}", variable_selector(v))
                for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return queries


def all_queries() -> list[tuple[str, str]]:
    rules = [(f"alert {r['alert']}", r["expr"]) for r in load_rules()]
    return rules + dashboard_queries(load_dashboard())


# ----------------------------------------------------- what a scrape exports ---


def exported_names(exposition: str) -> set[str]:
    """Series names a scrape offers to PromQL: a histogram's only under its suffixes."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            if kind == "histogram":
                names.update(name + suffix for suffix in HISTOGRAM_SUFFIXES)
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][\w:]*", line).group())
    return names


def family_labels(name: str) -> set[str] | None:
    """The labels a series name may carry, or None for a name of no family."""
    families = {f.name: f.labels for f in smsp.FAMILIES}
    if name in families:
        return set(families[name]) | TARGET_LABELS
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and base in families:
            return set(families[base]) | TARGET_LABELS | ({"le"} if suffix == "_bucket" else set())
    return None


@pytest.fixture(scope="module")
def scrape() -> Iterator[str]:
    """/metrics of the real server after a send, a failed send (circuit opens) and a poll."""
    with running(make_config()) as server:
        assert server.send()[0] == 200
        assert server.send({**EMAIL, "subject": "fail"})[0] >= 500
        server.timers.fire_next()  # the poll succeeds: the circuit closes
        server.lines.events("access", at_least=2)
        status, _, body = server.request("GET", "/metrics")
    assert status == 200
    yield body.decode()


def test_exported_names_offer_histograms_only_with_their_suffixes() -> None:
    text = ("# HELP a_total A.\n# TYPE a_total counter\na_total 1\n"
            "# HELP b_seconds B.\n# TYPE b_seconds histogram\n")
    assert exported_names(text) == {"a_total", "b_seconds_bucket", "b_seconds_sum",
                                    "b_seconds_count"}


def test_a_scrape_names_every_family_before_its_first_sample() -> None:
    with running(make_config()) as server:
        body = server.request("GET", "/metrics")[2].decode()
    typed = {line.split()[2] for line in body.splitlines() if line.startswith("# TYPE ")}
    assert typed == {f.name for f in smsp.FAMILIES}
    assert "smsp_failovers_total{" not in body  # nothing counted yet, but the name is there


def test_rules_and_dashboard_name_only_metrics_a_live_scrape_exports(scrape: str) -> None:
    exported = exported_names(scrape)
    unknown = {}
    for source, expr in all_queries():
        names = metric_names(expr)
        assert names, f"{source}: no metric name found in {expr!r}"
        if names - exported:
            unknown[source] = sorted(names - exported)
    assert unknown == {}


def test_the_name_check_rejects_names_no_scrape_exports(scrape: str) -> None:
    exported = exported_names(scrape)
    wrong = {"smsp_http_request_duration_seconds", "smsp_http_requests_total_bucket",
             "smsp_circuit_open_count", "smsp_no_such_metric_total"}
    assert "smsp_http_request_duration_seconds_bucket" in exported
    assert wrong & exported == set()


def test_rules_and_dashboard_match_only_labels_their_metrics_carry() -> None:
    wrong = {}
    for source, expr in all_queries():
        for name, label in matcher_labels(expr):
            allowed = family_labels(name)
            if allowed is not None and label not in allowed:
                wrong.setdefault(source, []).append(f"{name}{{{label}}}")
    assert wrong == {}


# -------------------------------------------------------- promtool's lint ---


def test_a_live_scrape_passes_promtool_check_metrics(scrape: str) -> None:
    assert "smsp_circuit_transitions_total{" in scrape  # the scrape has counted something
    result = promtool("check", "metrics", stdin=scrape)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_every_family_with_samples_and_workers_passes_promtool_check_metrics() -> None:
    metrics = smsp.Metrics(worker=2)
    gauges = {}
    for family in smsp.FAMILIES:
        labels = tuple(f"{label}-value" for label in family.labels)
        if family.kind == "counter":
            metrics.inc(family.name, *labels)
        elif family.kind == "histogram":
            metrics.observe(family.name, 0.02, *labels)
        else:
            gauges[family.name] = [(labels, 1)]
    text = metrics.render(gauges)
    result = promtool("check", "metrics", stdin=text)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    samples = {line.split("{")[0] for line in text.splitlines() if not line.startswith("#")}
    assert len(samples) == len(smsp.FAMILIES) + 2 * sum(  # _bucket, _sum and _count
        f.kind == "histogram" for f in smsp.FAMILIES)


def test_promtool_check_metrics_reports_a_badly_named_counter() -> None:
    result = promtool("check", "metrics", stdin="# TYPE smsp_sends counter\nsmsp_sends 1\n")
    assert result.returncode != 0
    assert '"_total" suffix' in result.stdout + result.stderr
    assert "no help text" in result.stdout + result.stderr


# --------------------------------------------------------------- the rules ---


def test_every_alert_has_a_severity_a_summary_and_a_description() -> None:
    for rule in load_rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]


def test_every_alert_fires_in_the_rules_unit_tests() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"]
             if case["exp_alerts"]}
    quiet = {case["alertname"] for test in tests for case in test["alert_rule_test"]
             if not case["exp_alerts"]}
    alerts = {rule["alert"] for rule in load_rules()}
    assert alerts - fired == set()
    assert alerts - quiet == set()  # and each is also shown not firing


# ----------------------------------------------------------- the dashboard ---


def test_the_dashboard_is_a_grafana_model_on_a_datasource_variable() -> None:
    dashboard = load_dashboard()
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["title"] and dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        assert panel["title"] and panel["type"] in {"timeseries", "stat", "state-timeline"}
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == panel["datasource"]


def test_dashboard_panels_sit_on_the_grid_without_overlapping() -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in load_dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def test_dashboard_queries_use_only_defined_variables() -> None:
    dashboard = load_dashboard()
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    builtin = {"__rate_interval", "__range", "__interval"}
    for source, expr in dashboard_queries(dashboard):
        used = set(re.findall(r"\$\{?(\w+)\}?", expr))
        assert used <= defined | builtin, source


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    # promtool parses PromQL only in rule files: each query becomes a recording rule,
    # with Grafana's interval variables replaced by durations.
    durations = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m"}
    rules = []
    for number, (_, expr) in enumerate(dashboard_queries(load_dashboard())):
        for variable, duration in durations.items():
            expr = expr.replace(variable, duration)
        rules.append({"record": f"dashboard:query_{number}", "expr": expr})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
