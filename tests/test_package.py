"""The top-level package: a plain ``import normlab`` reaches the subpackages and the lazily imported tools."""

import subprocess
import sys

import pytest


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


def test_subpackages_reachable_after_plain_import():
    out = _run("import normlab, sys; print('normlab.nn' in sys.modules); m = normlab.nn.BatchNorm2d(3); "
               "print(type(m).__module__, normlab.functional.batch_norm.__module__)")
    before, modules = out.split("\n", 1)
    assert before == "False"  # import normlab stays light: nn is imported on first use
    assert modules.split() == ["normlab.nn.batchnorm", "normlab.functional"]


def test_lazy_tools_and_unknown_names():
    import normlab

    assert callable(normlab.precise_bn) and callable(normlab.stat_guard)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        normlab.nope
