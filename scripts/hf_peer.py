#!/usr/bin/env python3
"""HF transformers peer of speckv's device decode step, on the same GPU in the same run.

Qwen2 models are built from the committed shapes (assets/shapes/*.json, the GGUF metadata of the
Qwen2.5-Coder pair) with random FP16 weights, on the device (no weights travel, no network). Timed
with CUDA events, the L2 flushed before each timed call, the KV cache cropped back to POSITION
after each call so every step sees the same cache length:

  forward_ms[M]        the target's forward pass of M = γ + 1 new tokens (γ = 0..8)
  draft_ms_per_token   the draft's forward pass of one token
  draft_feed_ms[n-1]   the draft's forward pass fed n = 1..8 tokens (a step's first draft pass)
  assisted_step_ms[γ]  model.generate with assistant_model, num_assistant_tokens = γ (constant
                       schedule, no confidence stop): wall time per generated token; with random
                       weights nothing is accepted, so one token = one step of γ drafts + a verify

Writes JSON to stdout, and HF's cost model (speckv's CostModel format) to --cost-out, so
`speckv bench decode --predict-only --traces T --cost hf_cost.json` predicts HF's tokens/s from the
same traces. Usage: hf_peer.py TARGET.json DRAFT.json [--cost-out F] [--quick]
"""
import json
import sys
import time

import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

QUICK = "--quick" in sys.argv
ITERS = 5 if QUICK else 20
POSITION = 256
GAMMA_MAX = 8
DRAFT_CATCH_UP = 8
dev = torch.device("cuda")
props = torch.cuda.get_device_properties(0)
l2 = getattr(props, "L2_cache_size", 0) or (60 << 20)
flush = torch.empty(max(2 * l2, 64 << 20), dtype=torch.uint8, device=dev)


def config(path):
    s = json.load(open(path))
    return Qwen2Config(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["ffn"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=s["context"],
        rope_theta=s["rope_base"],
        rms_norm_eps=s["rms_eps"],
        tie_word_embeddings=True,
        use_cache=True,
    )


def build(path):
    torch.manual_seed(0)
    with torch.device(dev):
        m = Qwen2ForCausalLM(config(path)).to(torch.float16)
    return m.eval()


def cold_ms(fn, after=None):
    fn()
    if after:
        after()
    torch.cuda.synchronize()
    total = 0.0
    for _ in range(ITERS):
        flush.zero_()
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        total += s.elapsed_time(e)
        if after:
            after()
    return total / ITERS


@torch.no_grad()
def forward_ms(model, m):
    ids = torch.randint(0, model.config.vocab_size, (1, POSITION), device=dev)
    cache = DynamicCache()
    model(input_ids=ids, past_key_values=cache, use_cache=True)
    new = torch.randint(0, model.config.vocab_size, (1, m), device=dev)
    return cold_ms(
        lambda: model(input_ids=new, past_key_values=cache, use_cache=True),
        after=lambda: cache.crop(POSITION),
    )


@torch.no_grad()
def assisted_ms(target, draft, gamma, tokens=16):
    ids = torch.randint(0, target.config.vocab_size, (1, POSITION), device=dev)
    draft.generation_config.num_assistant_tokens = gamma
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0
    kw = dict(assistant_model=draft, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    target.generate(ids, **kw)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = target.generate(ids, **kw)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3 / max(1, out.shape[1] - POSITION)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    cost_out = sys.argv[sys.argv.index("--cost-out") + 1] if "--cost-out" in sys.argv else None
    if cost_out in args:
        args.remove(cost_out)
    target, draft = build(args[0]), build(args[1])
    res = {"device": props.name, "torch": torch.__version__, "position": POSITION, "iters": ITERS}
    import transformers

    res["transformers"] = transformers.__version__
    res["forward_ms"] = {m: forward_ms(target, m) for m in range(1, GAMMA_MAX + 2)}
    # The draft fed n = 1..8 tokens (speckv's DRAFT_CATCH_UP): a step's first pass feeds the pending
    # token, a draft a fully accepted step left unseen and the tokens of plain steps.
    res["draft_feed_ms"] = [forward_ms(draft, n) for n in range(1, DRAFT_CATCH_UP + 1)]
    res["draft_ms_per_token"] = res["draft_feed_ms"][0]
    res["assisted_step_ms"] = {g: assisted_ms(target, draft, g) for g in ([1, 4, 8] if QUICK else range(1, GAMMA_MAX + 1))}
    cost = {
        "draft_ms_per_token": res["draft_ms_per_token"],
        "verify_ms": [res["forward_ms"][g + 1] for g in range(GAMMA_MAX + 1)],
        "draft_feed_ms": res["draft_feed_ms"],
        "source": f"measured by scripts/hf_peer.py on {props.name}: HF transformers "
        f"{transformers.__version__} Qwen2 forward passes (random fp16 weights) at cache length {POSITION}",
    }
    if cost_out:
        json.dump(cost, open(cost_out, "w"), indent=2)
    res["cost"] = cost
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
