"""The Triton kernels compiled for an H100 (sm_90) on a machine without a GPU
(:mod:`normlab.kernels.triton.compile`): every specialization the backend reaches on the benchmark's
shapes, in every dtype, goes through Triton's compiler and ptxas, and none spills registers under
pressure.

Each test runs in a subprocess: the test process has Triton in interpreter mode
(``test_backend.py`` imports it that way), and compiling for a GPU needs it off. Every run has
a Triton cache of its own, so that the kernels are compiled, not loaded.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from normlab.kernels.triton.compile import launched_kernels

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _python(args, tmp_path, timeout, interpret=False):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_in_every_dtype_without_spills(tmp_path):
    done = _python(["-m", "normlab.kernels.triton.compile", "--arch", "90", "--json"], tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["failures"] == []
    compiled = report["compiled"]
    for dtype in ("float32", "float64", "float16", "bfloat16"):
        # the seam's _pack_moments reads accumulation-dtype partials only: half precision input reuses the
        # specialization compiled for float32 (listed once, under float32)
        want = set(launched_kernels()) - ({"_pack_moments"} if dtype in ("float16", "bfloat16") else set())
        assert {c["kernel"] for c in compiled if c["dtype"] == dtype} == want, dtype
    # Register pressure spills hundreds of bytes (see the next test). A few bytes are an artefact of the
    # register allocation level Triton asks ptxas for (--regAllocOptLevel=2): with it, LayerNorm(768)'s
    # dγ/dβ-only backward spills 4 bytes at 40 registers, without it none.
    spilling = [(c["kernel"], c["case"], c["dtype"], c["num_warps"], c["spill_store_bytes"]) for c in compiled
                if max(c["spill_store_bytes"], c["spill_load_bytes"]) > 16]
    assert spilling == []
    assert all(0 < c["registers"] <= 255 and c["launches"] >= 1 for c in compiled)
    # the flags the host code sets reach the kernels: training and fixed statistics, all three epilogues
    constants = {c["kernel"]: set() for c in compiled}
    for c in compiled:
        constants[c["kernel"]].add(c["constants"])
    assert any("EPI=0" in k for k in constants["_apply_planar"]) and any("EPI=2" in k for k in constants["_apply_cols"])
    assert {"TRAIN=True", "TRAIN=False"} <= {t for k in constants["_finish_moments"] for t in k.split(", ")}


_PROBE = textwrap.dedent("""
    import json, torch
    from normlab.kernels.triton import compile as tc, launch

    case = [c for c in tc.cases() if c.name == "BatchNorm2d (32, 512, 7, 7) channels_last"]
    warps = launch.warps
    launch.warps = lambda elements: 4  # every kernel on 4 warps, as the finishing kernels once were
    compiled, _ = tc.compile_cases(case, (torch.float64,))
    launch.warps = warps
    launch.COLUMNS = 3  # channels per tile, not a power of two: tl.arange cannot take it
    _, failures = tc.compile_cases(case[:1], (torch.float32,))
    print(json.dumps({"spilling": sorted({c.kernel for c in compiled if c.spills}),
                      "failures": [(f.kernel, f.error) for f in failures]}))
""")


def test_spills_and_compile_errors_are_reported(tmp_path):
    done = _python(["-c", _PROBE], tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # 4096-value tiles of float64 Welford partials on 128 threads spill (the finishing kernels now take
    # as many warps as their tile needs)
    assert "_finish_moments" in report["spilling"] and "_finish_sums" in report["spilling"]
    assert len(report["failures"]) == 1
    kernel, error = report["failures"][0]
    assert kernel == "_moments_cols" and "power of 2" in error


def test_refuses_to_run_under_the_interpreter(tmp_path):
    done = _python(["-m", "normlab.kernels.triton.compile", "--quick"], tmp_path, timeout=120, interpret=True)
    assert done.returncode == 2
    assert "unset TRITON_INTERPRET" in done.stderr
