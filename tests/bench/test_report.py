"""The printed table and ``--render`` of saved records."""

from __future__ import annotations

import json

import pytest
import torch

from normlab import bench


def test_table_has_header_and_rows(run_cli):
    code, out, _ = run_cli("--quick", "--filter", "BatchNorm1d")
    assert code == 0
    assert f"torch {torch.__version__}" in out and "threads" in out
    assert "torch/normlab = torch ms / normlab ms" in out and "> 1 means normlab is faster" in out
    rows = [line for line in out.splitlines() if line.startswith("BatchNorm1d(32)")]
    assert len(rows) == len(bench.MODES)
    assert all(line.rstrip().endswith("x") for line in rows)
    header = next(line for line in out.splitlines() if line.startswith("module"))
    assert "normlab ms" in header and "torch ms" in header


def test_render_prints_saved_records_as_the_run_did(run_cli, tmp_path, quick_json):
    """``--render`` turns what ``--json`` saved (here with a CNN step record and as if measured on another
    machine) into the table and the end-to-end line, naming the machine and the torch that measured them."""
    step = bench.train_step(batch=8, repeats=1, warmup=0, threads=1)
    records = [dict(r, torch="9.9.9+elsewhere", device_name="Some GPU") for r in quick_json + [step]]
    assert {"torch", "device_name"} <= quick_json[0].keys() and quick_json[0]["torch"] == torch.__version__
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(records))
    code, out, err = run_cli("--render", str(path))
    assert code == 0 and err == ""
    assert "cpu (Some GPU), torch 9.9.9+elsewhere, 1 threads" in out.splitlines()[0]
    rows = [line for line in out.splitlines() if line.rstrip().endswith("x") and not line.startswith("End to end")]
    assert len(rows) == len(quick_json)
    assert out.rstrip().splitlines()[-1] == bench.format_step(records[-1])


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "No such file"),
        ("not json", "not JSON"),
        ("{}", "expected the non-empty list of records"),
        ('[{"op": "BatchNorm2d"}]', "lacks a field"),
    ],
)
def test_render_refuses_what_is_not_saved_records(run_cli, tmp_path, content, message):
    path = tmp_path / "bench.json"
    if content is not None:
        path.write_text(content)
    code, out, err = run_cli("--render", str(path))
    assert code == 2 and out == "" and message in err and str(path) in err
