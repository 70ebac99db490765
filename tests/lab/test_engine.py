import argparse
import json

import pytest

from normlab.lab import cli, engine
from normlab.lab.experiments import EXPERIMENTS
from normlab.lab.report import write_report
from normlab.lab.data import DEFAULT_FASHION_DIR as REAL_FASHION

NAMES = ["ioffe-mnist", "santurkar-lr", "noisy-bn", "ics", "ics-1e-7", "landscape", "lp-norm", "bjorck", "position",
         "batch-size", "sequence", "sync-bn", "scaling",
         "precise-stats", "domain-shift", "transfer", "fold", "loss-surface"]


def settings(tmp_path, data_dir, **kw):
    return engine.LabSettings(out=tmp_path / "out", suite="smoke", data_dir=data_dir, device="cpu", **kw)


def run_files(out):
    return sorted((out / "results" / "runs").glob("*.json"))


def test_the_experiments_exist():
    assert list(EXPERIMENTS) == NAMES


@pytest.fixture(scope="module")
def smoke_lab(tmp_path_factory, tiny_fashion):
    s = settings(tmp_path_factory.mktemp("smoke"), tiny_fashion)
    outcome = engine.run_lab(list(EXPERIMENTS.values()), s)
    write_report(s.out, list(EXPERIMENTS.values()))
    return s, outcome


def test_every_experiment_end_to_end(smoke_lab):
    s, outcome = smoke_lab
    html = (s.out / "report.html").read_text()
    md = (s.out / "report.md").read_text()
    assert "data:image/png;base64," in html
    for exp in EXPERIMENTS.values():
        summary = json.loads(engine.experiment_path(s.out, exp.name).read_text())
        assert summary["verdict"] in ("reproduced", "not reproduced", "inconclusive")
        assert summary["checks"] and summary["rows"]
        for digest in summary["runs"].values():
            assert engine.run_path(s.out, digest).is_file()
        for fig in exp.figures:
            png = s.out / f"{fig.name}.png"
            assert png.read_bytes()[:4] == b"\x89PNG"
            assert f"![{fig.name}]({fig.name}.png)" in md
        assert f"id='{exp.name}'" in html and f"## {exp.name}" in md
    assert not list(s.out.rglob("*.tmp"))


