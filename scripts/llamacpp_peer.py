"""llama.cpp (llama-cpp-python) as speckv's peer on the same GGUF.

usage:
  llamacpp_peer.py MODEL.gguf PROMPT MAX_TOKENS THREADS
      plain greedy decoding, same prompt format (ChatML) and thread count as `speckv generate`;
      prints JSON {"tokens": n, "seconds": s, "tokens_per_second": r, "text": ...}
  llamacpp_peer.py teacher MODEL.gguf PROMPTS.txt TOKENS THREADS SPECKV_BIN [REGIME]
      teacher-forced comparison: for each prompt (one per line), llama.cpp decodes TOKENS greedy
      tokens; on that same token sequence both llama.cpp and `speckv logits --target REGIME`
      (default gguf) give every continuation position's next-token distribution; prints JSON with
      the top-1 agreement and the mean KL(llama.cpp ‖ speckv) in nats over all positions.
"""
import json, os, subprocess, sys, tempfile, time

import numpy as np
from llama_cpp import Llama


def chat(prompt):
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def plain(path, prompt, max_tokens, threads):
    llm = Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    toks = llm.tokenize(chat(prompt).encode(), add_bos=False, special=True)
    llm.eval(toks)  # prefill, not timed
    out = []
    start = time.perf_counter()
    for _ in range(max_tokens):
        t = llm.sample(temp=0.0)
        if t == llm.token_eos() or llm.detokenize([t]) in (b"<|im_end|>",):
            break
        out.append(t)
        llm.eval([t])
    el = time.perf_counter() - start
    print(json.dumps({"tokens": len(out), "seconds": el, "tokens_per_second": len(out) / el,
                      "text": llm.detokenize(out).decode("utf-8", "replace")}))


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def teacher(path, prompts_file, n_tokens, threads, speckv, regime):
    llm = Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                logits_all=True, verbose=False)
    prompts = [l.rstrip("\n") for l in open(prompts_file) if l.strip()]
    agree = total = 0
    kls = []
    for prompt in prompts:
        toks = llm.tokenize(chat(prompt).encode(), add_bos=False, special=True)
        llm.reset()
        llm.eval(toks)
        cont = []
        for _ in range(n_tokens):
            t = llm.sample(temp=0.0)
            cont.append(t)
            llm.eval([t])
        seq = toks + cont
        # llama.cpp's logits of the positions after toks[-1] .. seq[-2] (predicting cont).
        ours_rows = len(cont)
        theirs = np.array(llm.scores[len(toks) - 1:len(seq) - 1], dtype=np.float32)
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "logits.f32")
            subprocess.run([speckv, "logits", "--model", path, "--target", regime,
                            "--tokens", ",".join(map(str, seq[:-1])), "--from", str(len(toks) - 1),
                            "--out", out], check=True, stdout=subprocess.DEVNULL)
            ours = np.fromfile(out, dtype="<f4").reshape(ours_rows, -1)
        v = min(ours.shape[1], theirs.shape[1])
        lt, lo = log_softmax(theirs[:, :v]), log_softmax(ours[:, :v])
        kls.extend((np.exp(lt) * (lt - lo)).sum(axis=1).tolist())
        agree += int((lt.argmax(axis=1) == lo.argmax(axis=1)).sum())
        total += ours_rows
    print(json.dumps({"prompts": len(prompts), "positions": total, "regime": regime,
                      "top1_agreement": agree / total, "mean_kl_nats": float(np.mean(kls)),
                      "max_kl_nats": float(np.max(kls))}))


if __name__ == "__main__":
    if sys.argv[1] == "teacher":
        a = sys.argv[2:]
        teacher(a[0], a[1], int(a[2]), int(a[3]), a[4], a[5] if len(a) > 5 else "gguf")
    else:
        plain(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
