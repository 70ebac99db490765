"""Eval-mode BatchNorm: ATen's ``torch.batch_norm`` against normlab's kernel path by input size (the crossover
behind ``normlab.nn.batchnorm.EVAL_ATEN_MAX_BYTES``; see benchmarks/README.md, "Eval on small tensors").

    PYTHONPATH=src python benchmarks/eval_crossover.py
"""
import time, torch, normlab.functional as F
torch.set_num_threads(1)
def best(f, n):
    b = float("inf")
    for _ in range(n):
        t = time.perf_counter(); f(); b = min(b, time.perf_counter() - t)
    return b * 1e6
for shape in [(8,64,16,16), (32,256,8,8), (32,512,7,7), (64,256,14,14), (64,64,56,56)]:
    for fmt in (torch.contiguous_format, torch.channels_last):
        c = shape[1]
        x = torch.randn(shape).contiguous(memory_format=fmt)
        rm, rv, w, b = torch.randn(c)*0.5, torch.rand(c)+0.5, torch.randn(c), torch.randn(c)
        n = 200 if x.numel() < 1e6 else 40
        with torch.no_grad():
            for _ in range(3): F.batch_norm(x, rm, rv, w, b, training=False)
            a = best(lambda: torch.batch_norm(x, w, b, rm, rv, False, 0.0, 1e-5, False), n)
            o = best(lambda: F.batch_norm(x, rm, rv, w, b, training=False), n)
        print(f"{str(shape):18} {'cl' if fmt == torch.channels_last else 'nchw'} {x.numel()*4/2**20:6.1f} MiB  aten {a:8.1f} us  normlab kernel path {o:8.1f} us  aten/normlab {a/o:.2f}x", flush=True)
