"""The usual multi-pass numpy computation of the draft statistics, the CPU peer of speckv's
softmax_stats benchmark: softmax, then entropy, max, argmax, on the same data.

usage: numpy_softmax_stats.py FILE.npy TEMPERATURE MIN_SECONDS
prints JSON: {"seconds_per_call": ..., "calls": ..., "entropy": [first rows], "argmax": [...]}"""
import json, sys, time
import numpy as np

def stats(x, t):
    z = x.astype(np.float32) / np.float32(t)          # f16 input is widened, as a framework would
    m = z.max(axis=1, keepdims=True)
    e = np.exp(z - m)
    s = e.sum(axis=1, keepdims=True)
    p = e / s
    logp = (z - m) - np.log(s)
    entropy = -(p * logp).sum(axis=1)
    confidence = p.max(axis=1)
    argmax = z.argmax(axis=1)
    lse = (m + np.log(s))[:, 0]
    return entropy, confidence, argmax, lse

def main():
    path, t, min_s = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    x = np.load(path)
    res = stats(x, t)  # warm-up
    calls, start = 0, time.perf_counter()
    while True:
        res = stats(x, t)
        calls += 1
        el = time.perf_counter() - start
        if el >= min_s and calls >= 3:
            break
    print(json.dumps({"seconds_per_call": el / calls, "calls": calls,
                      "entropy": res[0][:4].astype(float).tolist(),
                      "argmax": res[2][:4].astype(int).tolist()}))

if __name__ == "__main__":
    main()
