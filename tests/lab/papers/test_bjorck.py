import math

from normlab.lab.papers import bjorck


def run(train_loss, peaks, diverged_at=None, initial=2.3):
    return {"diverged_at": diverged_at, "series": {"eval": {"test_loss": [initial] + [1.0] * len(train_loss),
                                                             "train_loss": [math.nan] + train_loss,
                                                             "train_loss_max": [math.nan] + peaks}}}


def test_a_run_that_blows_up_diverges_even_if_it_ends_finite():
    blown = run([2.3, 2.3, 2.3], [5e13, 2.4, 2.3])  # the loss went to 5e13, then sat at chance
    assert bjorck.diverges(blown) and not bjorck.trains(blown)
    assert bjorck.diverges(run([1.0], [1.0], diverged_at=3))


def test_trains_needs_the_loss_to_fall_below_the_mark():
    assert bjorck.trains(run([1.5, 0.9, 0.6], [2.5, 1.2, 0.8]))
    slow = run([2.2, 2.1, 2.0], [2.4, 2.2, 2.1])  # no blow-up, but still near chance
    assert not bjorck.diverges(slow) and not bjorck.trains(slow)
    assert not bjorck.trains(run([1.0, 0.5], [bjorck.DIVERGES_ABOVE * 2.3 + 1, 0.6]))


def test_largest_trainable_lr_and_the_half_decade_grid():
    runs = {"none-lr0.001": run([0.5], [1.0]), "none-lr0.003": run([2.3], [1e9]), "none-lr0.0001": run([0.9], [1.0])}
    assert bjorck.largest_trainable_lr(runs, "none", [1e-4, 1e-3, 3e-3]) == 1e-3
    ratios = [b / a for a, b in zip(bjorck.HALF_DECADES, bjorck.HALF_DECADES[1:])]
    assert all(2.9 < r < 3.5 for r in ratios)
