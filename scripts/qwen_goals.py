"""The CPU-speed goals (issue 13) from the files scripts/qwen-tables writes, met or not.

usage: qwen_goals.py [RESULTS_DIR]   (default results/qwen) → markdown on stdout"""
import json, os, sys

d = sys.argv[1] if len(sys.argv) > 1 else "results/qwen"


def load(name):
    p = os.path.join(d, name)
    return json.load(open(p)) if os.path.exists(p) else None


rows = []


def goal(measure, value, target, met, source):
    state = "not measured" if value is None else ("met" if met else "not met")
    rows.append((measure, "–" if value is None else value, target, state, source))


llama = None
if os.path.exists(os.path.join(d, "llamacpp.jsonl")):
    rs = [json.loads(l) for l in open(os.path.join(d, "llamacpp.jsonl")) if l.strip()]
    if rs:
        llama = sum(r["tokens"] for r in rs) / sum(r["seconds"] for r in rs)
bench = load("gguf/bench.json")
if bench and llama:
    p = {x["policy"]: x["tokens_per_second"] for x in bench["policies"]}
    plain = p["plain"]
    goal("plain decoding of the target, gguf regime", f"{plain:.2f} tok/s = {plain / llama:.2f}× llama.cpp ({llama:.2f})",
         "≥ 1.0× llama.cpp", plain >= llama, "gguf/bench.json, llamacpp.jsonl")
    best = max((k for k in p if k != "plain"), key=lambda k: p[k])
    goal("best speculative policy", f"{best}: {p[best]:.2f} tok/s = {p[best] / llama:.2f}× llama.cpp",
         "≥ 1.5× llama.cpp", p[best] >= 1.5 * llama, "gguf/bench.json, llamacpp.jsonl")
else:
    goal("plain decoding of the target, gguf regime", None, "≥ 1.0× llama.cpp", False, "needs llama-cpp-python")
    goal("best speculative policy", None, "≥ 1.5× llama.cpp", False, "needs llama-cpp-python")
cpu = load("cpu.json")
if cpu:
    fp16 = next(r for r in cpu["rows"] if r["storage"] == "fp16")
    goal("FP16 regime product, M = 1", f'{fp16["gbps"]:.1f} GB/s = {100 * fp16["share_of_copy"]:.0f} % of copy ({cpu["copy_gbps"]:.1f} GB/s), {100 * fp16["share_of_read"]:.0f} % of read',
         "≥ 80 % of copy bandwidth", fp16["share_of_copy"] >= 0.8, "cpu.json (speckv bench cpu)")
cost = load("gguf/steps.cost.json")
if cost:
    v = cost["verify_ms"]
    extra = (v[-1] - v[0]) / (len(v) - 1) / v[0]
    goal("each extra verified position (gguf target, speckv profile)", f"{100 * extra:.1f} % of a target token",
         "≤ 15 %", extra <= 0.15, "gguf/steps.cost.json")
t = load("llamacpp_teacher.json")
if t:
    goal("teacher-forced top-1 agreement with llama.cpp", f'{100 * t["top1_agreement"]:.1f} % over {t["positions"]} positions, mean KL {t["mean_kl_nats"]:.4f} nats',
         "≥ 98 %", t["top1_agreement"] >= 0.98, "llamacpp_teacher.json")
else:
    goal("teacher-forced top-1 agreement with llama.cpp", None, "≥ 98 %", False, "needs llama-cpp-python")
print("| measure | measured | goal | state | from |")
print("|---|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(str(x) for x in r) + " |")
