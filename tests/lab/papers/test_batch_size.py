from normlab.lab.papers import batch_size


def _seed(fab, j: float, gn: float = 0.78, renorm_gain: float = 0.05, large: float = 0.80) -> dict:
    acc = {"bn": 0.80, "ln": 0.76, "in": 0.74, "gn": gn, "ghost-32": large, "ghost-8": 0.76, "ghost-2": 0.70,
           "renorm-32": 0.80, "renorm-8": 0.77, "renorm-2": 0.70 + renorm_gain, "noniid-ghost": 0.60,
           "noniid-renorm": 0.70, "noniid-gn": 0.72}
    return {k: fab.accuracy_run(v + j) for k, v in acc.items()}


def test_clear_intervals_decide_the_verdict(decide, fab):
    statuses, verdict, checks = decide(batch_size.BATCH_SIZE, [_seed(fab, j) for j in fab.JITTER])
    assert statuses == ["pass"] * 4 and verdict == "reproduced"
    assert all(c["n"] == 5 and c["paper"] != "—" and "[" in c["value"] for c in checks)
    # GN as bad as BN at groups of 2 on every seed: its CI lies wholly below the margin
    statuses, verdict, _ = decide(batch_size.BATCH_SIZE, [_seed(fab, j, gn=0.70) for j in fab.JITTER])
    assert statuses[1] == "fail" and verdict == "not reproduced"


def test_an_interval_across_the_margin_is_inconclusive(decide, fab):
    per_seed = [_seed(fab, j, renorm_gain=d) for j, d in zip(fab.JITTER, fab.STRADDLE)]
    statuses, verdict, _ = decide(batch_size.BATCH_SIZE, per_seed)
    assert statuses == ["pass", "pass", "unclear", "pass"] and verdict == "inconclusive"
