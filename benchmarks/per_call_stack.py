"""Where a small BatchNorm2d training forward spends its time, level by level down normlab's call stack, against
torch.nn's layer and ATen's ``torch.batch_norm`` (benchmarks/README.md, "Per-op: what bounds the small
channels_last training calls"). Each entry point is called in turn (interleaved), fastest of the calls:

    PYTHONPATH=src python benchmarks/per_call_stack.py "[32, 512, 7, 7]" channels_last [threads] [calls]

Each level includes the ones below it; a level's own cost is its time minus the next one's.
"""
import json, sys, time
import torch

torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
import normlab.functional as F
import normlab.nn as nl
from normlab.core import engine
from normlab.core.guard import RunningUpdate
from normlab.core.plan import batch_plan
from normlab.kernels.dispatch import backend_for
from normlab.kernels.numba import backend as nb

shape = tuple(json.loads(sys.argv[1]))
fmt = torch.channels_last if sys.argv[2] == "channels_last" else torch.contiguous_format
calls = int(sys.argv[4]) if len(sys.argv) > 4 else 400
x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
c = shape[1]
ours, theirs = nl.BatchNorm2d(c), torch.nn.BatchNorm2d(c)
plan = batch_plan(x.shape)
backend = backend_for(x, plan)
rm, rv = torch.zeros(c), torch.ones(c)

captured = {}
_forward = nb.NumbaBackend._forward
nb.NumbaBackend._forward = lambda self, *a, **k: captured.setdefault("args", a) and _forward(self, *a, **k)
ours(x)
nb.NumbaBackend._forward = _forward
launch, xa, y, w, b, eps, train, stats, residual, relu, running, count = captured["args"]
kernel = nb._kernels()[launch.family][0]
wn, bn = nb._param(w, launch.param_count, launch.acc, 1.0), nb._param(b, launch.param_count, launch.acc, 0.0)
xn, yn = launch.array(xa), launch.array(y)
parts = nb._parts(nb._sync_threads(x.numel()), launch)
rmn, rvn = rm.numpy(), rv.numpy()

levels = {
    "torch.nn.BatchNorm2d": lambda: theirs(x),
    "ATen torch.batch_norm": lambda: torch.batch_norm(x, theirs.weight, theirs.bias, theirs.running_mean,
                                                      theirs.running_var, True, 0.1, 1e-5, False),
    "normlab.nn.BatchNorm2d": lambda: ours(x),
    "functional._execute": lambda: F._execute("bn", x, plan, ours.weight, ours.bias, 1e-5, rm, rv, True, 0.1),
    "engine.run (autograd node)": lambda: engine.run(backend, x, ours.weight, ours.bias, None, None, plan, 1e-5,
                                                     RunningUpdate(rm, rv, 0.1, True)),
    "backend.forward": lambda: backend.forward(x, ours.weight, ours.bias, None, None, plan, 1e-5,
                                               running=RunningUpdate(rm, rv, 0.1, True)),
    "numba kernel alone": lambda: kernel(xn, wn, bn, 1e-5, True, stats, yn, xn, 0, rmn, rvn, 0.1, 1.0, parts, False,
                                         guarded=True),
}
best = dict.fromkeys(levels, float("inf"))
for _ in range(calls):
    for name, f in levels.items():
        t = time.perf_counter_ns()
        f()
        best[name] = min(best[name], time.perf_counter_ns() - t)
print(json.dumps({"shape": shape, "layout": sys.argv[2], "threads": torch.get_num_threads(),
                  "us": {k: round(v / 1e3, 1) for k, v in best.items()}}))
