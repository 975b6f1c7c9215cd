"""llama.cpp's plain decoding of a GGUF (llama-cpp-python), the peer of `speckv generate`:
same prompt format (ChatML), greedy, same thread count.

usage: llamacpp_peer.py MODEL.gguf PROMPT MAX_TOKENS THREADS
prints JSON {"tokens": n, "seconds": s, "tokens_per_second": r, "text": ...}"""
import json, sys, time
from llama_cpp import Llama


def main():
    path, prompt, max_tokens, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    llm = Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    toks = llm.tokenize(text.encode(), add_bos=False, special=True)
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


if __name__ == "__main__":
    main()
