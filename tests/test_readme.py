"""README.md stays a one-screen entry: under 250 lines, the test command is exactly what
.ci/run runs, and every result file that README.md and docs/RESULTS.md cite exists under
benchmarks/results/ (docs/RESULTS.md holds the tables, each with its file and date)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
RESULTS = (ROOT / "docs" / "RESULTS.md").read_text()


def test_readme_is_short_and_its_test_command_is_what_ci_runs():
    assert len(README.splitlines()) < 250
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    commands = [line for line in README.splitlines() if line.startswith("pip install")]
    assert commands == [ci.replace('-e ".[test]" && python -m pytest -q tests',
                                   "-e . && compact-train"), ci]
    assert "docs/RESULTS.md" in README


def test_cited_result_files_exist():
    names = set(re.findall(r"`((?:mt|steptime|convergence|zero_stages|tp_invariance|"
                           r"projection_cost|merge_cost|estimate_cost|eigh_cost|profile|"
                           r"scaling)[\w.*/-]*)`", README + RESULTS))
    assert len(names) > 20
    results = ROOT / "benchmarks" / "results"
    for name in names:
        stem = name.split("{")[0].rstrip("./*")
        assert list(results.glob(stem + "*")), name
    for section in re.findall(r"^## .*\(current: (.*)\)$", RESULTS, re.M):
        assert re.search(r"\d{4}-\d\d-\d\d", section), section  # every current table dated
