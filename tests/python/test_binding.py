"""The Python binding against the C ABI: the C example's step reproduced through `speckv` on NumPy
arrays must print exactly what the C program prints (which capi/tests/c_example.rs checks equals
the Rust API); misuse raises SpeckvError with the status, never crashes.

    python -m unittest discover -s tests/python      (after `pip install .` and
                                                     `cargo build --release -p speckv-capi`)
"""
import os
import subprocess
import tempfile
import unittest

import numpy as np

import speckv

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONTROLLER = os.path.join(ROOT, "assets", "controller.json")
B, G, V = 2, 4, 64


def draft_logit(b, j, k):
    return ((k * k * (1 + j + b) + k * 37 + b * 5) % 64) / 4.0 - 8.0


def target_logit(b, j, k):
    if j == G:
        return ((k * 29 + b * 3) % 64) / 8.0 - 4.0
    return draft_logit(b, j, k) + (((k * 13) % 7) / 4.0 if b == 1 else 0.0)


def python_step():
    draft = np.array([[[draft_logit(b, j, k) for k in range(V)] for j in range(G)] for b in range(B)],
                     dtype=np.float32)
    target = np.array([[[target_logit(b, j, k) for k in range(V)] for j in range(G + 1)] for b in range(B)],
                      dtype=np.float32)
    ctx = speckv.Context.cpu()
    ctx.load_controller(CONTROLLER, [1, 2, 3, 4])
    accum = speckv.new_accum(B)
    tokens = np.zeros((B, G), dtype=np.int32)
    lines = []
    out = speckv.new_stats(B)  # preallocated once, reused per position
    for j in range(G):
        ctx.softmax_stats(draft[:, j, :], temperature=1.0, sample=True, seed=42, step=j,
                          accumulate="reset" if j == 0 else "add", accum=accum, out=out)
        for b in range(B):
            s = out[b]
            tokens[b, j] = s["sampled"]
            lines.append(f"stats j={j} b={b} entropy={s['entropy']:.6f} confidence={s['confidence']:.6f} "
                         f"argmax={s['argmax']} sampled={s['sampled']}")
    gammas = np.zeros(B, dtype=np.int32)
    expected = np.zeros(B, dtype=np.float32)
    flags = np.zeros(B, dtype=np.uint32)
    ctx.decide_gamma(accum, gammas, compression_code=0.0, fallback_gamma=4, expected=expected, flags=flags)
    for b in range(B):
        lines.append(f"gamma b={b} gamma={gammas[b]} expected={expected[b]:.6f} flags={flags[b]}")
    o = ctx.verify(target, draft, tokens, gammas, seed=7, step=0)
    for b in range(B):
        em = ",".join(str(t) for t in o["emitted"][b, : o["emitted_count"][b]])
        cf = ",".join(str(t) for t in o["counterfactual"][b])
        lines.append(f"verify b={b} accepted={o['accepted'][b]} flags={o['flags'][b]} emitted={em} counterfactual={cf}")
    lines.append("misuse: args is null")
    return "\n".join(lines) + "\n"


def c_step():
    lib = os.path.join(ROOT, "target", "release")
    exe = os.path.join(tempfile.mkdtemp(), "step")
    subprocess.run([os.environ.get("CC", "cc"), os.path.join(ROOT, "examples", "c", "step.c"), "-std=c99",
                    "-I", os.path.join(ROOT, "include"), f"-L{lib}", "-lspeckv_c", f"-Wl,-rpath,{lib}",
                    "-o", exe], check=True)
    return subprocess.run([exe, CONTROLLER], check=True, capture_output=True, text=True).stdout


AB, AG = 3, 6


def auto_draft_logit(b, j, k):
    if k == (j * 5 + b * 11) % V:
        return 12.0 if j < 2 * b else 1.0
    return ((k * k * (1 + j + b) + k * 37 + b * 5) % 64) / 16.0 - 2.0


def auto_target_logit(b, j, k):
    if j < AG and j <= b:
        return auto_draft_logit(b, j, k)
    return 9.0 if k == (j * 7 + b) % V else ((k * 29 + b * 3) % 64) / 16.0


