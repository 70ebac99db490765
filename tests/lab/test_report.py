import json

from normlab.lab import engine
from normlab.lab.experiments import EXPERIMENTS
from normlab.lab.report import readme_table, write_report


def _summary(name, verdict, checks):
    return {"name": name, "verdict": verdict, "indicative": False, "checks": checks}


def test_readme_table_has_one_row_per_experiment_with_paper_ours_ci_and_verdict():
    ci_check = {"text": "BN beats no BN by more than 1 point", "claim": ">", "paper": "+4 points (Table 1)",
                "value": "+9.8 points [+8.3 points, +11.4 points]", "summary": "+9.8 points ± 1.2 points",
                "ci_text": "[+8.3 points, +11.4 points]", "status": "pass"}
    yes_no = {"text": "a yes/no condition", "value": "2/2 seeds pass", "status": "pass"}
    table = readme_table([_summary("ioffe-mnist", "reproduced", [yes_no, ci_check]),
                          _summary("old", "inconclusive", [yes_no | {"status": "unclear"}])])
    lines = table.splitlines()
    assert lines[0] == ("| experiment | headline check | paper | ours (mean ± SD over seeds) | 95% CI | verdict |")
    assert len(lines) == 4  # header, rule, one row per experiment
    assert lines[2] == ("| `ioffe-mnist` | BN beats no BN by more than 1 point | +4 points (Table 1) | +9.8 points ± "
                        "1.2 points | [+8.3 points, +11.4 points] | reproduced (2/2 checks pass) |")
    assert lines[3] == "| `old` | a yes/no condition | — | 2/2 seeds pass | — | inconclusive (0/1 checks pass) |"


def test_report_redecides_from_the_saved_runs_and_writes_the_readme_table(tmp_path, tiny_fashion):
    exp = EXPERIMENTS["ioffe-mnist"]
    out = tmp_path / "out"
    outcome = engine.run_lab([exp], engine.LabSettings(out=out, suite="smoke", data_dir=tiny_fashion, device="cpu",
                                                       seeds=2))
    path = engine.experiment_path(out, exp.name)
    saved = json.loads(path.read_text())
    stale = saved | {"verdict": "stale", "checks": [c | {"status": "stale"} for c in saved["checks"]]}
    path.write_text(json.dumps(stale))
    _, md = write_report(out, [exp])  # as saved
    assert "stale" in md.read_text() and "stale" in (out / "readme-table.md").read_text()
    _, md = write_report(out, [exp], redecide=True)
    fresh = json.loads(path.read_text())
    assert fresh["verdict"] == outcome.summaries[exp.name]["verdict"] and fresh["checks"] == saved["checks"]
    table = (out / "readme-table.md").read_text()
    assert "stale" not in md.read_text() and table.count("\n") == 3 and "`ioffe-mnist`" in table
    assert "noise floor" in md.read_text()
