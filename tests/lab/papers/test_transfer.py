import torch

from normlab.lab.data import Dataset
from normlab.lab.papers import transfer


def test_dataset_only_keeps_the_classes_and_their_labels():
    ds = Dataset("d", torch.randn(6, 1, 2, 2), torch.tensor([0, 5, 1, 6, 5, 0]), torch.randn(3, 1, 2, 2),
                 torch.tensor([6, 0, 5]), 10)
    part = ds.only([5, 6])
    assert part.train_y.tolist() == [5, 6, 5] and part.test_y.tolist() == [6, 5] and part.num_classes == 10
    assert torch.equal(part.train_x[0], ds.train_x[1])


def test_finetune_with_frozen_statistics_keeps_them(context):
    ctx = context()
    model = transfer.freeze_bn(__import__("copy").deepcopy(ctx.model), affine=True)
    stats = [m.running_mean.clone() for m in model.modules() if hasattr(m, "running_mean")]
    transfer._finetune(model, ctx.probe_x, ctx.probe_y, 4, 3, 0.05, 0)
    assert all(torch.equal(a, m.running_mean) for a, m in zip(stats, [m for m in model.modules()
                                                                        if hasattr(m, "running_mean")]))


def test_check_compares_the_smallest_batch():
    runs = {"cnn": {"series": {"eval": {"test_acc": [0.9]},
                               "transfer": {"before": [0.0], "live": [[0.5, 0.8]], "frozen": [[0.6, 0.8]]}}}}
    rows, checks = transfer._evaluate(runs, {"ft_batches": [4, 32]})
    assert checks[0].status == "pass" and checks[0].value == "+10.0 points" and len(rows) == 6


def test_over_seeds_the_interval_decides(decide, fab):
    def seed(gain):
        return {"cnn": {"series": {"eval": {"test_acc": [0.9]},
                                   "transfer": {"before": [0.0], "live": [[0.5, 0.8]], "frozen": [[0.5 + gain, 0.8]]}}}}
    assert decide(transfer.EXPERIMENT, [seed(0.1 + j) for j in fab.JITTER])[:2] == (["pass"], "reproduced")
    assert decide(transfer.EXPERIMENT, [seed(-0.1 + j) for j in fab.JITTER])[:2] == (["fail"], "not reproduced")
    assert decide(transfer.EXPERIMENT, [seed(d) for d in fab.STRADDLE])[:2] == (["unclear"], "inconclusive")
