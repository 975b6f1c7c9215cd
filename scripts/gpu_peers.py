#!/usr/bin/env python3
"""PyTorch peers of speckv's kernels on the same GPU, timed the same way as `speckv bench gpu`:
CUDA events around each call, a buffer of twice the L2 zeroed before every timed call, shapes and
dtypes equal to the kernels' cases. Prints JSON:

  copy_gbps               device-to-device copy, 1 GiB, read + write over time
  softmax_stats[shape]    eager statistics (log-sum-exp, entropy, top-1, argmax; Gumbel sample)
  verify[shape]           eager speculative sampling (accept test, residual or bonus draw)
  matmul[shape]           torch.matmul of f16 x and f16 W (cuBLAS), the FP16 GEMV peer

Run by gpu-bundle/run.sh on the GPU machine (torch 2.11 there); `--quick` matches `bench gpu --quick`.
"""
import json
import sys

import torch

QUICK = "--quick" in sys.argv
ITERS = 5 if QUICK else 20
V = 128256
dev = torch.device("cuda")
props = torch.cuda.get_device_properties(0)
l2 = getattr(props, "L2_cache_size", 0) or (60 << 20)
flush = torch.empty(max(2 * l2, 64 << 20), dtype=torch.uint8, device=dev)


def cold(fn):
    fn()
    torch.cuda.synchronize()
    ev = []
    for _ in range(ITERS):
        flush.zero_()
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        ev.append((s, e))
    torch.cuda.synchronize()
    return sum(s.elapsed_time(e) for s, e in ev) / len(ev) * 1e3  # µs


def copy_gbps():
    n = 1 << 30
    src = torch.zeros(n, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    us = cold(lambda: dst.copy_(src))
    return 2 * n / (us * 1e-6) / 1e9


def stats(x, t, sample, gen):
    z = x.float() / t
    lse = torch.logsumexp(z, -1, keepdim=True)
    logp = z - lse
    p = logp.exp()
    ent = -(p * logp).sum(-1)
    conf = p.max(-1).values
    am = x.argmax(-1)
    if sample:
        u = torch.rand(z.shape, generator=gen, device=dev).clamp_min(1e-20)
        tok = (z - (-u.log()).log()).argmax(-1)
        return ent, conf, am, tok
    return ent, conf, am


def verify(target, draft, tokens, t, gen):
    # target [B, γ+1, V], draft [B, γ, V], tokens [B, γ] — Leviathan et al. / Chen et al.
    b, g1, v = target.shape
    g = g1 - 1
    p = torch.softmax(target.float() / t, -1)
    q = torch.softmax(draft.float() / t, -1)
    idx = tokens.long().unsqueeze(-1)
    px = p[:, :g].gather(-1, idx).squeeze(-1)
    qx = q.gather(-1, idx).squeeze(-1)
    ratio = torch.clamp(px / qx, max=1.0)
    u = torch.rand(ratio.shape, generator=gen, device=dev)
    acc = (u < ratio).int()
    k = torch.cumprod(acc, -1).sum(-1)  # accepted
    rows = torch.arange(b, device=dev)
    kk = k.clamp(max=g - 1)
    resid = torch.relu(p[rows, kk] - q[rows, kk])
    resid = resid / resid.sum(-1, keepdim=True).clamp_min(1e-30)
    bonus = p[rows, g]
    dist = torch.where((k == g).unsqueeze(-1), bonus, resid)
    emit = torch.multinomial(dist, 1, generator=gen).squeeze(-1)
    return k, emit


def main():
    out = {"device": props.name, "torch": torch.__version__, "timing": "CUDA events; 2×L2 zeroed before each call"}
    out["copy_gbps"] = copy_gbps()
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    out["softmax_stats"] = {}
    for rows in (1, 64):
        x = (torch.rand(rows, V, generator=gen, device=dev) * 16 - 8).half()
        for sample in (False, True):
            key = f"{rows}x{V} f16" + (" sample" if sample else "")
            out["softmax_stats"][key] = cold(lambda: stats(x, 1.0, sample, gen))
    out["verify"] = {}
    for b in ((1, 64) if QUICK else (1, 8, 64)):
        g = 4
        target = (torch.rand(b, g + 1, V, generator=gen, device=dev) * 16 - 8).half()
        draft = target[:, :g].clone()
        tokens = torch.full((b, g), 3, dtype=torch.int32, device=dev)
        out["verify"][f"B{b} γ{g} V{V} f16"] = cold(lambda: verify(target, draft, tokens, 1.0, gen))
    out["matmul"] = {}
    shapes = [(4096, 4096), (1536, 8960)] if QUICK else [(4096, 4096), (14336, 4096), (4096, 14336), (1536, 8960), (8960, 1536)]
    for o, i in shapes:
        w = (torch.rand(o, i, generator=gen, device=dev) * 0.1 - 0.05).half()
        for m in (1, 5, 16):
            x = torch.rand(m, i, generator=gen, device=dev).half()
            out["matmul"][f"fp16 {o}x{i} M{m}"] = cold(lambda: torch.matmul(x, w.t()))
    json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