def auto_draft():
    """The auto_step.c draft logits, [AB, AG, V]."""
    return np.array([[[auto_draft_logit(b, j, k) for k in range(V)] for j in range(AG)] for b in range(AB)],
                    dtype=np.float32)


def python_auto_step():
    """examples/c/auto_step.c through `speckv`: per-token stopping on NumPy arrays."""
    draft = auto_draft()
    target = np.array([[[auto_target_logit(b, j, k) for k in range(V)] for j in range(AG + 1)]
                       for b in range(AB)], dtype=np.float32)
    ctx = speckv.Context.cpu()
    ctx.load_hazard()
    costs = speckv.step_costs(None, AG)
    lines = [f"costs draft={costs['draft']:.6f} verify0={costs['verify'][0]:.6f} "
             f"verify{AG}={costs['verify'][AG]:.6f}"]
    accum, state = speckv.new_accum(AB), speckv.new_stop_state(AB)
    gammas = np.zeros(AB, dtype=np.int32)
    stopped = np.zeros(1, dtype=np.uint32)
    hazards = np.full((AB, speckv._speckv.STOP_TIMES), np.nan, dtype=np.float32)
    tokens = np.zeros((AB, AG), dtype=np.int32)
    out = speckv.new_stats(AB)
    drafted = 0
    for j in range(AG):
        if stopped[0] >= AB:
            break
        ctx.softmax_stats_stop(draft[:, j, :], state=state, gammas=gammas, costs=costs,
                               accumulate="reset" if j == 0 else "add", accum=accum, stopped=stopped, hazards=hazards,
                               temperature=0.0, step=j, out=out)
        drafted += 1
        for b in range(AB):
            tokens[b, j] = out[b]["argmax"]
            lines.append(f"draft j={j} b={b} confidence={out[b]['confidence']:.6f} kept={state[b]['kept']} "
                         f"stopped={state[b]['stopped']} expected={state[b]['expected']:.6f}")
        lines.append(f"after j={j} stopped={stopped[0]}")
    lines.append(f"drafted positions={drafted}")
    lines += [f"gamma b={b} gamma={gammas[b]}" for b in range(AB)]
    zero = np.zeros(AB, dtype=np.float32)
    o = ctx.verify(target, draft, tokens, gammas, target_temperature=zero, draft_temperature=zero)
    for b in range(AB):
        em = ",".join(str(t) for t in o["emitted"][b, : o["emitted_count"][b]])
        hz = ",".join(f"{h:.6f}" for h in hazards[b, : gammas[b]])
        lines.append(f"verify b={b} accepted={o['accepted'][b]} flags={o['flags'][b]} emitted={em} hazards={hz}")
    k = speckv.calibrate(1.0, hazards, gammas, o["accepted"])
    lines.append(f"calibrated odds_scale={k:.6f}")
    scales = np.ones(AB, dtype=np.float32)
    self_ = speckv.calibrate_each(scales, hazards, gammas, o["accepted"])
    assert self_ is scales
    lines += [f"calibrated each b={b} odds_scale={scales[b]:.6f}" for b in range(AB)]
    return "\n".join(lines) + "\n"


def c_auto_step():
    lib = os.path.join(ROOT, "target", "release")
    exe = os.path.join(tempfile.mkdtemp(), "auto_step")
    subprocess.run([os.environ.get("CC", "cc"), os.path.join(ROOT, "examples", "c", "auto_step.c"), "-std=c99",
                    "-I", os.path.join(ROOT, "include"), f"-L{lib}", "-lspeckv_c", f"-Wl,-rpath,{lib}",
                    "-o", exe], check=True)
    return subprocess.run([exe], check=True, capture_output=True, text=True).stdout


