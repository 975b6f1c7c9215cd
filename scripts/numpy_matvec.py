"""numpy's f32 matvec / small GEMM, the CPU peer of `cargo bench --bench gemv` (and torch.matmul in
f16 on a GPU, the cuBLAS peer).

usage: numpy_matvec.py OUT IN M MIN_SECONDS [numpy|torch]
prints JSON {"seconds_per_call": ...}"""
import json, sys, time
import numpy as np


def main():
    out, inp, m, min_s = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    backend = sys.argv[5] if len(sys.argv) > 5 else "numpy"
    if backend == "torch":
        import torch
        w = torch.randn(out, inp, device="cuda", dtype=torch.float16)
        x = torch.randn(m, inp, device="cuda", dtype=torch.float16)
        run = lambda: torch.matmul(x, w.t())
        sync = torch.cuda.synchronize
    else:
        rng = np.random.default_rng(0)
        w = rng.standard_normal((out, inp), dtype=np.float32)
        x = rng.standard_normal((m, inp), dtype=np.float32)
        run = lambda: x @ w.T
        sync = lambda: None
    run()
    sync()
    calls, start = 0, time.perf_counter()
    while True:
        run()
        calls += 1
        sync()
        el = time.perf_counter() - start
        if el >= min_s and calls >= 3:
            break
    print(json.dumps({"seconds_per_call": el / calls, "calls": calls}))


if __name__ == "__main__":
    main()
