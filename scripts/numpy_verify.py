"""A vectorised reference of speckv's batched verification (stochastic rejection sampling, draft
given as logits) in numpy or PyTorch: the peer of `cargo bench --bench verify`.

usage: numpy_verify.py DIR MIN_SECONDS [numpy|torch]
DIR holds target.npy [B, G+1, V] and draft.npy [B, G, V] logits (f16), tokens.npy [B, G] (i32) and
gammas.npy [B] (i32).
prints JSON {"seconds_per_call": ..., "calls": ..., "accepted_mean": ...}"""
import json, sys, time
import numpy as np


def verify_numpy(t16, d16, tokens, gammas, rng):
    B, G1, V = t16.shape
    G = G1 - 1
    t = t16.astype(np.float32)
    d = d16.astype(np.float32)
    t -= t.max(-1, keepdims=True)
    p = np.exp(t)
    p /= p.sum(-1, keepdims=True)
    d -= d.max(-1, keepdims=True)
    q = np.exp(d)
    q /= q.sum(-1, keepdims=True)
    px = np.take_along_axis(p[:, :G], tokens[..., None], -1)[..., 0]
    qx = np.take_along_axis(q, tokens[..., None], -1)[..., 0]
    ratio = np.minimum(1.0, px / np.maximum(qx, 1e-30))
    u = rng.random((B, G), dtype=np.float32)
    ok = (u < ratio) & (np.arange(G)[None, :] < gammas[:, None])
    # accepted = length of the all-accepted prefix, capped by gamma
    acc = np.where(ok.all(-1), G, np.argmin(ok, -1))
    acc = np.minimum(acc, gammas)
    rows = np.arange(B)
    rejected = acc < gammas
    pk = p[rows, acc]
    qk = q[rows, np.minimum(acc, G - 1)]
    resid = np.where(rejected[:, None], np.maximum(pk - qk, 0.0), pk)
    e = rng.exponential(size=resid.shape).astype(np.float32)
    emit = np.argmax(resid / e, -1)
    return acc, emit


def verify_torch(t16, d16, tokens, gammas, gen):
    import torch
    B, G1, V = t16.shape
    G = G1 - 1
    p = torch.softmax(t16.float(), -1)
    q = torch.softmax(d16.float(), -1)
    px = torch.gather(p[:, :G], -1, tokens[..., None])[..., 0]
    qx = torch.gather(q, -1, tokens[..., None])[..., 0]
    ratio = torch.clamp(px / qx.clamp_min(1e-30), max=1.0)
    u = torch.rand((B, G), device=p.device, generator=gen)
    ok = (u < ratio) & (torch.arange(G, device=p.device)[None, :] < gammas[:, None])
    acc = torch.where(ok.all(-1), torch.full_like(gammas, G), torch.argmin(ok.int(), -1))
    acc = torch.minimum(acc, gammas)
    rows = torch.arange(B, device=p.device)
    rejected = acc < gammas
    pk = p[rows, acc]
    qk = q[rows, torch.clamp(acc, max=G - 1)]
    resid = torch.where(rejected[:, None], torch.clamp(pk - qk, min=0.0), pk)
    e = torch.empty_like(resid).exponential_(generator=gen)
    emit = torch.argmax(resid / e, -1)
    return acc, emit


def main():
    path, min_s = sys.argv[1], float(sys.argv[2])
    backend = sys.argv[3] if len(sys.argv) > 3 else "numpy"
    z = {k: np.load(f"{path}/{k}.npy") for k in ("target", "draft", "tokens", "gammas")}
    target, draft, tokens, gammas = z["target"], z["draft"], z["tokens"].astype(np.int64), z["gammas"].astype(np.int64)
    if backend == "torch":
        import torch
        dev = "cuda"
        target, draft = torch.from_numpy(target).to(dev), torch.from_numpy(draft).to(dev)
        tokens, gammas = torch.from_numpy(tokens).to(dev), torch.from_numpy(gammas).to(dev)
        gen = torch.Generator(device=dev).manual_seed(0)
        run = lambda: verify_torch(target, draft, tokens, gammas, gen)
        sync = torch.cuda.synchronize
    else:
        rng = np.random.default_rng(0)
        run = lambda: verify_numpy(target, draft, tokens, gammas, rng)
        sync = lambda: None
    acc, _ = run()
    sync()
    calls, start = 0, time.perf_counter()
    while True:
        acc, _ = run()
        calls += 1
        sync()
        el = time.perf_counter() - start
        if el >= min_s and calls >= 3:
            break
    acc_mean = float(acc.float().mean()) if backend == "torch" else float(acc.mean())
    print(json.dumps({"seconds_per_call": el / calls, "calls": calls, "accepted_mean": acc_mean}))


if __name__ == "__main__":
    main()
