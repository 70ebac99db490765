"""Per-call cost of a BatchNorm2d call on a small input, torch.nn against normlab, fastest of 300 calls each
(see benchmarks/README.md, "Per-call cost"). Prints JSON; run it once per tree to compare two versions:

    PYTHONPATH=src python benchmarks/per_call.py "[2, 8, 4, 4]"
"""
import sys, time, torch, json
torch.set_num_threads(1)
import normlab.nn as nl
shape = tuple(json.loads(sys.argv[1]))
out = {}
for layout in ("contiguous", "channels_last"):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for mode in ("train_fwd", "train_fwd_bwd", "eval"):
        for name, cls in (("torch", torch.nn.BatchNorm2d), ("normlab", nl.BatchNorm2d)):
            m = cls(shape[1]).train(mode != "eval")
            x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_(mode != "eval")
            g = torch.randn(shape).contiguous(memory_format=fmt)
            best = float("inf")
            for rep in range(300):
                t = time.perf_counter()
                if mode == "eval":
                    with torch.no_grad(): m(x)
                elif mode == "train_fwd":
                    m(x)
                else:
                    m(x).backward(g); x.grad = None
                best = min(best, time.perf_counter() - t)
            out[f"{layout} {mode} {name}"] = best * 1e6
print(json.dumps(out))
