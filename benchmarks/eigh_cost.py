"""Wall time of the k x k eigen-solves of one data-aware estimate, per way of running them.

    python benchmarks/eigh_cost.py [--shapes 48x640,192x215,192x80] [--out eigh_cost.json]

The shapes are (matrices x k) of the 1.3B preset at r = n/4 (qkv + fc1: 48 x 640; fc2: 8
blocks x 24 layers of 215; proj: 192 x 80). Each way solves the same random SPD fp64 batch
with torch.linalg.eigh: on the GPU (fp64 and fp32; torch loops cusolver syevd over the batch
for k > 32), on the CPU with torch's default threads, and on the CPU from a pool of P Python
threads each running one LAPACK call at a time (torch.set_num_threads(1) during the solve).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import torch


def spd(n: int, k: int, device) -> torch.Tensor:
    a = torch.randn(n, k, k, dtype=torch.float64, device=device)
    return a @ a.transpose(1, 2) + k * torch.eye(k, dtype=torch.float64, device=device)


def timed(fn) -> float:
    fn()  # warm-up (cusolver handles, workspaces, thread pools)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def pooled(mats: list[torch.Tensor], workers: int) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda m: torch.linalg.eigh(m), [x for b in mats for x in b.split(4)]))
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="48x640,192x215,192x80")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    cpu = [spd(n, k, "cpu") for n, k in shapes]
    report = {"shapes": shapes, "cpu_threads": torch.get_num_threads(), "ms": {}}
    if torch.cuda.is_available():
        report["device"] = torch.cuda.get_device_name()
        gpu = [m.cuda() for m in cpu]
        report["ms"]["gpu_fp64"] = timed(lambda: [torch.linalg.eigh(m) for m in gpu])
        g32 = [m.float() for m in gpu]
        report["ms"]["gpu_fp32"] = timed(lambda: [torch.linalg.eigh(m) for m in g32])
    report["ms"]["cpu_default_threads"] = timed(lambda: [torch.linalg.eigh(m) for m in cpu])
    for workers in (2, 4, 8, 16):
        report["ms"][f"cpu_pool_{workers}"] = timed(lambda: pooled(cpu, workers))
    print(json.dumps(report, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
