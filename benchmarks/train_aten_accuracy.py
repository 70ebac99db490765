"""Training-mode BatchNorm: how far ATen's ``torch.native_batch_norm`` and normlab's layer are from a float64
reference, by layout and by how far the data's mean is from zero in units of its spread (|mean|/std = K).
The measurement behind keeping small training calls on normlab's kernels (benchmarks/README.md, "Per-op:
what bounds the small channels_last training calls").

    PYTHONPATH=src python benchmarks/train_aten_accuracy.py

Each line: the worst error of y and of dx (against the float64 reference, over the largest |value| of the
reference), and the worst relative error of the biased variance recovered from ATen's saved 1/sqrt(var+eps)
(what a running update outside ATen would have to start from).
"""
import torch
import normlab.nn as nl

torch.manual_seed(0)
EPS = 1e-5


def reference(x, w, b, g):
    """y and dx in float64 for the float32 data ``x``."""
    xd = x.double().requires_grad_()
    wd, bd = w.double(), b.double()
    dims = (0, 2, 3)
    mean = xd.mean(dims, keepdim=True)
    var = xd.var(dims, unbiased=False, keepdim=True)
    y = (xd - mean) / torch.sqrt(var + EPS) * wd.view(1, -1, 1, 1) + bd.view(1, -1, 1, 1)
    y.backward(g.double())
    return y.detach(), xd.grad, var.flatten().detach()


def rel(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


for shape in [(32, 512, 7, 7), (8, 64, 16, 16), (64, 32, 16, 16), (256, 16, 8, 8), (2, 8, 4, 4)]:
    for layout in ("contiguous", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        for k in (0, 1, 8, 64):
            x = (torch.randn(shape) * 0.01 + k * 0.01).contiguous(memory_format=fmt)
            w, b, g = torch.rand(shape[1]) + 0.5, torch.randn(shape[1]), torch.randn(shape)
            y_ref, dx_ref, var_ref = reference(x, w, b, g)
            xa = x.clone().requires_grad_()
            ya, _, invstd = torch.native_batch_norm(xa, w, b, None, None, True, 0.0, EPS)
            ya.backward(g)
            layer = nl.BatchNorm2d(shape[1])
            with torch.no_grad():
                layer.weight.copy_(w)
                layer.bias.copy_(b)
            xn = x.clone().requires_grad_()
            yn = layer(xn)
            yn.backward(g)
            var_a = ((1.0 / invstd.double() ** 2 - EPS) - var_ref).abs().div(var_ref).max().item()
            print(f"{str(shape):16} {layout:13} K={k:<3} y: aten {rel(ya, y_ref):.1e} normlab {rel(yn, y_ref):.1e}"
                  f"  dx: aten {rel(xa.grad, dx_ref):.1e} normlab {rel(xn.grad, dx_ref):.1e}"
                  f"  var from aten's invstd {var_a:.1e}", flush=True)
