"""Fuse the ReLU (and residual add) that follows a BatchNorm2d into normlab's fused layers: :func:`fuse`.

Two patterns are rewritten, each where the BatchNorm's output feeds nothing else:

- ``relu(bn(x))`` → :class:`~normlab.nn.BatchNormReLU2d` ``(x)``;
- ``relu(bn(x) + r)`` (or ``r + bn(x)``, ``out += r``) → :class:`~normlab.nn.BatchNormAddReLU2d` ``(x, r)``,
  the tail of a ResNet block.

The fused layer takes the BatchNorm's very Parameter and buffer objects (as :func:`~normlab.nn.convert`
does), so ``state_dict`` keys, values and an optimizer built earlier are unchanged, and it computes the same
function. Where the model traces with torch.fx (the tracer :func:`normlab.fold` uses), the patterns are found
on its graph and the result is a ``GraphModule``; where it does not, each child that traces is rewritten on
its own graph, and the rest by module patterns: ``BatchNorm2d, ReLU`` next to each other in an
``nn.Sequential`` (the ReLU becomes ``nn.Identity``), and torchvision-style ``BasicBlock``/``Bottleneck``
blocks (``conv1``/``bn1``…, one ``relu`` module, ``downsample``), whose forward is replaced by the fused one.
"""

from __future__ import annotations

import dataclasses
import logging
import operator

import torch
from torch import fx, nn

from normlab.nn.batchnorm import BatchNorm2d
from normlab.nn.fused import BatchNormAddReLU2d, BatchNormReLU2d

__all__ = ["FusionReport", "fuse"]

log = logging.getLogger("normlab.fuse")

