"""`promtool` on the shipped Prometheus files: config syntax, rule syntax, and alert unit tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

from deploy_helpers import ALERTS_YML, PROMETHEUS_YML, ROOT


def promtool(binary: str, *args: str, cwd: Path = ROOT) -> str:
    r = subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"promtool {' '.join(args)} failed ({r.returncode}):\n{out}"
    return out


def test_promtool_check_config(promtool_bin):
    # resolves rule_files relative to the config, so alerts.yml is checked too
    out = promtool(promtool_bin, "check", "config", str(PROMETHEUS_YML))
    assert "1 rule files found" in out


def test_promtool_check_rules(promtool_bin):
    promtool(promtool_bin, "check", "rules", str(ALERTS_YML))


def test_promtool_alert_unit_tests(promtool_bin):
    promtool(promtool_bin, "test", "rules", str(Path(__file__).with_name("alerts_test.yml")))
