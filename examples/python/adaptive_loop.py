"""A minimal draft/verify loop with speckv's γ decision plugged in (PyTorch; NumPy fallback).

The "models" are bigram tables over a small vocabulary — the target T, and a draft D = T + noise
(the noise sets the acceptance rate) — so the loop shows the integration, not language modelling:
each step the controller picks γ per sequence from the previous step's draft features, the draft
samples γ tokens (statistics and features accumulated in place by `softmax_stats`), the target
scores the γ + 1 positions, and `verify` accepts, corrects and emits. With --auto, γ is decided
while drafting instead (`softmax_stats_stop`: the per-token stopping rule of `--policy auto`, a
hazard model weighing each draft against the step's costs), and the draft loop ends when every
sequence has stopped. Every buffer is allocated once before the loop.

The shipped hazard model was trained on greedy Qwen2.5-Coder drafts, where a flat (high-entropy)
draft is rarely accepted. Here the draft samples at temperature 1 from a distribution close to the
target's, so flat drafts are often accepted and --auto drafts too little (`--backend numpy --steps
200 --batch 1 --auto --noise 0.3`: mean γ 0.64, 1.13 tokens per target pass against fixed γ = 4's
1.72). A hazard model is specific to its draft, target and sampling: --record writes the verified
drafts as draft records, `speckv train --hazard --steps drafts.csv --out hazard.json` trains one on
them, and --auto --hazard hazard.json runs it (1.70 with the README's commands). --odds-scale scales
a model's odds instead, as `generate`'s online calibration does. The loop drafts and verifies its
batch in lockstep, so --lockstep lets the batch decide together (a sequence's extra draft is free
while another drafts on): at --batch 4 with the trained model, 6.74 tokens per target pass against
6.08 deciding alone and fixed γ = 4's 6.77.

--noise takes one value per sequence too (a batch of prompts the draft predicts well and badly), and
--calibrate batch|each calibrates the model's odds online after every verification — one scale for
the batch (`speckv.calibrate`) or one per sequence (`speckv.calibrate_each`, passed to
`softmax_stats_stop` as `odds_scales`). The README's "One odds scale per sequence" has the numbers.

    python examples/python/adaptive_loop.py [--backend torch|numpy] [--device cpu|cuda]
                                            [--steps 50] [--noise 1.0 | --noise a,b,…]
                                            [--fixed-gamma N | --auto] [--lockstep]
                                            [--calibrate none|batch|each] [--hazard JSON]
                                            [--record CSV]
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
    ap.add_argument("--noise", default="1.0",
                    help="the draft's noise: one value, or one per sequence (comma-separated: a batch "
                         "of prompts the draft predicts well and badly)")
    ap.add_argument("--fixed-gamma", type=int, default=0, help="0: speckv's controller decides")
    ap.add_argument("--auto", action="store_true",
                    help="per-token stopping (the shipped hazard model, the assumed costs)")
    ap.add_argument("--odds-scale", type=float, default=1.0,
                    help="--auto: the hazard model's odds multiplied by this (1: as trained)")
    ap.add_argument("--calibrate", choices=["none", "batch", "each"], default="none",
                    help="--auto: calibrate the model's odds online after each verification, one "
                         "scale for the batch (speckv.calibrate) or one per sequence "
                         "(speckv.calibrate_each, passed as odds_scales)")
    ap.add_argument("--lockstep", action="store_true",
                    help="--auto: the batch decides together (it drafts and verifies in lockstep)")
    ap.add_argument("--hazard", metavar="JSON",
                    help="--auto: a hazard model from `speckv train --hazard` (default: the shipped one)")
    ap.add_argument("--record", metavar="CSV",
                    help="write every verified draft as a draft record, to train a hazard model on: "
                         "speckv train --hazard --steps CSV --out JSON")
    ap.add_argument("--controller", default=os.path.join(ROOT, "assets", "controller.json"))
    args = ap.parse_args()
    if args.auto and args.fixed_gamma:
        ap.error("--auto and --fixed-gamma exclude each other")
    if (args.hazard or args.lockstep or args.calibrate != "none") and not args.auto:
        ap.error("--hazard, --lockstep and --calibrate shape --auto's rule: they need --auto")
    B, V, GMAX = args.batch, args.vocab, 8
    noise = [float(x) for x in args.noise.split(",")]
    if len(noise) not in (1, B):
        ap.error(f"--noise: one value or one per sequence ({B}), got {len(noise)}")
    cands = [1, 2, 4, 6, 8]

    if args.backend == "torch":
        try:
            import torch
        except ImportError:
            print("torch is not installed: falling back to --backend numpy")
            args.backend = "numpy"
    rng = np.random.default_rng(0)
    T = rng.normal(0, 3, (V, V)).astype(np.float32)
    # One draft table per sequence (the same one when --noise is one value): D_b = T + noise_b·N.
    N = rng.normal(0, 1, (V, V))
    D = np.stack([(T + noise[b % len(noise)] * N).astype(np.float32) for b in range(B)])
    rows = np.arange(B)
    if args.backend == "torch":
        dev = torch.device(args.device)
        T, D = torch.from_numpy(T).to(dev), torch.from_numpy(D).to(dev)
        rows = torch.arange(B, device=dev)
        zeros = lambda shape, dt: torch.zeros(shape, dtype=getattr(torch, dt), device=dev)  # noqa: E731
        host = lambda x: x.cpu().numpy()  # noqa: E731
        sampled = lambda st: st[:, 5]  # int32 [rows, 8] records: field 5 is `sampled`  # noqa: E731
        take = lambda tbl, idx: tbl[idx.long()]  # noqa: E731
        take_each = lambda tbl, idx: tbl[rows, idx.long()]  # noqa: E731
        ctx = speckv.Context.cuda() if args.device == "cuda" else speckv.Context.cpu()
    else:
        zeros = lambda shape, dt: np.zeros(shape, dtype=dt)  # noqa: E731
        host = lambda x: x  # noqa: E731
        sampled = lambda st: st["sampled"]  # noqa: E731
        take = lambda tbl, idx: tbl[idx]  # noqa: E731
        take_each = lambda tbl, idx: tbl[rows, idx]  # noqa: E731
        ctx = speckv.Context.cpu()
    ctx.load_controller(args.controller, cands)
    # The assumed step costs (a draft pass 1/3 of a target pass, verification 2 % dearer a drafted
    # position): what --auto weighs, and what every policy is scored with below. An engine passes
    # its own measured times instead.
    costs = speckv.step_costs(None, GMAX)
    if args.auto:
        ctx.load_hazard(args.hazard)
    record = None
    if args.record:
        record = open(args.record, "w")
        # Each sequence is a run: training holds whole runs out for validation and testing.
        record.write("run,step,position,entropy,confidence,compression,accepted\n")

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
    stop_state = speckv.new_stop_state(B, like)
    stopped = zeros((1,), "uint32")
    # Online calibration: the hazards each kept draft was weighed with, and the odds scales.
    hazards = zeros((B, speckv._speckv.STOP_TIMES), "float32")
    odds_scale = args.odds_scale
    scales_host = np.full(B, args.odds_scale, dtype=np.float32)
    scales = zeros((B,), "float32")
    scales[:] = args.odds_scale

    produced, drafted, accepted, decide_s, cost = 0, 0, 0, 0.0, 0.0
    for step in range(args.steps):
        # γ per sequence from the previous step's features (fallback 4 on the first step).
        t0 = time.perf_counter()
        if args.fixed_gamma:
            gammas[:] = args.fixed_gamma
        elif not args.auto:
            ctx.decide_gamma(accum, gammas, compression_code=0.0, fallback_gamma=4)
        g = GMAX if args.auto else int(host(gammas).max())  # verify reads each sequence's own γ_b
        decide_s += time.perf_counter() - t0
        prev = pending
        stopped[:] = 0
        seen = []  # each draft position's statistics (host copies), for --record
        for j in range(g):
            draft[:, j, :] = take_each(D, prev)
            mode = "reset" if j == 0 else "add"
            if args.auto:
                # Statistics, then per sequence: keep or discard this draft, draft on or stop.
                ctx.softmax_stats_stop(draft[:, j, :], state=stop_state, gammas=gammas, costs=costs,
                                       accumulate=mode, accum=accum, stopped=stopped, temperature=1.0,
                                       odds_scale=odds_scale, lockstep=args.lockstep,
                                       hazards=hazards,
                                       odds_scales=scales if args.calibrate == "each" else None,
                                       sample=True, seed=1, step=step * GMAX + j, out=stats)
            else:
                ctx.softmax_stats(draft[:, j, :], temperature=1.0, sample=True, seed=1,
                                  step=step * GMAX + j, accumulate=mode, accum=accum, out=stats)
            tokens[:, j] = sampled(stats)
            if record:
                seen.append(speckv.stats_view(stats).copy())
            prev = tokens[:, j]
            if args.auto and int(host(stopped)[0]) >= B:
                g = j + 1  # every sequence has stopped: no more draft passes
                break
        g_host = host(gammas)
        cost += g * costs["draft"] + costs["verify"][int(g_host.max())]
        # Target rows for [pending, x_0 .. x_{g-1}] (a bigram model: row = T[previous token]).
        target[:, 0, :] = take(T, pending)
        for j in range(g):
            target[:, j + 1, :] = take(T, tokens[:, j])
        # Whole buffers: verification reads only the first γ_b rows of each sequence.
        o = ctx.verify(target, draft, tokens, gammas, seed=2, step=step, out=out)
        acc, cnt, em = host(o["accepted"]), host(o["emitted_count"]), host(o["emitted"])
        assert (cnt == acc + 1).all() and (host(o["flags"]) == 0).all()
        if args.calibrate == "batch":
            odds_scale = speckv.calibrate(odds_scale, host(hazards), g_host, acc)
        elif args.calibrate == "each":
            speckv.calibrate_each(scales_host, host(hazards), g_host, acc)
            scales[:] = torch.from_numpy(scales_host).to(dev) if args.backend == "torch" else scales_host
        if record:
            # The drafts verification read (j < γ_b), accepted while j < the accepted count.
            for b in range(B):
                for j in range(int(g_host[b])):
                    st = seen[j][b]
                    record.write(f"{b},{step},{j},{float(st['entropy'])!r},{float(st['confidence'])!r},fp16,"
                                 f"{int(j < acc[b])}\n")
        produced += int(cnt.sum())
        drafted += int(g_host.sum())
        accepted += int(acc.sum())
        last = np.array([em[b, cnt[b] - 1] for b in range(B)], dtype=np.int32)
        pending = zeros((B,), "int32")
        pending[:] = torch.from_numpy(last).to(dev) if args.backend == "torch" else last
    if record:
        record.close()
    calibrated = {"none": "", "batch": ", calibrated", "each": ", calibrated per sequence"}[args.calibrate]
    policy = (f"fixed γ = {args.fixed_gamma}" if args.fixed_gamma
              else f"per-token stopping (auto{', lockstep' if args.lockstep else ''}{calibrated})" if args.auto
              else f"speckv controller over {cands}")
    decision = ("in the statistics pass" if args.auto
                else f"{decide_s / args.steps * 1e6:.0f} µs per batch")
    print(f"{args.backend}/{ctx.device}, {policy}: {args.steps} steps × {B} sequences, "
          f"{produced / (args.steps * B):.2f} tokens per step, acceptance {accepted / max(drafted, 1):.3f}, "
          f"mean γ {drafted / (args.steps * B):.2f}, {produced / cost:.2f} tokens per target pass "
          f"under the assumed costs, decision {decision}")
    if args.calibrate == "batch":
        print(f"odds scale after the run: {odds_scale:.3f}")
    elif args.calibrate == "each":
        print("odds scales after the run: " + ", ".join(f"{k:.3f}" for k in scales_host))


if __name__ == "__main__":
    main()