class BindingMatchesC(unittest.TestCase):
    def test_step_equals_the_c_example(self):
        self.assertEqual(python_step(), c_step())

    def test_auto_step_equals_the_c_example(self):
        text = python_auto_step()
        self.assertEqual(text, c_auto_step())
        self.assertIn("drafted positions=5", text)  # the counter ended the loop before γmax

    def test_lockstep_moves_the_batch_together(self):
        # The auto_step.c drafts: alone, the sequences stop at different places; in lockstep the
        # batch keeps and stops together, and the counter reaches the batch in one call.
        draft = auto_draft()
        ctx = speckv.Context.cpu()
        ctx.load_hazard()
        costs = speckv.step_costs(None, AG)
        ends = {}
        for lockstep in (False, True):
            accum, state = speckv.new_accum(AB), speckv.new_stop_state(AB)
            gammas, stopped = np.zeros(AB, dtype=np.int32), np.zeros(1, dtype=np.uint32)
            counts = []
            for j in range(AG):
                if stopped[0] >= AB:
                    break
                ctx.softmax_stats_stop(draft[:, j, :], state=state, gammas=gammas, costs=costs,
                                       accumulate="reset" if j == 0 else "add", accum=accum,
                                       stopped=stopped, temperature=0.0, step=j, lockstep=lockstep)
                counts.append(int(stopped[0]))
                if lockstep:
                    self.assertEqual(len(set(state["kept"])), 1)
                    self.assertIn(counts[-1], (0, AB))
            ends[lockstep] = list(gammas)
        self.assertGreater(len(set(ends[False])), 1, ends)
        self.assertEqual(len(set(ends[True])), 1, ends)

    def test_each_sequence_at_its_own_odds_scale(self):
        # Per-sequence scales: every sequence decides as it does alone in a batch at its scale.
        draft = auto_draft()
        ctx = speckv.Context.cpu()
        ctx.load_hazard()
        costs = speckv.step_costs(None, AG)

        def step(**odds):
            accum, state = speckv.new_accum(AB), speckv.new_stop_state(AB)
            gammas = np.zeros(AB, dtype=np.int32)
            seen = []
            for j in range(AG):
                ctx.softmax_stats_stop(draft[:, j, :], state=state, gammas=gammas, costs=costs,
                                       accumulate="reset" if j == 0 else "add", accum=accum,
                                       temperature=0.0, step=j, **odds)
                seen.append(state.copy())
            return seen

        scales = np.array([0.2, 1.0, 6.0], dtype=np.float32)[:AB]
        each = step(odds_scales=scales)
        for b, k in enumerate(scales):
            alone = step(odds_scale=float(k))
            for j in range(AG):
                self.assertEqual(each[j][b].tobytes(), alone[j][b].tobytes(), (b, k, j))
        self.assertNotEqual(each[-1]["expected"].tobytes(), step()[-1]["expected"].tobytes())

    def test_online_costs_follow_the_measured_steps(self):
        # A plain step first: the assumed prior's draft (1/3 of a target pass) in measured seconds.
        c = speckv.OnlineCost()
        c.observe(0, 0.0, 0, 0.06)
        t = c.step_costs(4)
        self.assertAlmostEqual(t["draft"], 0.02, places=7)
        self.assertEqual(len(t["verify"]), 5)
        self.assertAlmostEqual(float(t["verify"][4]), 0.06 * 1.08, places=7)
        # A speculative step: the draft's pass and γ = 3's verification measured (α = 0.2 after).
        c.observe(3, 0.015, 3, 0.07)
        c.observe(3, 0.030, 3, 0.08)
        t = c.step_costs(4)
        self.assertAlmostEqual(t["draft"], 0.005 + 0.2 * (0.010 - 0.005), places=7)
        self.assertAlmostEqual(float(t["verify"][3]), 0.07 + 0.2 * 0.01, places=6)
        # A batch reads unmeasured γ off the line through the measured ones.
        b = speckv.OnlineCost(seqs=4)
        b.observe(1, 0.01, 1, 0.10)
        b.observe(3, 0.03, 3, 0.14)
        self.assertAlmostEqual(float(b.step_costs(4)["verify"][2]), 0.12, places=6)

    def test_f16_and_strided_rows(self):
        ctx = speckv.Context.cpu()
        # A coarse grid: exact in f16, ties in the argmax (lowest index wins).
        x = (np.arange(3 * 40, dtype=np.float32).reshape(3, 40) % 8) / 2.0
        s32 = ctx.softmax_stats(x)
        s16 = ctx.softmax_stats(x.astype(np.float16))
        np.testing.assert_array_equal(s32["argmax"], s16["argmax"])
        np.testing.assert_allclose(s32["entropy"], s16["entropy"], rtol=1e-5)
        self.assertEqual(list(s32["argmax"]), [7, 7, 7])
        # Rows 32 apart inside a wider buffer (a padded vocabulary) read the same.
        wide = np.zeros((3, 64), dtype=np.float32)
        wide[:, :40] = x
        np.testing.assert_array_equal(ctx.softmax_stats(wide[:, :40])["entropy"], s32["entropy"])