def test_rerun_reuses_and_force_redoes(smoke_lab, tiny_fashion, monkeypatch):
    s, first = smoke_lab
    calls = []
    real_train = engine.train
    monkeypatch.setattr(engine, "train", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    again = engine.run_lab([EXPERIMENTS["position"]], s)
    assert calls == [] and again.ran == 0 and again.reused == 5
    forced = engine.run_lab([EXPERIMENTS["position"]], engine.LabSettings(**{**vars(s), "force": True}))
    assert forced.ran == 5 and len(calls) == 5


def test_interrupted_lab_resumes_without_losing_runs(tmp_path, tiny_fashion, monkeypatch):
    s = settings(tmp_path, tiny_fashion)
    exps = [EXPERIMENTS["noisy-bn"]]
    real_train = engine.train
    calls = []

    def dies_after_first(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(engine, "train", dies_after_first)
    with pytest.raises(KeyboardInterrupt):
        engine.run_lab(exps, s)
    finished = run_files(s.out)
    assert len(finished) == 1
    saved = finished[0].read_text()
    assert not list(s.out.rglob("*.tmp"))

    monkeypatch.setattr(engine, "train", real_train)
    outcome = engine.run_lab(exps, s)
    assert outcome.reused == 1 and outcome.ran == 3
    assert finished[0].read_text() == saved
    assert len(run_files(s.out)) == 4


def test_same_seed_same_numbers(tmp_path, tiny_fashion):
    exp = EXPERIMENTS["noisy-bn"]
    a = engine.run_lab([exp], settings(tmp_path / "a", tiny_fashion))
    b = engine.run_lab([exp], settings(tmp_path / "b", tiny_fashion))
    assert a.summaries["noisy-bn"]["rows"] == b.summaries["noisy-bn"]["rows"]
    for digest in a.summaries["noisy-bn"]["runs"].values():
        ra = json.loads(engine.run_path(tmp_path / "a" / "out", digest).read_text())
        rb = json.loads(engine.run_path(tmp_path / "b" / "out", digest).read_text())
        assert ra["series"] == rb["series"]
    c = engine.run_lab([exp], settings(tmp_path / "c", tiny_fashion, seed=1))
    assert c.summaries["noisy-bn"]["runs"] != a.summaries["noisy-bn"]["runs"]


def test_paired_seeds_run_every_arm_once_per_seed_and_decide_from_the_interval(tmp_path, tiny_fashion):
    exp = EXPERIMENTS["ioffe-mnist"]
    out = engine.run_lab([exp], settings(tmp_path, tiny_fashion, seed=4, seeds=3))
    summary = out.summaries["ioffe-mnist"]
    assert out.ran == 6 and summary["seeds"] == [4, 5, 6] and not summary["indicative"]
    assert len(summary["seed_runs"]) == 3 and summary["runs"] == summary["seed_runs"][0]
    for mapping, seed in zip(summary["seed_runs"], [4, 5, 6]):
        configs = {k: json.loads(engine.run_path(tmp_path / "out", d).read_text()) for k, d in mapping.items()}
        assert {c["config"]["seed"] for c in configs.values()} == {seed}  # both arms of a seed share it
        env = configs["bn"]["env"]
        assert env["threads"] >= 1 and env["torch"] and "backend" in env and configs["bn"]["wall_seconds"] > 0
    accuracy = summary["checks"][0]
    assert accuracy["n"] == 3 and accuracy["lo"] <= accuracy["mean"] <= accuracy["hi"] and "[" in accuracy["value"]
    html, md = write_report(tmp_path / "out", [exp])
    assert "3 paired seeds" in md.read_text() and "(indicative)" not in md.read_text()
    one = engine.run_lab([exp], settings(tmp_path / "one", tiny_fashion))
    assert one.summaries["ioffe-mnist"]["indicative"]


def test_config_hash_is_stable_and_sensitive():
    cfg = {"a": 1, "b": [1, 2], "c": {"d": None}}
    assert engine.config_hash(cfg) == engine.config_hash({"c": {"d": None}, "b": [1, 2], "a": 1})
    assert engine.config_hash(cfg) != engine.config_hash({**cfg, "a": 2})


def parse(argv):
    parser = argparse.ArgumentParser(prog="normlab lab")
    cli.configure(parser)
    return parser.parse_args(argv)


def test_cli_list_run_report(tmp_path, tiny_fashion, capsys):
    args = parse(["list"])
    assert args.func(args) == 0
    assert "santurkar-lr" in capsys.readouterr().out
    out = tmp_path / "cli"
    args = parse(["run", "ioffe-mnist", "--suite", "smoke", "--out", str(out), "--data-dir", str(tiny_fashion),
                  "--device", "cpu"])
    assert args.out == out and args.seed == 0 and not args.force
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "ioffe-mnist" in text and "wall time" in text
    (out / "report.html").unlink()
    args = parse(["report", "--out", str(out)])
    assert args.func(args) == 0 and (out / "report.html").is_file()


def test_cli_defaults():
    args = parse(["run"])
    assert str(args.out) == "lab-report" and args.suite == "quick" and args.experiments == [] and args.seeds is None
    args = parse(["run", "--suite", "standard", "--seeds", "7"])
    assert args.suite == "standard" and args.seeds == 7


def test_cli_refuses_zero_seeds(tmp_path, tiny_fashion, capsys):
    args = parse(["run", "ioffe-mnist", "--suite", "smoke", "--seeds", "0", "--out", str(tmp_path / "o"),
                  "--data-dir", str(tiny_fashion)])
    assert args.func(args) == 2 and "--seeds must be at least 1" in capsys.readouterr().err


def test_cli_missing_data_names_package_and_flag(tmp_path, monkeypatch, capsys):
    from normlab.lab import data

    monkeypatch.setattr(data, "DEFAULT_FASHION_DIR", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    args = parse(["run", "ioffe-mnist", "--suite", "smoke", "--out", str(tmp_path / "o"),
                  "--data-dir", str(tmp_path / "empty")])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "sudo apt-get install dataset-fashion-mnist" in err and "--data-dir" in err
    args = parse(["run", "ioffe-mnist", "--suite", "smoke", "--out", str(tmp_path / "o"),
                  "--data-dir", str(tmp_path / "typo")])
    assert args.func(args) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing run, nothing written


def test_cli_unknown_experiment(tmp_path):
    args = parse(["run", "no-such-thing", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown experiment"):
        args.func(args)


def test_report_without_results(tmp_path, capsys):
    args = parse(["report", "--out", str(tmp_path)])
    assert args.func(args) == 2
    assert "normlab lab run" in capsys.readouterr().err


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_smoke_on_real_fashion_mnist(tmp_path):
    s = settings(tmp_path, None)
    outcome = engine.run_lab([EXPERIMENTS["ioffe-mnist"], EXPERIMENTS["noisy-bn"]], s)
    assert set(outcome.summaries) == {"ioffe-mnist", "noisy-bn"}
    html, _ = write_report(s.out, list(EXPERIMENTS.values()))
    assert "ioffe-mnist" in html.read_text()
