"""speckv for Python engines: one speculation step's kernels on your tensors' memory.

    ctx = speckv.Context.cpu()                      # or speckv.Context.cuda() on torch's stream
    ctx.load_controller("controller.json", [2, 4, 6, 8])
    stats = ctx.softmax_stats(draft_logits, temperature=1.0, sample=True, seed=s, step=t,
                              accumulate="reset", accum=accum)         # per drafted position
    ctx.decide_gamma(accum, gammas)                 # γ per sequence, in place
    out = ctx.verify(target_logits, draft_logits, draft_tokens, gammas, seed=s, step=t)

or, γ decided per sequence while drafting (the `auto` policy's per-token stopping rule):

    ctx.load_hazard()                               # the shipped hazard model, or a trained file
    costs = speckv.step_costs("steps.cost.json", gamma_max=8)     # or your own measured times
    state, gammas = speckv.new_stop_state(batch), np.zeros(batch, np.int32)
    for j in range(8):                              # one drafted position per call
        ctx.softmax_stats_stop(draft_logits_j, state=state, gammas=gammas, costs=costs,
                               accumulate="reset" if j == 0 else "add", accum=accum)
        if state["stopped"].all(): break            # every sequence has stopped

Tensors are PyTorch tensors (CPU tensors with a CPU context, CUDA tensors with a CUDA context)
or NumPy arrays (CPU). Nothing is copied: the kernels read and write the tensors' memory through
their data pointers, with their strides; outputs you pass (`out=`, `gammas`, `accum`) are written
in place, so a decode loop can preallocate everything once. On CUDA every call is asynchronous on
the context's stream (by default torch's current stream when the context was made).

Record layouts: `STATS_FIELDS` (8 × 4 bytes per row) and `ACCUM_FIELDS` (6 × 4 bytes per
sequence); `stats_dtype()` / `accum_dtype()` give the NumPy structured dtypes, and
`new_stats(rows)` / `new_accum(batch)` allocate them (as int32 tensors of shape [n, 8] / [n, 6]
when `like` is a torch tensor).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from . import _speckv
from ._speckv import SpeckvError, ptx  # noqa: F401
from ._speckv import (  # noqa: F401  flag bits of RowStats.flags, verify's flags, decide_gamma's flags
    ROW_NONFINITE, ROW_ALL_MASKED, ROW_BAD_TEMPERATURE, ROW_BAD_INDEX, VERIFY_NONFINITE,
    VERIFY_ALL_MASKED, VERIFY_BAD_GAMMA, VERIFY_BAD_TOKEN, VERIFY_BAD_TEMPERATURE, VERIFY_BAD_DRAFT,
    GAMMA_EMPTY, GAMMA_FLAGGED_ROWS, GAMMA_NONFINITE, STATS_SAMPLE, STATS_ACCUMULATE,
    STATS_ACCUM_RESET,
)

__version__ = _speckv.__version__

DTYPE_F32, DTYPE_F16, DTYPE_BF16 = 0, 1, 2
ACCUMULATE = {None: 0, "no": 0, "add": 1, "reset": 2}
DRAFT_LOGITS, DRAFT_PROBS = 0, 1

STATS_FIELDS = [
    ("max_logit", "<f4"), ("lse", "<f4"), ("entropy", "<f4"), ("confidence", "<f4"),
    ("argmax", "<i4"), ("sampled", "<i4"), ("sampled_prob", "<f4"), ("flags", "<u4"),
]
ACCUM_FIELDS = [
    ("count", "<u4"), ("flags", "<u4"), ("entropy_sum", "<f4"), ("entropy_max", "<f4"),
    ("confidence_sum", "<f4"), ("confidence_min", "<f4"),
]
# One described row of `softmax_stats_rows` (40 bytes): its logits row, Philox seed, step and
# stream, temperature, STATS_* flags and accumulator slot.
ROW_FIELDS = [
    ("seed", "<u8"), ("step", "<u8"), ("row", "<u4"), ("stream", "<u4"), ("temperature", "<f4"),
    ("flags", "<u4"), ("accum_slot", "<u4"), ("_pad", "<u4"),
]
# One sequence's place in its speculation step for `softmax_stats_stop` (16 bytes).
STOP_FIELDS = [("survive", "<f4"), ("expected", "<f4"), ("kept", "<u4"), ("stopped", "<u4")]
assert len(STOP_FIELDS) * 4 == _speckv.STOP_STATE_BYTES
assert len(STATS_FIELDS) * 4 == _speckv.ROW_STATS_BYTES
assert np.dtype(ROW_FIELDS).itemsize == _speckv.STATS_ROW_BYTES
assert len(ACCUM_FIELDS) * 4 == _speckv.FEATURE_ACCUM_BYTES


def stats_dtype() -> np.dtype:
    return np.dtype(STATS_FIELDS)


def accum_dtype() -> np.dtype:
    return np.dtype(ACCUM_FIELDS)


def rows_dtype() -> np.dtype:
    return np.dtype(ROW_FIELDS)


def stop_dtype() -> np.dtype:
    return np.dtype(STOP_FIELDS)


def new_stop_state(batch: int, like: Any = None):
    """Stop states for `softmax_stats_stop` (numpy structured array, or int32 [batch, 4] tensor on
    `like`'s device). No initial value is needed: a step's first draft ("reset") starts afresh."""
    if like is not None and _is_torch(like):
        import torch

        return torch.zeros((batch, 4), dtype=torch.int32, device=like.device)
    return np.zeros(batch, dtype=stop_dtype())


def calibrate(odds_scale: float, hazards: Any, gammas: Any, accepted: Any) -> float:
    """The hazard model's odds scale after a verified step (host arrays): `hazards` float32
    [batch, STOP_TIMES] from `softmax_stats_stop`, `gammas` and `accepted` int32 [batch]; the rule
    `speckv generate --policy auto` calibrates with. Pass the result as the next step's
    `odds_scale`."""
    b = (gammas.numel() if _is_torch(gammas) else np.asarray(gammas).size)
    _check_int(hazards, "hazards", "float32", b * _speckv.STOP_TIMES)
    _check_int(gammas, "gammas", "int32", b)
    _check_int(accepted, "accepted", "int32", b)
    for x, what in ((hazards, "hazards"), (gammas, "gammas"), (accepted, "accepted")):
        if _info(x, what)[3] != "cpu":
            raise SpeckvError(f"InvalidArgument: calibrate reads host memory: {what} is on the device")
    a = lambda x: _info(x, "buffer")[0]  # noqa: E731
    return _speckv.calibrate(float(odds_scale), a(hazards), a(gammas), a(accepted), b)


def calibrate_each(odds_scales: Any, hazards: Any, gammas: Any, accepted: Any):
    """`calibrate` for every sequence on its own (host arrays): the float32 `odds_scales` [batch]
    (ones to start) move in place, each by its own sequence's verified drafts only. Pass them as
    the next step's `softmax_stats_stop(..., odds_scales=...)` (copied to the device on CUDA).
    Returns `odds_scales`."""
    b = (gammas.numel() if _is_torch(gammas) else np.asarray(gammas).size)
    _check_int(odds_scales, "odds_scales", "float32", b)
    _check_int(hazards, "hazards", "float32", b * _speckv.STOP_TIMES)
    _check_int(gammas, "gammas", "int32", b)
    _check_int(accepted, "accepted", "int32", b)
    for x, what in ((odds_scales, "odds_scales"), (hazards, "hazards"), (gammas, "gammas"),
                    (accepted, "accepted")):
        if _info(x, what)[3] != "cpu":
            raise SpeckvError(f"InvalidArgument: calibrate_each reads host memory: {what} is on the device")
    a = lambda x: _info(x, "buffer")[0]  # noqa: E731
    _speckv.calibrate_each(a(odds_scales), a(hazards), a(gammas), a(accepted), b)
    return odds_scales


def step_costs(cost_json: Optional[str] = None, gamma_max: int = 8) -> dict:
    """The step costs of a cost model (`speckv profile`'s JSON; None: the assumed one) for
    `softmax_stats_stop`: {"draft": one draft pass, "verify": float32 [gamma_max + 1], the
    verification of γ drafts}. Any time unit; only ratios enter the decision."""
    draft, verify = _speckv.step_costs(None if cost_json is None else str(cost_json), int(gamma_max))
    return {"draft": draft, "verify": np.asarray(verify, dtype=np.float32)}


class OnlineCost:
    """Step costs measured while decoding (`speckv_online_cost_*`): moving averages of the draft's
    time per pass and of the verification time at each γ, on a prior (`cost_json`, one sequence's
    `speckv profile` costs; None: the assumed one) that fills in the γ not measured yet; for
    `seqs` > 1 sequences drafting and verifying in lockstep, the prior scaled to the batch's rows
    and the verification read off the line through the measured γ (as `generate`'s batched `auto`)."""

    def __init__(self, cost_json: Optional[str] = None, seqs: int = 1):
        self._raw = _speckv.OnlineCost(None if cost_json is None else str(cost_json), int(seqs))

    def observe(self, draft_passes: int, draft_seconds: float, gamma: int, verify_seconds: float) -> None:
        """One step, after its verification: `draft_passes` passes (0: a plain step) took
        `draft_seconds` together; the verification of `gamma` drafts per sequence took
        `verify_seconds`."""
        self._raw.observe(int(draft_passes), float(draft_seconds), int(gamma), float(verify_seconds))

    def step_costs(self, gamma_max: int = 8) -> dict:
        """The next step's costs for `softmax_stats_stop`, as `step_costs` gives them."""
        draft, verify = self._raw.step_costs(int(gamma_max))
        return {"draft": draft, "verify": np.asarray(verify, dtype=np.float32)}


def new_rows(n: int, like: Any = None):
    """Row descriptions for `softmax_stats_rows` (numpy structured array, or int32 [n, 10] tensor
    on `like`'s device, to be filled through a host copy)."""
    if like is not None and _is_torch(like):
        import torch

        return torch.zeros((n, 10), dtype=torch.int32, device=like.device)
    return np.zeros(n, dtype=rows_dtype())


def _is_torch(x: Any) -> bool:
    return hasattr(x, "data_ptr") and hasattr(x, "stride")


def _dtype_code(x: Any) -> int:
    name = str(x.dtype).replace("torch.", "")
    codes = {"float32": DTYPE_F32, "float16": DTYPE_F16, "bfloat16": DTYPE_BF16}
    if name not in codes:
        raise SpeckvError(f"BadDtype: logits must be float32, float16 or bfloat16, got {name}")
    return codes[name]


def _info(x: Any, what: str):
    """(address, shape, element strides, device) of a tensor or array, its address checked to be
    aligned for its element type."""
    if _is_torch(x):
        addr, size = x.data_ptr(), x.element_size()
        info = addr, tuple(x.shape), tuple(x.stride()), ("cuda" if x.is_cuda else "cpu")
    elif isinstance(x, np.ndarray):
        if any(s % x.itemsize for s in x.strides):
            raise SpeckvError(f"BadShape: {what} has strides that are not whole elements")
        addr = x.ctypes.data
        # A record (stats, accumulators) needs its fields' alignment (4), not its size.
        fields = x.dtype.fields
        size = max(f[0].alignment for f in fields.values()) if fields else x.dtype.alignment
        info = addr, x.shape, tuple(s // x.itemsize for s in x.strides), "cpu"
    else:
        info = None
    if info is None:
        raise SpeckvError(f"InvalidArgument: {what} must be a torch tensor or a numpy array, got {type(x)!r}")
    if addr % size:
        raise SpeckvError(f"Misaligned: {what} at {addr:#x} is not {size}-byte aligned for its dtype")
    return info


def _check_int(x: Any, what: str, code: str, n: int) -> None:
    name = str(x.dtype).replace("torch.", "")
    if name != code:
        raise SpeckvError(f"BadDtype: {what} must be {code}, got {name}")
    addr, shape, strides, _ = _info(x, what)
    size = int(np.prod(shape)) if shape else 1
    if size != n:
        raise SpeckvError(f"BadShape: {what} must hold {n} elements, got shape {shape}")
    if n > 1 and not _contiguous(shape, strides):
        raise SpeckvError(f"BadShape: {what} must be contiguous")


def _contiguous(shape, strides) -> bool:
    expect = 1
    for dim, st in zip(reversed(shape), reversed(strides)):
        if dim != 1 and st != expect:
            return False
        expect *= dim
    return True


def _rows(x: Any, what: str, rows: int):
    """Address, vocab and row stride of `x` viewed as `rows` rows over its last dimension."""
    addr, shape, strides, dev = _info(x, what)
    if len(shape) < 1 or shape[-1] == 0:
        raise SpeckvError(f"BadShape: {what} needs a non-empty last (vocabulary) dimension")
    if strides[-1] != 1:
        raise SpeckvError(f"BadShape: {what} must have unit stride over the vocabulary")
    lead = shape[:-1]
    n = int(np.prod(lead)) if lead else 1
    if n != rows:
        raise SpeckvError(f"BadShape: {what} has {n} rows, expected {rows}")
    # Leading dimensions must collapse to one row stride.
    row_stride = strides[-2] if len(shape) >= 2 else shape[-1]
    expect = row_stride
    for dim, st in zip(reversed(lead), reversed(strides[:-1])):
        if dim != 1 and st != expect:
            raise SpeckvError(f"BadShape: {what}'s leading dimensions are not evenly strided")
        expect *= dim
    return addr, shape[-1], row_stride, dev


def new_stats(rows: int, like: Any = None):
    """Output buffer for `softmax_stats` (numpy structured array, or int32 [rows, 8] tensor)."""
    if like is not None and _is_torch(like):
        import torch

        return torch.empty((rows, 8), dtype=torch.int32, device=like.device)
    return np.zeros(rows, dtype=stats_dtype())


def new_accum(batch: int, like: Any = None):
    """Feature accumulators (numpy structured array, or int32 [batch, 6] tensor)."""
    if like is not None and _is_torch(like):
        import torch

        return torch.zeros((batch, 6), dtype=torch.int32, device=like.device)
    return np.zeros(batch, dtype=accum_dtype())


def stats_view(stats: Any) -> np.ndarray:
    """A NumPy structured view of statistics (a host copy for torch tensors)."""
    if _is_torch(stats):
        stats = stats.detach().cpu().numpy()
    return np.ascontiguousarray(stats).view(stats_dtype()).reshape(-1)


def _record(x: Any, what: str, n: int, fields: int, dev: str) -> int:
    addr, shape, strides, xdev = _info(x, what)
    nbytes = (x.element_size() * x.numel()) if _is_torch(x) else x.nbytes
    if nbytes != n * fields * 4:
        raise SpeckvError(f"BadShape: {what} must hold {n} records of {fields * 4} bytes, got {nbytes} bytes")
    if not _contiguous(shape, strides):
        raise SpeckvError(f"BadShape: {what} must be contiguous")
    if xdev != dev:
        raise SpeckvError(f"InvalidArgument: {what} is on {xdev} but the context is on {dev}")
    return addr


class Context:
    """A speckv context: `Context.cpu()` or `Context.cuda()`."""

    def __init__(self, raw: "_speckv.Context"):
        self._raw = raw

    @staticmethod
    def cpu() -> "Context":
        return Context(_speckv.Context.cpu())

    @staticmethod
    def cuda(stream: Any = None, context: int = 0) -> "Context":
        """On CUDA context `context` (0: the current one — PyTorch's) and `stream` (a
        torch.cuda.Stream, a raw handle, or None: torch's current stream if torch is loaded)."""
        if stream is None:
            try:
                import torch

                stream = torch.cuda.current_stream().cuda_stream
            except Exception:  # torch absent or without CUDA: the legacy default stream
                stream = 0
        elif hasattr(stream, "cuda_stream"):
            stream = stream.cuda_stream
        return Context(_speckv.Context.cuda(int(context), int(stream)))

    @property
    def device(self) -> str:
        return self._raw.device

    def set_stream(self, stream: Any) -> None:
        self._raw.set_stream(int(getattr(stream, "cuda_stream", stream) or 0))

    def load_controller(self, path: str, candidates: Sequence[int] = (2, 4, 6, 8),
                        cost_json: Optional[str] = None) -> None:
        self._raw.load_controller(str(path), [int(c) for c in candidates],
                                  None if cost_json is None else str(cost_json))

    def _logits(self, logits: Any):
        """(address, rows, vocab, row stride, device) of `logits` ([..., vocab]), on this context's
        device."""
        shape = tuple(_info(logits, "logits")[1])
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        addr, vocab, stride, dev = _rows(logits, "logits", rows)
        self._dev(dev, "logits")
        return addr, rows, vocab, stride, dev

    def _dev(self, dev: str, what: str) -> None:
        if dev != self.device:
            raise SpeckvError(f"InvalidArgument: {what} is on {dev} but the context is on {self.device}")

    def softmax_stats(self, logits: Any, *, temperature: float = 1.0, sample: bool = False,
                      seed: int = 0, step: int = 0, accumulate: Optional[str] = None,
                      accum: Any = None, out: Any = None):
        """Statistics of every row of `logits` ([..., vocab]); returns `out` (allocated when
        None). With `accumulate` "reset" or "add", row r's features go into `accum[r]`."""
        addr, rows, vocab, stride, dev = self._logits(logits)
        if accumulate not in ACCUMULATE:
            raise SpeckvError(f"InvalidArgument: accumulate must be None, 'add' or 'reset', got {accumulate!r}")
        mode = ACCUMULATE[accumulate]
        if out is None:
            out = new_stats(rows, logits if _is_torch(logits) else None)
        out_addr = _record(out, "out", rows, 8, dev)
        acc_addr = 0
        if mode:
            if accum is None:
                raise SpeckvError("NullPointer: accumulate needs accum (see new_accum)")
            acc_addr = _record(accum, "accum", rows, 6, dev)
        self._raw.softmax_stats(addr, _dtype_code(logits), rows, vocab, stride, out_addr,
                                float(temperature), bool(sample), int(seed), int(step), mode, acc_addr)
        return out

    def softmax_stats_rows(self, logits: Any, rows: Any, *, accum: Any = None, out: Any = None):
        """Statistics of described rows of `logits` ([..., vocab]) in one pass: `rows` (see
        `new_rows`) says, per row, which logits row it reads, its seed, step, stream, temperature,
        STATS_* flags and accumulator slot in `accum`; returns `out` (row k at out[k])."""
        addr, logit_rows, vocab, stride, dev = self._logits(logits)
        nbytes = (rows.element_size() * rows.numel()) if _is_torch(rows) else rows.nbytes
        n = nbytes // _speckv.STATS_ROW_BYTES
        rows_addr = _record(rows, "rows", n, _speckv.STATS_ROW_BYTES // 4, dev)
        if out is None:
            out = new_stats(n, logits if _is_torch(logits) else None)
        out_addr = _record(out, "out", n, 8, dev)
        slots, acc_addr = 0, 0
        if accum is not None:
            slots = ((accum.element_size() * accum.numel()) if _is_torch(accum) else accum.nbytes) // 24
            acc_addr = _record(accum, "accum", slots, 6, dev)
        self._raw.softmax_stats_rows(addr, _dtype_code(logits), logit_rows, vocab, stride, rows_addr,
                                     n, slots, acc_addr, out_addr)
        return out

    def load_hazard(self, path: Optional[str] = None) -> None:
        """The hazard model of `softmax_stats_stop` (a `speckv train --hazard` JSON; None: the
        shipped one)."""
        self._raw.load_hazard(None if path is None else str(path))

    def softmax_stats_stop(self, logits: Any, *, state: Any, gammas: Any, costs: dict,
                           accumulate: str, accum: Any, gamma_max: Optional[int] = None,
                           compression_code: float = 0.0, odds_scale: float = 1.0,
                           lockstep: bool = False, odds_scales: Any = None,
                           stopped: Any = None, hazards: Any = None, temperature: float = 1.0,
                           sample: bool = False, seed: int = 0, step: int = 0, out: Any = None):
        """`softmax_stats` of one drafted position ([batch, vocab], one row per sequence) with the
        per-token stopping rule after each row: every sequence still drafting keeps or discards
        its draft and drafts on or stops; `state` (see `new_stop_state`) and the int32 `gammas`
        (γ_b, what `verify` reads) are updated in place, a stopped sequence's left alone.
        `accumulate` is "reset" for a step's first draft, "add" after; `costs` is `step_costs`'s
        dict (γmax: its length − 1 unless given); `stopped` (uint32 [1], optional) counts the
        sequences that stop; `hazards` (float32 [batch, STOP_TIMES], optional) receives the hazard
        of every kept draft, for `calibrate`. With `lockstep` the batch drafts in lockstep (one
        draft pass for all, one verification of the longest γ) and decides together: every
        sequence keeps the draft or none does, and all draft on or all stop (at most
        `_speckv.LOCKSTEP_MAX_ROWS`, 16, sequences). `odds_scales` (float32 [batch], on the
        context's device, optional) gives each sequence its own calibration (see
        `calibrate_each`) in place of `odds_scale`. Returns `out`."""
        addr, rows, vocab, stride, dev = self._logits(logits)
        if accumulate not in ("add", "reset"):
            raise SpeckvError(f"InvalidArgument: per-token stopping accumulates: accumulate must be 'reset' or 'add', got {accumulate!r}")
        if accum is None:
            raise SpeckvError("NullPointer: per-token stopping needs accum (see new_accum)")
        verify = [float(v) for v in costs["verify"]]
        gm = len(verify) - 1 if gamma_max is None else int(gamma_max)
        if out is None:
            out = new_stats(rows, logits if _is_torch(logits) else None)
        out_addr = _record(out, "out", rows, 8, dev)
        acc_addr = _record(accum, "accum", rows, 6, dev)
        st_addr = _record(state, "state", rows, 4, dev)
        _check_int(gammas, "gammas", "int32", rows)
        g_addr, _, _, gdev = _info(gammas, "gammas")
        self._dev(gdev, "gammas")
        c_addr = 0
        if stopped is not None:
            _check_int(stopped, "stopped", "uint32", 1)
            c_addr, _, _, cdev = _info(stopped, "stopped")
            self._dev(cdev, "stopped")
        h_addr = 0
        if hazards is not None:
            _check_int(hazards, "hazards", "float32", rows * _speckv.STOP_TIMES)
            h_addr, _, _, hdev = _info(hazards, "hazards")
            self._dev(hdev, "hazards")
        k_addr = 0
        if odds_scales is not None:
            _check_int(odds_scales, "odds_scales", "float32", rows)
            k_addr, _, _, kdev = _info(odds_scales, "odds_scales")
            self._dev(kdev, "odds_scales")
        self._raw.softmax_stats_stop(addr, _dtype_code(logits), rows, vocab, stride, out_addr,
                                     float(temperature), bool(sample), int(seed), int(step),
                                     ACCUMULATE[accumulate], acc_addr, st_addr, g_addr, c_addr, h_addr,
                                     float(costs["draft"]), verify, gm, float(compression_code),
                                     float(odds_scale), bool(lockstep), k_addr)
        return out

    def decide_gamma(self, accum: Any, gammas: Any, *, compression_code: float = 0.0,
                     fallback_gamma: int = 4, expected: Any = None, flags: Any = None):
        """γ per sequence from `accum` into the int32 `gammas` (and â·γ + 1 into `expected`).

        Fail-closed: a sequence with no or flagged features, or non-finite features or
        predictions, gets `fallback_gamma`; the uint32 `flags` (optional) says why
        (GAMMA_EMPTY, GAMMA_FLAGGED_ROWS, GAMMA_NONFINITE; 0 for a decision)."""
        n = (accum.numel() * accum.element_size() if _is_torch(accum) else accum.nbytes) // 24
        acc = _record(accum, "accum", n, 6, self.device)
        _check_int(gammas, "gammas", "int32", n)
        g_addr, _, _, gdev = _info(gammas, "gammas")
        self._dev(gdev, "gammas")
        e_addr = 0
        if expected is not None:
            _check_int(expected, "expected", "float32", n)
            e_addr, _, _, edev = _info(expected, "expected")
            self._dev(edev, "expected")
        f_addr = 0
        if flags is not None:
            _check_int(flags, "flags", "uint32", n)
            f_addr, _, _, fdev = _info(flags, "flags")
            self._dev(fdev, "flags")
        self._raw.decide_gamma(acc, n, float(compression_code), int(fallback_gamma), g_addr, e_addr,
                               f_addr)
        return gammas

    def verify(self, target_logits: Any, draft: Any, draft_tokens: Any, gammas: Any, *,
               target_temperature: Any = None, draft_temperature: Any = None,
               draft_probs: bool = False, seed: int = 0, step: int = 0, out: Optional[dict] = None):
        """Verify `batch` sequences: `target_logits` [batch, γmax+1, vocab], `draft`
        [batch, γmax, vocab] (logits in the target's dtype, or float32 probabilities with
        draft_probs=True), `draft_tokens` int32 [batch, γmax], `gammas` int32 [batch];
        temperatures float32 [batch] (default all 1). Returns dict of int32/uint32 outputs
        accepted, emitted, emitted_count, counterfactual, ratios, flags (`out` reused)."""
        tshape = tuple(_info(target_logits, "target_logits")[1])
        if len(tshape) != 3:
            raise SpeckvError(f"BadShape: target_logits must be [batch, γmax+1, vocab], got {tshape}")
        b, w, v = tshape
        gm = w - 1
        t_addr, tv, t_stride, dev = _rows(target_logits, "target_logits", b * w)
        self._dev(dev, "target_logits")
        if gm > 0:
            d_addr, dv, d_stride, ddev = _rows(draft, "draft", b * gm)
            self._dev(ddev, "draft")
            if dv != v:
                raise SpeckvError(f"BadShape: draft vocabulary {dv} differs from the target's {v}")
        else:
            d_addr, d_stride = 0, v
        if draft_probs:
            name = str(draft.dtype).replace("torch.", "")
            if name != "float32":
                raise SpeckvError(f"BadDtype: draft probabilities must be float32, got {name}")
        elif gm > 0 and _dtype_code(draft) != _dtype_code(target_logits):
            raise SpeckvError("BadDtype: draft logits must have the target's dtype")
        _check_int(draft_tokens, "draft_tokens", "int32", b * gm)
        _check_int(gammas, "gammas", "int32", b)
        mk = (lambda shape, dt: _alloc_like(target_logits, shape, dt))
        if target_temperature is None:
            target_temperature = _full_like(target_logits, b, 1.0)
        if draft_temperature is None and not draft_probs:
            draft_temperature = _full_like(target_logits, b, 1.0)
        _check_int(target_temperature, "target_temperature", "float32", b)
        if not draft_probs:
            _check_int(draft_temperature, "draft_temperature", "float32", b)
        if out is None:
            out = {
                "accepted": mk((b,), "int32"), "emitted": mk((b, w), "int32"),
                "emitted_count": mk((b,), "int32"), "counterfactual": mk((b, w), "int32"),
                "ratios": mk((b, max(gm, 1)), "float32"), "flags": mk((b,), "int32"),
            }
        sizes = {"accepted": b, "emitted": b * w, "emitted_count": b, "counterfactual": b * w,
                 "ratios": b * max(gm, 1), "flags": b}
        addrs = {}
        for k, n in sizes.items():
            dt = "float32" if k == "ratios" else "int32"
            _check_int(out[k], k, dt, n)
            addrs[k], _, _, odev = _info(out[k], k)
            self._dev(odev, k)
        a = lambda x: _info(x, "buffer")[0]  # noqa: E731
        self._raw.verify(t_addr, _dtype_code(target_logits), t_stride, d_addr,
                         DRAFT_PROBS if draft_probs else DRAFT_LOGITS, d_stride,
                         0 if draft_probs else a(draft_temperature), a(draft_tokens),
                         a(gammas), a(target_temperature), b, gm, v, int(seed), int(step),
                         addrs["accepted"], addrs["emitted"], addrs["emitted_count"],
                         addrs["ratios"], addrs["counterfactual"], addrs["flags"])
        return out


def _alloc_like(x: Any, shape, dt: str):
    if _is_torch(x):
        import torch

        return torch.empty(shape, dtype=getattr(torch, dt), device=x.device)
    return np.empty(shape, dtype=dt)


def _full_like(x: Any, n: int, v: float):
    if _is_torch(x):
        import torch

        return torch.full((n,), v, dtype=torch.float32, device=x.device)
    return np.full(n, v, dtype=np.float32)