_RELU_FUNCTIONS = {torch.relu, torch.relu_, torch.nn.functional.relu}
_RELU_METHODS = {"relu", "relu_"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


@dataclasses.dataclass
class FusionReport:
    """What :func:`fuse` did: ``fused`` lists ``(bn, "BN+ReLU" | "BN+add+ReLU")`` by qualified name,
    ``skipped`` lists ``(bn, reason)`` for each BatchNorm2d left as it is, ``method`` says how the model was
    read (``"torch.fx"``, ``"module patterns"``, or both where only some children traced)."""

    method: str = ""
    fused: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    trace_error: str | None = None

    def __str__(self) -> str:
        lines = [f"fused {len(self.fused)} BatchNorm2d layer(s) via {self.method or 'nothing'}"
                 + (f" (torch.fx: {self.trace_error})" if self.trace_error else "")]
        lines += [f"  {bn}: {kind}" for bn, kind in self.fused]
        if self.skipped:
            lines.append(f"not fused: {len(self.skipped)}")
            lines += [f"  {bn}: {why}" for bn, why in self.skipped]
        return "\n".join(lines)


def _fused_layer(bn: BatchNorm2d, cls: type[nn.Module]) -> nn.Module:
    from normlab.nn.convert import _swap

    return _swap(bn, cls)


def _plain_bn(m: nn.Module) -> bool:
    """Only normlab's own BatchNorm2d is fused (subclasses compute something else)."""
    return type(m) is BatchNorm2d


# ---------------------------------------------------------------------------------------------- torch.fx


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and set(node.kwargs) <= {"inplace"} and len(node.args) == 1
    return node.op == "call_method" and node.target in _RELU_METHODS and len(node.args) == 1 and not node.kwargs


def _is_add(node: fx.Node) -> bool:
    if node.kwargs or len(node.args) != 2:
        return False
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    return node.op == "call_method" and node.target in _ADD_METHODS


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def fuse_graph(gm: fx.GraphModule, prefix: str = "") -> tuple[list, list]:
    """Rewrite the patterns on ``gm``'s graph in place; returns ``(fused, skipped)`` as in :class:`FusionReport`
    (names prefixed with ``prefix``)."""
    graph = gm.graph
    modules = dict(gm.named_modules(remove_duplicate=False))
    calls: dict[int, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[id(modules[n.target])] = calls.get(id(modules[n.target]), 0) + 1
    fused, skipped = [], []
    for node in list(graph.nodes):
        if node.op != "call_module" or not _plain_bn(modules[node.target]):
            continue
        name, bn = prefix + node.target, modules[node.target]
        if calls[id(bn)] > 1:
            if (name, reason := f"it is called {calls[id(bn)]} times (shared)") not in skipped:
                skipped.append((name, reason))
            continue
        user = _only_user(node)
        if user is None:
            skipped.append((name, f"its output is used by {len(node.users)} operations"))
            continue
        if _is_relu(user, modules):
            cls, args, relu, add = BatchNormReLU2d, node.args, user, None
        elif _is_add(user) and (after := _only_user(user)) is not None and _is_relu(after, modules):
            residual = user.args[1] if user.args[0] is node else user.args[0]
            if not isinstance(residual, fx.Node) or residual is node:
                skipped.append((name, "the residual it is added to is not a tensor of the graph"))
                continue
            cls, args, relu, add = BatchNormAddReLU2d, (*node.args, residual), after, user
        else:
            what = user.target if user.op != "call_function" else getattr(user.target, "__name__", user.target)
            skipped.append((name, f"its output goes to {what}, not to a ReLU or to an add then a ReLU"))
            continue
        _set_module(gm, node.target, _fused_layer(bn, cls))
        with graph.inserting_before(relu):
            new = graph.call_module(node.target, args)
        relu.replace_all_uses_with(new)
        for dead in (relu, add, node):
            if dead is not None:
                graph.erase_node(dead)
        fused.append((name, "BN+ReLU" if add is None else "BN+add+ReLU"))
    graph.lint()
    gm.recompile()
    return fused, skipped


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _trace(model: nn.Module) -> fx.GraphModule:
    from normlab.folding.graph import trace

    return trace(model)


# ----------------------------------------------------------------------------------------- module patterns


def _fuse_sequential(seq: nn.Sequential, prefix: str, uses, fused: list, skipped: list) -> None:
    """``BatchNorm2d, ReLU`` next to each other in ``seq``: the BN becomes BatchNormReLU2d, the ReLU Identity."""
    items = list(seq._modules.items())
    for (bn_name, bn), (relu_name, relu) in zip(items, items[1:]):
        if not _plain_bn(bn):
            continue
        if type(relu) is not nn.ReLU:
            skipped.append((prefix + bn_name, f"it is followed by {type(relu).__name__}, not a ReLU"))
        elif uses[id(bn)] > 1 or uses[id(relu)] > 1:
            skipped.append((prefix + bn_name, "the BatchNorm2d or its ReLU is used in several places (shared)"))
        else:
            setattr(seq, bn_name, _fused_layer(bn, BatchNormReLU2d))
            setattr(seq, relu_name, nn.Identity())
            fused.append((prefix + bn_name, "BN+ReLU"))


def _block_kind(m: nn.Module) -> int:
    """3 for a torchvision-style Bottleneck, 2 for a BasicBlock, 0 otherwise (by its class name and attributes:
    its forward is taken to be torchvision's)."""
    names = m._modules
    if not type(m).__name__.endswith(("BasicBlock", "Bottleneck")):
        return 0
    for depth in (3, 2):
        if (all(isinstance(names.get(f"conv{i}"), nn.Conv2d) and _plain_bn(names.get(f"bn{i}"))
                for i in range(1, depth + 1))
                and f"conv{depth + 1}" not in names and type(names.get("relu")) is nn.ReLU
                and "downsample" in names.keys() | set(vars(m))):
            return depth
    return 0


def _fused_block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """torchvision's BasicBlock/Bottleneck forward with each BN→ReLU and the final BN + identity → ReLU fused."""
    out = x
    for i in range(1, self._normlab_depth):
        out = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(out))
    out = getattr(self, f"conv{self._normlab_depth}")(out)
    identity = x if self.downsample is None else self.downsample(x)
    return getattr(self, f"bn{self._normlab_depth}")(out, identity)


_FUSED_BLOCKS: dict[type, type] = {}


def _fuse_block(block: nn.Module, depth: int, prefix: str, fused: list) -> None:
    """Swap a torchvision-style block's BN layers for fused ones and its class for one with the fused forward."""
    for i in range(1, depth):
        setattr(block, f"bn{i}", _fused_layer(getattr(block, f"bn{i}"), BatchNormReLU2d))
        fused.append((f"{prefix}bn{i}", "BN+ReLU"))
    setattr(block, f"bn{depth}", _fused_layer(getattr(block, f"bn{depth}"), BatchNormAddReLU2d))
    fused.append((f"{prefix}bn{depth}", "BN+add+ReLU"))
    cls = type(block)
    if cls not in _FUSED_BLOCKS:
        _FUSED_BLOCKS[cls] = type(f"Fused{cls.__name__}", (cls,), {
            "forward": _fused_block_forward, "__module__": cls.__module__,
            "__doc__": f"{cls.__name__} with its BatchNorm2d → ReLU and BatchNorm2d + identity → ReLU fused."})
    block.__class__ = _FUSED_BLOCKS[cls]
    block._normlab_depth = depth


def _fuse_modules(model: nn.Module, prefix: str, uses, report: FusionReport) -> nn.Module:
    """Fuse ``model`` (which did not trace): children that trace on their graphs, the rest by module patterns."""
    depth = _block_kind(model)
    if depth:
        _fuse_block(model, depth, prefix, report.fused)
        report.method = _join_method(report.method, "module patterns")
        return model
    if isinstance(model, nn.Sequential):
        _fuse_sequential(model, prefix, uses, report.fused, report.skipped)
        report.method = _join_method(report.method, "module patterns")
    for name, child in list(model._modules.items()):
        if child is None or uses.get(id(child), 1) > 1 or not any(_plain_bn(m) for m in child.modules()):
            continue
        try:
            gm = _trace(child)
        except Exception:  # torch.fx raises many types; the child is read by module patterns instead
            setattr(model, name, _fuse_modules(child, f"{prefix}{name}.", uses, report))
            continue
        fused, skipped = fuse_graph(gm, f"{prefix}{name}.")
        if fused:
            setattr(model, name, gm)
            report.method = _join_method(report.method, "torch.fx")
        report.fused += fused
        report.skipped += skipped
    return model


def _join_method(old: str, new: str) -> str:
    return new if not old or old == new else f"{old} and {new}" if new not in old else old


def fuse(model: nn.Module) -> tuple[nn.Module, FusionReport]:
    """Rewrite ``relu(bn(x))`` and ``relu(bn(x) + r)`` in ``model`` (whose BatchNorm2d layers are normlab's,
    e.g. after :func:`~normlab.nn.convert`) into the fused layers; see the module docstring. Returns the
    (possibly new) model and the :class:`FusionReport`; the model is changed in place where it does not trace.

    >>> import torch, normlab.nn
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), normlab.nn.BatchNorm2d(8), torch.nn.ReLU())
    >>> model, report = normlab.nn.fuse(model)
    >>> report.fused
    [('1', 'BN+ReLU')]
    """
    report = FusionReport()
    try:
        gm = _trace(model)
    except Exception as exc:  # torch.fx raises many types (TraceError, TypeError, RuntimeError, ...)
        report.trace_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        uses: dict[int, int] = {}
        for _, m in model.named_modules(remove_duplicate=False):
            uses[id(m)] = uses.get(id(m), 0) + 1
        model = _fuse_modules(model, "", uses, report)
    else:
        report.fused, report.skipped = fuse_graph(gm)
        report.method = "torch.fx"
        if report.fused:
            gm.training = model.training  # the submodules are the model's own, each in its own mode
            model = gm
    log.info("%s", report)
    return model, report
