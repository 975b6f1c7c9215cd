"""A minimal draft/verify loop with speckv's γ decision plugged in (PyTorch; NumPy fallback).

The "models" are bigram tables over a small vocabulary — the target T, and a draft D = T + noise
(the noise sets the acceptance rate) — so the loop shows the integration, not language modelling:
each step the controller picks γ per sequence from the previous step's draft features, the draft
samples γ tokens (statistics and features accumulated in place by `softmax_stats`), the target
scores the γ + 1 positions, and `verify` accepts, corrects and emits. Every buffer is allocated
once before the loop.

    python examples/python/adaptive_loop.py [--backend torch|numpy] [--device cpu|cuda]
                                            [--steps 50] [--noise 1.0] [--fixed-gamma N]
"""
import argparse
import os
import time

import numpy as np

import speckv

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=["torch", "numpy"], default="torch")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--fixed-gamma", type=int, default=0, help="0: speckv's controller decides")
    ap.add_argument("--controller", default=os.path.join(ROOT, "assets", "controller.json"))
    args = ap.parse_args()
    B, V, GMAX = args.batch, args.vocab, 8
    cands = [1, 2, 4, 6, 8]

    if args.backend == "torch":
        try:
            import torch
        except ImportError:
            print("torch is not installed: falling back to --backend numpy")
            args.backend = "numpy"
    rng = np.random.default_rng(0)
    T = rng.normal(0, 3, (V, V)).astype(np.float32)
    D = (T + rng.normal(0, args.noise, (V, V))).astype(np.float32)
    if args.backend == "torch":
        dev = torch.device(args.device)
        T, D = torch.from_numpy(T).to(dev), torch.from_numpy(D).to(dev)
        zeros = lambda shape, dt: torch.zeros(shape, dtype=getattr(torch, dt), device=dev)  # noqa: E731
        host = lambda x: x.cpu().numpy()  # noqa: E731
        sampled = lambda st: st[:, 5]  # int32 [rows, 8] records: field 5 is `sampled`  # noqa: E731
        take = lambda tbl, idx: tbl[idx.long()]  # noqa: E731
        ctx = speckv.Context.cuda() if args.device == "cuda" else speckv.Context.cpu()
    else:
        zeros = lambda shape, dt: np.zeros(shape, dtype=dt)  # noqa: E731
        host = lambda x: x  # noqa: E731
        sampled = lambda st: st["sampled"]  # noqa: E731
        take = lambda tbl, idx: tbl[idx]  # noqa: E731
        ctx = speckv.Context.cpu()
    ctx.load_controller(args.controller, cands)

    # Buffers, allocated once.
    like = T if args.backend == "torch" else None
    accum = speckv.new_accum(B, like)
    stats = speckv.new_stats(B, like)
    gammas = zeros((B,), "int32")
    tokens = zeros((B, GMAX), "int32")
    draft = zeros((B, GMAX, V), "float32")
    target = zeros((B, GMAX + 1, V), "float32")
    out = {k: zeros(s, dt) for k, s, dt in [
        ("accepted", (B,), "int32"), ("emitted", (B, GMAX + 1), "int32"), ("emitted_count", (B,), "int32"),
        ("counterfactual", (B, GMAX + 1), "int32"), ("ratios", (B, GMAX), "float32"), ("flags", (B,), "int32")]}
    pending = zeros((B,), "int32")

    produced, drafted, accepted, decide_s = 0, 0, 0, 0.0
    for step in range(args.steps):
        # γ per sequence from the previous step's features (fallback 4 on the first step).
        t0 = time.perf_counter()
        if args.fixed_gamma:
            gammas[:] = args.fixed_gamma
        else:
            ctx.decide_gamma(accum, gammas, compression_code=0.0, fallback_gamma=4)
        g_host = host(gammas)
        decide_s += time.perf_counter() - t0
        g = int(g_host.max())  # draft the longest γ; verify reads each sequence's own γ_b
        prev = pending
        for j in range(g):
            draft[:, j, :] = take(D, prev)
            ctx.softmax_stats(draft[:, j, :], temperature=1.0, sample=True, seed=1, step=step * GMAX + j,
                              accumulate="reset" if j == 0 else "add", accum=accum, out=stats)
            tokens[:, j] = sampled(stats)
            prev = tokens[:, j]
        # Target rows for [pending, x_0 .. x_{g-1}] (a bigram model: row = T[previous token]).
        target[:, 0, :] = take(T, pending)
        for j in range(g):
            target[:, j + 1, :] = take(T, tokens[:, j])
        # Whole buffers: verification reads only the first γ_b rows of each sequence.
        o = ctx.verify(target, draft, tokens, gammas, seed=2, step=step, out=out)
        acc, cnt, em = host(o["accepted"]), host(o["emitted_count"]), host(o["emitted"])
        assert (cnt == acc + 1).all() and (host(o["flags"]) == 0).all()
        produced += int(cnt.sum())
        drafted += int(g_host.sum())
        accepted += int(acc.sum())
        last = np.array([em[b, cnt[b] - 1] for b in range(B)], dtype=np.int32)
        pending = zeros((B,), "int32")
        pending[:] = torch.from_numpy(last).to(dev) if args.backend == "torch" else last
    policy = f"fixed γ = {args.fixed_gamma}" if args.fixed_gamma else f"speckv controller over {cands}"
    print(f"{args.backend}/{ctx.device}, {policy}: {args.steps} steps × {B} sequences, "
          f"{produced / (args.steps * B):.2f} tokens per step, acceptance {accepted / max(drafted, 1):.3f}, "
          f"mean γ {drafted / (args.steps * B):.2f}, decision {decide_s / args.steps * 1e6:.0f} µs per batch")


if __name__ == "__main__":
    main()
