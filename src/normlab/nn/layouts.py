"""The 1d/2d/3d variants of a layer family: the inputs each takes (:data:`LAYOUTS`) and their docstrings
(:func:`variant_doc`), written once for the families built on BatchNorm (ghost BN, batch renorm)."""

from __future__ import annotations

__all__ = ["LAYOUTS", "variant_doc"]

# variant -> (input ranks, "of shape ..." as errors say it, the input as a docstring says it)
LAYOUTS = {
    "1d": ((2, 3), "of shape (N, C) or (N, C, L)", "a 2D input (N, C) or 3D input (N, C, L)"),
    "2d": ((4,), "of shape (N, C, H, W)", "a 4D input (N, C, H, W)"),
    "3d": ((5,), "of shape (N, C, D, H, W)", "a 5D input (N, C, D, H, W)"),
}


def variant_doc(what: str, family: str, module: str, variant: str, args: str = "", example: str = "") -> str:
    """The docstring of class ``family + variant`` (e.g. ``"GhostBatchNorm"``, ``"2d"``) of ``module``: ``what``
    over its input, pointing to the module for the math; the 1d variant lists ``args`` (the lines under
    ``Args:``) and says what it shares with ``torch.nn.BatchNorm1d``; the others refer to it. ``example``:
    doctest lines (with their ``>>>``), shown under ``Example::`` after ``import normlab.nn as nn``."""
    text = f"{what} over {LAYOUTS[variant][2]}; see :mod:`{module}`"
    if variant == "1d":
        text += (f".\n\n    Args:\n{_indent(args, 8)}\n\n    ``state_dict`` keys, parameters and buffers are "
                 f"BatchNorm1d's; ``isinstance(m, torch.nn.BatchNorm1d)``.")
    else:
        text += f"; arguments as :class:`{family}1d`."
    if example:
        text += f"\n\n    Example::\n\n        >>> import normlab.nn as nn\n{_indent(example, 8)}"
    return text + "\n    "


def _indent(text: str, spaces: int) -> str:
    return "\n".join(" " * spaces + line for line in text.strip("\n").splitlines())
