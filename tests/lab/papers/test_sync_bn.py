from normlab.lab.papers import sync_bn


def _seed(fab, j: float, sync: float = 0.55, var_ratio: float = 0.5, gaps: tuple = (1e-7, 2e-7, 1e-7)) -> dict:
    def ddp(var: float, world: int = 2) -> dict:
        return {"ddp": {"running_var_error": [var], "running_mean_error": [0.1], "first_losses": [[2.3 * (1 + g)
                        for g in gaps]], "steps_per_s": [10.0], "comm_share": [0.3], "world": [world]}}
    return {"bn": fab.accuracy_run(0.50 + j, **ddp(0.2 * (1 + j))),
            "sync": fab.accuracy_run(sync + j, **ddp(0.2 * var_ratio * (1 + j))),
            "gn": fab.accuracy_run(0.48 + j, **ddp(0.2))}


def test_sync_bn_clear_intervals_decide_the_verdict(decide, fab):
    statuses, verdict, _ = decide(sync_bn.SYNC_BN, [_seed(fab, j) for j in fab.JITTER])
    assert statuses == ["pass", "pass"] and verdict == "reproduced"
    statuses, verdict, _ = decide(sync_bn.SYNC_BN, [_seed(fab, j, var_ratio=1.5) for j in fab.JITTER])
    assert statuses[0] == "fail" and verdict == "not reproduced"


def test_sync_bn_interval_across_the_margin_is_inconclusive(decide, fab):
    per_seed = [_seed(fab, j, sync=0.50 + d) for j, d in zip(fab.JITTER, fab.STRADDLE)]
    statuses, verdict, _ = decide(sync_bn.SYNC_BN, per_seed)
    assert statuses == ["pass", "unclear"] and verdict == "inconclusive"


def test_scaling_is_decided_from_the_gaps_interval(decide, fab):
    def seed(gaps: tuple) -> dict:
        base = _seed(fab, 0.0, gaps=(0.0, 0.0, 0.0))["sync"]
        return {"p1": base, "p2": _seed(fab, 0.0, gaps=gaps)["sync"]}
    statuses, verdict, checks = decide(sync_bn.SCALING, [seed((1e-7 * k, 0.0, 0.0)) for k in range(1, 6)])
    assert statuses == ["pass"] and verdict == "reproduced" and checks[0]["n"] == 5
    statuses, verdict, _ = decide(sync_bn.SCALING, [seed((1e-2 * k, 0.0, 0.0)) for k in range(1, 6)])
    assert statuses == ["fail"] and verdict == "not reproduced"
    statuses, _, _ = decide(sync_bn.SCALING, [seed((g, 0.0, 0.0)) for g in (0.0, 3e-5, 0.0, 2e-5, 0.0)])
    assert statuses == ["unclear"]  # mean 1e-5, CI straddles the tolerance
