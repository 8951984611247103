"""STREAM-style read bandwidth probe: torch.sum over float32 buffers of several sizes, 2 threads."""
import json, statistics, sys, time
import torch

def read_bandwidth(mb: int = 2048, repeats: int = 9, threads: int = 2) -> dict:
    torch.set_num_threads(threads)
    x = torch.ones(mb * 2**20 // 4, dtype=torch.float32)
    x.sum()  # touch
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter(); x.sum(); ts.append(time.perf_counter() - t0)
    ts.sort()
    med = statistics.median(ts)
    q = statistics.quantiles(ts, n=4)
    return {"mb": mb, "gb_s": x.numel() * 4 / med / 1e9, "iqr_gb_s": [x.numel() * 4 / q[2] / 1e9, x.numel() * 4 / q[0] / 1e9]}

if __name__ == "__main__":
    out = [read_bandwidth(mb) for mb in (32, 128, 256, 512, 1024, 2048, 4096)]
    for r in out: print(json.dumps(r))
