"""Import Triton for its interpreter, shared by the Triton test modules."""

import os
import sys

import pytest


def import_triton_interpreted() -> None:
    """Import triton with ``TRITON_INTERPRET=1`` set (Triton builds its interpreter's library functions
    only if it is set when triton is first imported; where something imported it before, the tests that
    need the interpreter skip) and restore the variable; skip the module where triton is not installed."""
    if "triton" in sys.modules:
        return
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton", reason="triton is not installed")
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before
