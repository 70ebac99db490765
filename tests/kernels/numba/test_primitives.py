"""The per-value formulas of normlab.kernels.numba.primitives: what each computes, and that no other module
of the package spells them again."""

import math
import re
from pathlib import Path

import pytest

from normlab.kernels import available

pytestmark = pytest.mark.skipif(not available("numba"), reason="numba is not installed")

PACKAGE = Path(__file__).resolve().parents[3] / "src" / "normlab" / "kernels" / "numba"


def test_the_formulas_compute_what_their_docstrings_say():
    from numba import njit

    from normlab.kernels.numba import primitives as p

    @njit
    def apply(t, sh, a, b, g, y, c, k1, k2):
        return (p.normalized(t, sh, a, b), p.relu(t - sh, 0.0), p.masked(g, y, 0.0),
                p.dx_value(g, t, sh, b, c, k1, k2))

    normalized, relu, masked, dx = apply(3.0, 1.0, 2.0, 0.5, 4.0, -1.0, 0.25, 3.0, -2.0)
    assert normalized == (3.0 - 1.0) * 2.0 + 0.5
    assert relu == 2.0
    assert masked == 0.0
    assert dx == (4.0 - 0.25) * 3.0 + ((3.0 - 1.0) - 0.5) * -2.0
    assert apply(0.0, 1.0, 1.0, 0.0, 1.0, 2.0, 0.0, 1.0, 0.0)[1:3] == (0.0, 1.0)  # relu clips, the mask passes
    assert math.isnan(apply(math.nan, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0)[1])  # ReLU keeps NaN, as torch's


# The value-level spellings of the normalize map and the dx map: (... − sh) · a + b and (g − c) · k1 + (...) · k2.
SPELLINGS = {
    "normalize map": re.compile(r"-\s*\w+(\[\w+\])?\)\s*\*\s*\w+(\[\w+\])?\s*\+\s*\w+(\[\w+\])?\s*$", re.M),
    "dx map": re.compile(r"\)\s*\*\s*k1\w*(\[\w+\])?\s*\+\s*\(\("),
}


@pytest.mark.parametrize("name", SPELLINGS)
def test_no_module_spells_a_formula_of_primitives_again(name):
    """Every loop calls primitives.normalized and primitives.dx_value; a module that writes the expression
    out again would let the copies drift apart."""
    found = [f"{path.name}: {m.group(0).strip()}" for path in PACKAGE.glob("*.py") if path.name != "primitives.py"
             for m in SPELLINGS[name].finditer(path.read_text(encoding="utf-8"))]
    assert not found, found
    assert SPELLINGS[name].search((PACKAGE / "primitives.py").read_text(encoding="utf-8"))
