"""The core below the kernels: core imports nothing from normlab.kernels, and every backend the dispatch
knows implements core's Backend protocol."""

import ast
import inspect
import pathlib
import subprocess
import sys

import pytest

import normlab.core
from normlab.core.backend import Backend
from normlab.kernels import dispatch

CORE = pathlib.Path(normlab.core.__file__).parent


def _imports(path: pathlib.Path) -> list[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved against normlab.core)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(["normlab", "core"][: 3 - node.level] + ([base] if base else []))
            names += [base] + [f"{base}.{a.name}" for a in node.names]
    return names


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_module_imports_nothing_from_kernels(path):
    upward = [name for name in _imports(path) if name.startswith("normlab.kernels") or name == "normlab.functional"]
    assert upward == [], f"{path.name} imports {upward}: the core must not depend on the layers above it"
    assert "normlab.kernels" not in path.read_text(), f"{path.name} names normlab.kernels"


def test_importing_the_core_loads_no_kernel_module():
    code = ("import sys, normlab.core, normlab.core.engine, normlab.core.fused, normlab.core.ghost, "
            "normlab.core.renorm, normlab.core.stats, normlab.core.masked, normlab.core.backend; "
            "print(sorted(m for m in sys.modules if m.startswith('normlab.kernels')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _parameters(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


@pytest.mark.parametrize("name", sorted(dispatch.BACKENDS))
def test_every_backend_implements_the_protocol(name):
    backend = dispatch.BACKENDS[name]()
    assert isinstance(backend, Backend)
    assert backend.name == name
    for method in ("unsupported", "fuses", "forward", "backward"):
        wanted = _parameters(getattr(Backend, method))
        got = _parameters(getattr(backend, method))
        # the protocol's parameters, in its order; a backend may take further keyword arguments after them
        assert got[: len(wanted)] == wanted, f"{name}.{method}{got} does not start with {wanted}"
