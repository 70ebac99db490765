"""One process of a gloo test group: ``python gloo_runner.py WORKERS SCENARIO RANK WORLD PORT`` joins a gloo
group on 127.0.0.1 (30 s timeout), runs ``SCENARIO(rank, world)`` from the file WORKERS, destroys the group
and exits 0; a failed check exits 1 with the traceback on stderr. Started by the ``gloo_spawn`` fixture."""

import datetime
import importlib.util
import sys

import torch.distributed as dist


def main():
    workers, scenario = sys.argv[1], sys.argv[2]
    rank, world, port = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    spec = importlib.util.spec_from_file_location("workers", workers)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        getattr(module, scenario)(rank, world)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