class Misuse(unittest.TestCase):
    def setUp(self):
        self.ctx = speckv.Context.cpu()

    def raises(self, status, f, *a, **k):
        with self.assertRaises(speckv.SpeckvError) as e:
            f(*a, **k)
        self.assertIn(status, str(e.exception))

    def test_bad_dtype_shape_stride(self):
        self.raises("BadDtype", self.ctx.softmax_stats, np.zeros((2, 8), dtype=np.int64))
        self.raises("BadShape", self.ctx.softmax_stats, np.zeros((2, 8), dtype=np.float32)[:, ::2])
        self.raises("BadShape", self.ctx.softmax_stats, np.zeros((2, 8), dtype=np.float32),
                    out=speckv.new_stats(3))
        self.raises("NullPointer", self.ctx.softmax_stats, np.zeros((2, 8), dtype=np.float32),
                    accumulate="add")
        self.raises("InvalidArgument", self.ctx.softmax_stats, np.zeros((2, 8), dtype=np.float32),
                    temperature=float("nan"))
        self.raises("InvalidArgument", self.ctx.softmax_stats, [[0.0, 1.0]])

    def test_described_rows_equal_the_one_options_pass(self):
        x = np.array([[draft_logit(b, 0, k) for k in range(V)] for b in range(3)], dtype=np.float32)
        want_acc = speckv.new_accum(3)
        want = self.ctx.softmax_stats(x, temperature=0.8, sample=True, seed=5, step=2,
                                      accumulate="add", accum=want_acc)
        rows = speckv.new_rows(3)
        order = [2, 0, 1]
        for k, r in enumerate(order):
            rows[k] = (5, 2, r, r, 0.8, speckv.STATS_SAMPLE | speckv.STATS_ACCUMULATE, r, 0)
        acc = speckv.new_accum(3)
        got = self.ctx.softmax_stats_rows(x, rows, accum=acc)
        for k, r in enumerate(order):
            self.assertEqual(got[k].tobytes(), want[r].tobytes(), f"described row {k}")
        self.assertEqual(acc.tobytes(), want_acc.tobytes())
        bad = rows.copy()
        bad[1]["row"] = 3
        self.raises("InvalidArgument", self.ctx.softmax_stats_rows, x, bad, accum=acc)
        self.raises("InvalidArgument", self.ctx.softmax_stats_rows, x, rows)  # accumulating, no accum
        self.raises("BadShape", self.ctx.softmax_stats_rows, x, rows, accum=acc, out=speckv.new_stats(2))

    def test_verify_misuse(self):
        t = np.zeros((1, 3, 4), dtype=np.float32)
        d = np.zeros((1, 2, 4), dtype=np.float32)
        self.raises("InvalidArgument", self.ctx.verify, t, d, np.array([[1, 9]], dtype=np.int32),
                    np.array([2], dtype=np.int32))  # token 9 outside vocab 4
        self.raises("InvalidArgument", self.ctx.verify, t, d, np.array([[1, 2]], dtype=np.int32),
                    np.array([3], dtype=np.int32))  # γ above γmax
        self.raises("BadDtype", self.ctx.verify, t, d, np.array([[1, 2]], dtype=np.int64),
                    np.array([2], dtype=np.int32))
        self.raises("BadShape", self.ctx.verify, t, d, np.array([[1, 2]], dtype=np.int32),
                    np.array([2, 2], dtype=np.int32))
        self.raises("BadDtype", self.ctx.verify, t, d.astype(np.float16), np.array([[1, 2]], dtype=np.int32),
                    np.array([2], dtype=np.int32))
        o = self.ctx.verify(t, d, np.array([[1, 2]], dtype=np.int32), np.array([2], dtype=np.int32))
        self.assertEqual(o["emitted_count"][0], o["accepted"][0] + 1)  # p = q: all accepted
        self.assertEqual(o["accepted"][0], 2)

    def test_controller_stream_and_cuda(self):
        self.raises("NoController", self.ctx.decide_gamma, speckv.new_accum(2), np.zeros(2, dtype=np.int32))
        self.raises("Io", self.ctx.load_controller, "/nonexistent.json", [2, 4])
        self.raises("WrongStream", self.ctx.set_stream, 0x1000)
        self.ctx.set_stream(0)
        self.ctx.load_controller(CONTROLLER, [2, 4])
        g = np.zeros(2, dtype=np.int32)
        f = np.zeros(2, dtype=np.uint32)
        self.ctx.decide_gamma(speckv.new_accum(2), g, fallback_gamma=3, flags=f)
        self.assertEqual(list(g), [3, 3])  # empty features: the fallback, flagged
        self.assertEqual(list(f), [speckv.GAMMA_EMPTY] * 2)
        # Non-finite features fall back too, flagged (never a silent first candidate).
        acc = speckv.new_accum(2)
        acc["count"] = 1
        acc["entropy_sum"] = [np.nan, 0.5]
        acc["entropy_max"] = [np.nan, 0.5]
        acc["confidence_sum"] = 0.5
        acc["confidence_min"] = 0.5
        self.ctx.decide_gamma(acc, g, fallback_gamma=3, flags=f)
        self.assertEqual((g[0], f[0]), (3, speckv.GAMMA_NONFINITE))
        self.assertEqual(f[1], 0)
        self.raises("BadShape", self.ctx.decide_gamma, speckv.new_accum(2), np.zeros(3, dtype=np.int32))
        self.assertIn(".entry verify_f32", speckv.ptx("sm_90"))

    def test_cuda_context_matches_cpu_or_skips_only_without_a_device(self):
        try:
            gpu = speckv.Context.cuda(stream=0)
        except speckv.SpeckvError as e:
            # Only a missing driver or device is a skip; bad PTX or a driver error fails here.
            self.assertTrue(str(e).startswith("NoCuda"), str(e))
            self.skipTest(f"no CUDA device: {e}")
        try:
            import torch
        except ImportError:
            self.fail("a CUDA context opened but torch is not installed to hold device tensors")
        x = torch.tensor((np.arange(4 * 300, dtype=np.float32).reshape(4, 300) % 17) / 4.0)
        want = self.ctx.softmax_stats(x.numpy(), temperature=0.8, sample=True, seed=3, step=1)
        out = speckv.new_stats(4, like=x.cuda())
        gpu.softmax_stats(x.cuda(), temperature=0.8, sample=True, seed=3, step=1, out=out)
        torch.cuda.synchronize()
        got = speckv.stats_view(out)
        np.testing.assert_array_equal(got["argmax"], want["argmax"])
        np.testing.assert_array_equal(got["sampled"], want["sampled"])
        np.testing.assert_allclose(got["entropy"], want["entropy"], rtol=1e-5, atol=1e-6)

    def test_stop_misuse(self):
        x = np.zeros((2, 8), dtype=np.float32)
        costs = speckv.step_costs(None, 4)
        self.assertEqual(len(costs["verify"]), 5)
        kw = dict(state=speckv.new_stop_state(2), gammas=np.zeros(2, dtype=np.int32), costs=costs,
                  accumulate="reset", accum=speckv.new_accum(2))
        self.raises("NoHazardModel", self.ctx.softmax_stats_stop, x, **kw)
        self.raises("Io", self.ctx.load_hazard, "/nonexistent.json")
        self.raises("Io", speckv.step_costs, "/nonexistent.json", 4)
        self.raises("InvalidArgument", speckv.step_costs, None, 16)
        self.ctx.load_hazard()
        self.ctx.softmax_stats_stop(x, **kw)
        self.assertTrue(all(kw["state"]["stopped"] | (kw["state"]["kept"] <= 1)))
        self.raises("InvalidArgument", self.ctx.softmax_stats_stop, x, **{**kw, "accumulate": None})
        self.raises("InvalidArgument", self.ctx.softmax_stats_stop, x, **{**kw, "odds_scale": 0.0})
        self.ctx.softmax_stats_stop(x, **kw, odds_scale=0.0, odds_scales=np.ones(2, dtype=np.float32))
        self.raises("InvalidArgument", self.ctx.softmax_stats_stop, x, **kw,
                    odds_scales=np.array([1.0, -1.0], dtype=np.float32))
        self.raises("BadShape", self.ctx.softmax_stats_stop, x, **kw, odds_scales=np.ones(3, dtype=np.float32))
        self.raises("BadDtype", self.ctx.softmax_stats_stop, x, **kw, odds_scales=np.ones(2))
        h, g = np.full((2, speckv._speckv.STOP_TIMES), 0.5, dtype=np.float32), np.array([1, 1], dtype=np.int32)
        self.raises("BadDtype", speckv.calibrate_each, np.ones(2), h, g, g)
        self.raises("BadShape", speckv.calibrate_each, np.ones(3, dtype=np.float32), h, g, g)
        self.raises("InvalidArgument", speckv.calibrate_each, np.zeros(2, dtype=np.float32), h, g, g)
        # γmax above the costs given: the missing verification costs are refused, not guessed.
        self.raises("InvalidArgument", self.ctx.softmax_stats_stop, x, **{**kw, "gamma_max": 6})
        self.raises("BadShape", self.ctx.softmax_stats_stop, x, **{**kw, "state": speckv.new_stop_state(3)})
        self.raises("BadDtype", self.ctx.softmax_stats_stop, x, **{**kw, "gammas": np.zeros(2, dtype=np.int64)})
        many = speckv._speckv.LOCKSTEP_MAX_ROWS + 1
        big = dict(kw, state=speckv.new_stop_state(many), gammas=np.zeros(many, dtype=np.int32),
                   accum=speckv.new_accum(many))
        self.ctx.softmax_stats_stop(np.zeros((many, 8), dtype=np.float32), **big)  # alone: fine
        self.raises("InvalidArgument", self.ctx.softmax_stats_stop, np.zeros((many, 8), dtype=np.float32),
                    **big, lockstep=True)

    def test_online_cost_misuse(self):
        self.raises("InvalidArgument", speckv.OnlineCost, None, 0)
        self.raises("InvalidArgument", speckv.OnlineCost, None, 17)
        self.raises("Io", speckv.OnlineCost, "/nonexistent.json")
        c = speckv.OnlineCost()
        self.raises("InvalidArgument", c.observe, 1, float("nan"), 1, 0.1)
        self.raises("InvalidArgument", c.observe, 1, 0.01, 16, 0.1)
        self.raises("InvalidArgument", c.step_costs, 0)

    def test_misaligned_buffers_are_refused(self):
        raw = np.zeros(4 * 8 * 4 + 2, dtype=np.uint8)
        x = raw[2:].view(np.float32).reshape(4, 8)  # 2 bytes off a float's alignment
        self.assertNotEqual(x.ctypes.data % 4, 0)
        self.raises("Misaligned", self.ctx.softmax_stats, x)
        raw16 = np.zeros(4 * 8 * 2 + 1, dtype=np.uint8)
        x16 = raw16[1:].view(np.float16).reshape(4, 8)
        self.raises("Misaligned", self.ctx.softmax_stats, x16)
        g = np.zeros(9, dtype=np.uint8)[1:].view(np.int32)
        self.ctx.load_controller(CONTROLLER, [2, 4])
        self.raises("Misaligned", self.ctx.decide_gamma, speckv.new_accum(2), g)


if __name__ == "__main__":
    unittest.main()
