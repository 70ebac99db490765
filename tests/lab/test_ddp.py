"""Data-parallel training of the lab's CNN under torchrun, and the running-statistics error it reports."""

import math

import pytest
import torch

import normlab.nn as nnl
from normlab.lab import ddp


def _config(norm, nproc, steps=6):
    return ddp.ddp_config(norm, nproc, batch=16, steps=steps, lr=0.05, widths=[4, 8], pool_after=[1], n_train=320,
                          n_test=160, size=12, seed=0)


def test_sync_runs_are_one_process_training_on_the_global_batch(tiny_fashion):
    """2 processes with SyncBatchNorm train the same model as 1 process on the whole batch (same math
    spread over the ranks): the test loss after 6 steps agrees to float32 rounding; per-rank BatchNorm
    (8 images per rank) does not."""
    one, two = (ddp.launch(_config("sync", n), tiny_fashion, timeout=120) for n in (1, 2))
    per_rank = ddp.launch(_config("bn", 2), tiny_fashion, timeout=120)
    loss = lambda r: r["series"]["eval"]["test_loss"][-1]  # noqa: E731
    same, other = abs(loss(two) / loss(one) - 1), abs(loss(per_rank) / loss(one) - 1)
    assert same < 1e-5 and other > 30 * same, (loss(one), loss(two), loss(per_rank))
    d = two["series"]["ddp"]
    assert d["world"] == [2] and d["steps_per_s"][0] > 0 and 0 <= d["comm_share"][0] < 1
    assert one["series"]["ddp"]["comm_share"] == [0.0]


def test_running_error_is_zero_at_the_population_statistics():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), nnl.BatchNorm2d(3))
    x = torch.randn(64, 2, 6, 6) * 2 + 1
    with torch.no_grad():
        h = model[0](x).double()
        model[1].running_mean.copy_(h.mean((0, 2, 3)))
        model[1].running_var.copy_(h.var((0, 2, 3)))
    mean_err, var_err = ddp.running_error(model, x, chunk=10)
    assert mean_err < 1e-6 and var_err < 1e-6
    with torch.no_grad():
        model[1].running_var.mul_(math.e)
    assert ddp.running_error(model, x, chunk=10)[1] == pytest.approx(1.0, abs=1e-5)


def test_group_norm_variant_has_no_batchnorm():
    model = ddp.build(_config("gn", 1), (1, 12, 12), 10)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) == 2
    assert math.isnan(ddp.running_error(model, torch.randn(4, 1, 12, 12))[0])


def test_normlab_lab_run_nproc_launches_the_data_parallel_training(tiny_fashion, tmp_path, capsys):
    """`normlab lab run --nproc 2 --suite smoke` as a user runs it: two torchrun processes train the CNN with
    SyncBatchNorm and rank 0's result lands under --out; experiment names alongside are refused."""
    import json
    import time

    from normlab.cli import main

    start = time.monotonic()
    code = main(["lab", "run", "--nproc", "2", "--suite", "smoke", "--data-dir", str(tiny_fashion), "--out",
                 str(tmp_path), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert time.monotonic() - start < 120
    result = json.loads((tmp_path / "ddp-2.json").read_text())
    assert result["series"]["ddp"]["world"] == [2] and result["config"]["ddp"]["norm"] == "sync"
    assert result["steps_done"] == ddp.SUITES["smoke"]["steps"]
    assert "2 process(es), norm=sync: test accuracy" in capsys.readouterr().out
    assert main(["lab", "run", "batch-size", "--nproc", "2", "--out", str(tmp_path)]) == 2
    assert "no experiment names" in capsys.readouterr().err
