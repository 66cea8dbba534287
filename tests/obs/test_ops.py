"""ops/: the alert rules pass promtool, and every query in the rules and the dashboard
reads only metrics the service exports (memsvc/obs/metrics.py); the runbook covers each alert."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from tests.obs.conftest import OPS, exported_series, metric_names

RULES = OPS / "prometheus" / "alerts.yml"
DASHBOARD = OPS / "grafana" / "memsvc.json"
RUNBOOK = OPS / "RUNBOOK.md"
SETUP_PROMTOOL = OPS.parent / "scripts" / "setup-promtool"


@pytest.fixture(scope="module")
def promtool() -> str:
    """promtool, fetched by scripts/setup-promtool when it is not on PATH."""
    done = subprocess.run(
        [SETUP_PROMTOOL], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, f"scripts/setup-promtool failed:\n{done.stderr}"
    return done.stdout.strip().splitlines()[-1]


def run(promtool: str, *args: str) -> str:
    done = subprocess.run(
        [promtool, *args], cwd=RULES.parent, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    def panels(items: list[dict]):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in panels(dashboard["panels"]) for t in p.get("targets", [])]


def test_rules_are_valid(promtool):
    assert f"SUCCESS: {len(alert_rules())} rules found" in run(
        promtool, "check", "rules", RULES.name
    )


def test_rules_pass_their_unit_tests(promtool):
    assert "SUCCESS" in run(promtool, "test", "rules", "alerts.test.yml")


def test_every_alert_has_a_unit_test():
    tested = set(re.findall(r"alertname: (\w+)", (RULES.parent / "alerts.test.yml").read_text()))
    assert tested == {rule["alert"] for rule in alert_rules()}


@pytest.mark.parametrize(
    "source, exprs",
    [
        ("alerts.yml", [rule["expr"] for rule in alert_rules()]),
        ("memsvc.json", dashboard_exprs()),
    ],
)
def test_queries_read_only_exported_metrics(source, exprs):
    exported = exported_series()
    assert exprs, f"{source} has no queries"
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"{source}: a query reads no memsvc metric: {expr}"
        assert names <= exported.keys(), f"{source}: not exported: {names - exported.keys()}"


def test_the_dashboard_shows_every_metric():
    exported = exported_series()
    shown = {exported[name] for expr in dashboard_exprs() for name in metric_names(expr)}
    assert shown == set(exported.values())


def test_the_runbook_has_a_section_per_alert():
    headings = set(re.findall(r"^## (\w+)$", RUNBOOK.read_text(), flags=re.MULTILINE))
    rules = alert_rules()
    assert headings == {rule["alert"] for rule in rules}
    for rule in rules:
        assert rule["annotations"]["runbook"] == f"ops/RUNBOOK.md#{rule['alert'].lower()}"
