"""Triton at run time (normlab.kernels.triton.runtime): installed or not, GPU or interpreter, and the one build
per process. Each check runs in a fresh process, since the build mode is fixed by a process's first build."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _run(code: str, interpret: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NORMLAB_BACKEND")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_interpreter_build_binds_every_kernel_in_every_device_module():
    done = _run("""
        import sys
        from normlab.kernels.triton import device, device_backward, runtime
        assert runtime.installed() and runtime.built_for() is None and "triton" not in sys.modules
        assert runtime.interpreter_problem() is None
        built = runtime.kernels()
        assert runtime.built_for() == "interpreter" and runtime.kernels() is built
        names = [name for _, name in device.JIT]
        assert len(names) == len(set(names)) and set(names) < set(built)
        for module in (device, device_backward):
            assert module.tl is built["tl"]
            for name in names:
                if name in vars(module):
                    assert getattr(module, name) is built[name], (module.__name__, name)
        assert "InterpretedFunction" in type(built["_dx_cols"]).__name__
        assert runtime.gpu_problem() is not None  # CUDA tensors would run on the host here
    """, interpret=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_without_the_interpreter_cpu_tensors_are_refused():
    done = _run("""
        from normlab.kernels.triton import runtime
        problem = runtime.interpreter_problem()
        assert problem is not None and "TRITON_INTERPRET=1" in problem, problem
        assert runtime.gpu_problem() is None
    """, interpret=False)
    assert done.returncode == 0, done.stderr[-3000:]
