"""Folding on the graph torch.fx traces: a BN is folded where the graph shows the data flow is exact.

A BN call folds into the layer that produced its input when that layer is a Conv/ConvTranspose/Linear
module called once, whose output nothing else reads and whose weights no other module or function
shares; otherwise into the layer that reads its output, under the same conditions and the rules of
:func:`~normlab.folding.affine.before_reason`. A BN called more than once, or with neither neighbour
foldable, becomes its :class:`~normlab.folding.affine.EvalAffine` map, and the reason is recorded.
"""

from __future__ import annotations

from collections import Counter

from torch import fx, nn

from normlab.folding import affine as A

__all__ = ["trace", "fold_graph"]


class _Tracer(fx.Tracer):
    """torch.fx's tracer that keeps BN layers, EvalAffine and every normlab layer as single calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (A.bn_like(m) or isinstance(m, A.EvalAffine) or type(m).__module__.startswith("normlab.nn")
                or super().is_leaf_module(m, qualname))


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` as a GraphModule (raises whatever torch.fx raises where the model does not trace)."""
    graph = _Tracer().trace(model)
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _rank(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return None if shape is None else len(shape)


def fold_graph(gm: fx.GraphModule, example_inputs: tuple | None = None):
    """Fold the BN calls of ``gm`` in place. Returns ``(gm, folded, unfolded)``: ``folded`` lists
    ``(bn, layer, "after" | "before")``, ``unfolded`` lists ``(bn, reason)``, by qualified name."""
    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        ShapeProp(gm).propagate(*example_inputs)
    graph = gm.graph
    modules = dict(gm.named_modules(remove_duplicate=False))
    calls = Counter(id(modules[n.target]) for n in graph.nodes if n.op == "call_module")
    owners = Counter(id(p) for _, p in gm.named_parameters(remove_duplicate=False))
    attr_reads = {n.target.rpartition(".")[0] for n in graph.nodes if n.op == "get_attr"}
    folded: list[tuple[str, str, str]] = []
    unfolded: list[tuple[str, str]] = []
    done: set[int] = set()

    def layer_of(node) -> tuple[nn.Module | None, str | None]:
        """The foldable module ``node`` calls, or why there is none."""
        if not isinstance(node, fx.Node):
            return None, "the neighbour is a constant"
        if node.op != "call_module":
            what = node.op if node.op != "call_function" else getattr(node.target, "__name__", str(node.target))
            return None, f"the neighbour is {what}, not a convolution or linear layer"
        layer = modules[node.target]
        if calls[id(layer)] > 1:
            return None, f"'{node.target}' is called {calls[id(layer)]} times (shared): folding would change every call"
        if node.target in attr_reads or any(owners[id(p)] > 1 for p in layer.parameters(recurse=False)):
            return None, f"the weights of '{node.target}' are also used elsewhere"
        return layer, None

    def linear_2d(node) -> str | None:
        rank = _rank(node)
        if rank is not None and rank != 2:
            return f"the linear layer's data has {rank} dimensions; BN normalizes axis 1, Linear mixes the last"
        return None

    for node in list(graph.nodes):
        if node.op != "call_module" or not A.bn_like(modules[node.target]):
            continue
        bn = modules[node.target]
        name = node.target
        reason = A.not_affine_reason(bn)
        if reason is not None:
            unfolded.append((name, reason + "; left as it is"))
            continue
        if calls[id(bn)] > 1:
            if id(bn) not in done:
                done.add(id(bn))
                _set_module(gm, name, A.eval_affine(bn))
                unfolded.append((name, f"it is called {calls[id(bn)]} times (shared); replaced by its affine map"))
            continue
        if len(node.args) != 1 or node.kwargs:
            _set_module(gm, name, A.eval_affine(bn))
            unfolded.append((name, "it is called with more than one argument; replaced by its affine map"))
            continue
        src = node.args[0]
        layer, why_after = layer_of(src)
        if layer is not None:
            why_after = A.after_reason(layer, bn)
            if why_after is None and len(src.users) > 1:
                why_after = f"the output of '{src.target}' is also used by {len(src.users) - 1} other operation(s)"
            if why_after is None and isinstance(layer, nn.Linear):
                why_after = linear_2d(src)
        if layer is not None and why_after is None:
            A.fold_after(layer, bn)
            node.replace_all_uses_with(src)
            graph.erase_node(node)
            folded.append((name, src.target, "after"))
            continue
        users = list(node.users)
        why_before = f"its output is used by {len(users)} operations" if len(users) != 1 else None
        layer = None
        if why_before is None:
            layer, why_before = layer_of(users[0])
            if layer is not None:
                why_before = A.before_reason(bn, layer)
                if why_before is None and (users[0].args[:1] != (node,) or len(users[0].args) != 1):
                    why_before = f"'{users[0].target}' reads its output in another argument"
                if why_before is None and isinstance(layer, nn.Linear):
                    why_before = linear_2d(node)
        if layer is not None and why_before is None:
            A.fold_before(bn, layer)
            node.replace_all_uses_with(src)
            graph.erase_node(node)
            folded.append((name, users[0].target, "before"))
            continue
        _set_module(gm, name, A.eval_affine(bn))
        unfolded.append((name, f"after: {why_after}; before: {why_before}; replaced by its affine map"))
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, folded, unfolded
