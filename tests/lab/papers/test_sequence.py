from normlab.lab.papers import sequence


def _seed(fab, j: float, ln: float = 0.70, fluct_bn: float = 0.5) -> dict:
    def stats(dev: float) -> dict:
        return {"batch_stats": {"step": [0, 100, 200, 300], "mean_dev": [[dev]] * 4, "var_dev": [[dev]] * 4}}
    runs = {"ln": fab.accuracy_run(ln + j), "bn": fab.accuracy_run(0.65 + j, **stats(fluct_bn * (1 + j))),
            "masked-bn": fab.accuracy_run(0.66 + j, **stats(0.3)), "renorm": fab.accuracy_run(0.66 + j, **stats(0.3)),
            "cnn-bn": fab.accuracy_run(0.8, **stats(0.05))}
    return runs


def test_clear_intervals_decide_the_verdict(decide, fab):
    statuses, verdict, checks = decide(sequence.SEQUENCE, [_seed(fab, j) for j in fab.JITTER])
    assert statuses == ["pass"] * 3 and verdict == "reproduced" and checks[1]["log"]
    statuses, verdict, _ = decide(sequence.SEQUENCE, [_seed(fab, j, fluct_bn=0.05) for j in fab.JITTER])
    assert statuses[1] == "fail" and verdict == "not reproduced"  # as steady as the CNN's: ratio ×1 < ×2


def test_an_interval_across_the_margin_is_inconclusive(decide, fab):
    per_seed = [_seed(fab, j, ln=0.65 + d) for j, d in zip(fab.JITTER, fab.STRADDLE)]
    statuses, verdict, _ = decide(sequence.SEQUENCE, per_seed)
    assert statuses[0] == "unclear" and verdict == "inconclusive"
