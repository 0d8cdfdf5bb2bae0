"""The Prometheus example (examples/prometheus): its scrape config, alerting rules and their unit
tests pass promtool (examples/prometheus/check.sh), and the checks can fail: a rules file with a
broken expression fails `promtool check rules`, and a unit test expecting the wrong alert fails
`promtool test rules`. The rules name only metrics drun exports (src/metrics/metrics.cpp), and
every alert has a case that fires it and one that does not.

promtool is Debian's prometheus package (scripts/bootstrap.sh installs it). Without it these tests
skip, unless CI is set, where they fail. No drun binary is needed."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "prometheus"
PROMTOOL = shutil.which("promtool")
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


@pytest.fixture
def promtool():
    if not PROMTOOL:
        if IN_CI:
            pytest.fail("promtool is not installed, and CI is set: scripts/bootstrap.sh installs Debian's "
                        "prometheus package")
        pytest.skip("promtool is not installed (Debian's prometheus package; scripts/bootstrap.sh installs it)")
    return PROMTOOL


def run(args, cwd, env=None):
    p = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, env=env)
    p.log = f"\n$ {' '.join(map(str, args))}  (in {cwd})\nexit status: {p.returncode}\n" \
            f"--- stdout ---\n{p.stdout}--- stderr ---\n{p.stderr}"
    return p


def copy_example(tmp_path):
    for name in ("prometheus.yml", "rules.yml", "rules_test.yml"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    return tmp_path


def replace_once(path, old, new, after=None):
    """Replace the first `old` in `path` (the first after `after`, if given); it must be there."""
    text = path.read_text()
    start = text.index(after) if after else 0
    at = text.index(old, start)
    path.write_text(text[:at] + new + text[at + len(old):])


def test_check_sh_passes(promtool):
    check = EXAMPLE / "check.sh"
    assert os.access(check, os.X_OK), f"{check} is not executable"
    # Run from elsewhere: the script must find its files from its own directory.
    p = run(["bash", str(check)], cwd=ROOT / "tests", env={**os.environ, "PROMTOOL": promtool})
    assert p.returncode == 0, p.log
    out = p.stdout + p.stderr
    assert "prometheus.yml is valid" in out, p.log
    assert "Unit Testing:  rules_test.yml" in out or "Unit Testing: rules_test.yml" in out, p.log
    assert "FAILED" not in out, p.log


def test_check_sh_fails_without_promtool(tmp_path):
    p = run(["bash", str(EXAMPLE / "check.sh")], cwd=tmp_path,
            env={**os.environ, "PROMTOOL": str(tmp_path / "no-such-promtool")})
    assert p.returncode != 0, p.log
    assert "promtool not found" in p.stderr, p.log


def test_broken_rule_fails_check(promtool, tmp_path):
    d = copy_example(tmp_path)
    assert run([promtool, "check", "rules", "rules.yml"], cwd=d).returncode == 0  # the copy is good
    # An undefined function in one alert, DrunScrubFindings.
    replace_once(d / "rules.yml", "increase(", "increse(", after="alert: DrunScrubFindings")
    assert "increse(" in (d / "rules.yml").read_text()
    p = run([promtool, "check", "rules", "rules.yml"], cwd=d)
    assert p.returncode != 0, p.log
    assert 'unknown function with name "increse"' in p.stdout + p.stderr, p.log
    # check config loads rule_files too, so it fails as well.
    p = run([promtool, "check", "config", "prometheus.yml"], cwd=d)
    assert p.returncode != 0, p.log


@pytest.mark.parametrize("old,new,after", [
    # The firing DrunDigestMismatch case expects the wrong severity ...
    ("severity: critical", "severity: warning", "alertname: DrunDigestMismatch"),
    # ... or the wrong count in its description ...
    ('description: "3 piece(s)', 'description: "4 piece(s)', "alertname: DrunDigestMismatch"),
    # ... or a firing alert where none fires (DrunFetchFailures is still pending at 8m) ...
    ("exp_alerts: []", "exp_alerts:\n          - exp_labels: {severity: warning, job: node, instance: node1:9100}",
     "alertname: DrunFetchFailures"),
    # ... or no alert where one fires (DrunPeerBanned's quiet case moved to 10m, inside the window).
    ("eval_time: 30m\n        alertname: DrunPeerBanned", "eval_time: 10m\n        alertname: DrunPeerBanned", None),
], ids=["severity", "annotation", "pending-not-firing", "missed-alert"])
def test_wrong_expectation_fails_unit_tests(promtool, tmp_path, old, new, after):
    d = copy_example(tmp_path)
    assert run([promtool, "test", "rules", "rules_test.yml"], cwd=d).returncode == 0  # the copy passes
    replace_once(d / "rules_test.yml", old, new, after=after)
    p = run([promtool, "test", "rules", "rules_test.yml"], cwd=d)
    assert p.returncode != 0, p.log
    alert = re.search(r"alertname: (\w+)", old + (after or "")).group(1)
    assert "FAILED" in p.stdout + p.stderr and f"alertname: {alert}," in p.stdout + p.stderr, p.log


def test_rules_name_only_exported_metrics():
    exported = set(re.findall(r'"(drun_[a-z_]+)"', (ROOT / "src" / "metrics" / "metrics.cpp").read_text()))
    assert "drun_fetch_pieces_rejected_total" in exported, "cannot read the exported names"
    used = set()
    for line in (EXAMPLE / "rules.yml").read_text().splitlines():
        if line.strip().startswith("expr:"):
            used |= set(re.findall(r"\bdrun_[a-z_]+", line))
    assert used, "no metric found in the rules' expressions"
    assert used <= exported, f"rules.yml uses metrics drun does not export: {sorted(used - exported)}"


def test_every_alert_has_firing_and_quiet_cases():
    alerts = re.findall(r"^\s*- alert: (\w+)", (EXAMPLE / "rules.yml").read_text(), re.M)
    assert len(alerts) >= 6, alerts
    cases = re.split(r"\n\s*- eval_time:", (EXAMPLE / "rules_test.yml").read_text())[1:]
    for alert in alerts:
        mine = [c for c in cases if re.search(rf"alertname: {alert}\s*\n", c)]
        assert any("exp_alerts: []" in c for c in mine), f"{alert}: no case where it does not fire"
        assert any("exp_labels:" in c and "exp_annotations:" in c for c in mine), \
            f"{alert}: no case where it fires, with labels and annotations"
