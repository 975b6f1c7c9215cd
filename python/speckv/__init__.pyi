"""Type stubs of the `speckv` package: tensors are torch.Tensor (CPU or CUDA) or numpy.ndarray."""
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._speckv import SpeckvError as SpeckvError

__version__: str
DTYPE_F32: int
DTYPE_F16: int
DTYPE_BF16: int
DRAFT_LOGITS: int
DRAFT_PROBS: int
ACCUMULATE: Dict[Optional[str], int]
STATS_FIELDS: List[Tuple[str, str]]
ACCUM_FIELDS: List[Tuple[str, str]]
ROW_FIELDS: List[Tuple[str, str]]
ROW_NONFINITE: int
ROW_ALL_MASKED: int
ROW_BAD_TEMPERATURE: int
ROW_BAD_INDEX: int
STATS_SAMPLE: int
STATS_ACCUMULATE: int
STATS_ACCUM_RESET: int
VERIFY_NONFINITE: int
VERIFY_ALL_MASKED: int
VERIFY_BAD_GAMMA: int
VERIFY_BAD_TOKEN: int
VERIFY_BAD_TEMPERATURE: int
VERIFY_BAD_DRAFT: int
GAMMA_EMPTY: int
GAMMA_FLAGGED_ROWS: int
GAMMA_NONFINITE: int

Tensor = Any  # torch.Tensor or numpy.ndarray

def ptx(arch: str) -> str: ...
def stats_dtype() -> np.dtype: ...
def accum_dtype() -> np.dtype: ...
def new_stats(rows: int, like: Optional[Tensor] = None) -> Tensor: ...
def new_accum(batch: int, like: Optional[Tensor] = None) -> Tensor: ...
def rows_dtype() -> np.dtype: ...
def new_rows(n: int, like: Optional[Tensor] = None) -> Tensor: ...
def stats_view(stats: Tensor) -> np.ndarray: ...
def stop_dtype() -> np.dtype: ...
def new_stop_state(batch: int, like: Optional[Tensor] = None) -> Tensor: ...
def step_costs(cost_json: Optional[str] = None, gamma_max: int = 8) -> dict: ...
def calibrate(odds_scale: float, hazards: Tensor, gammas: Tensor, accepted: Tensor) -> float: ...
def calibrate_each(odds_scales: Tensor, hazards: Tensor, gammas: Tensor, accepted: Tensor) -> Tensor: ...

class Context:
    @staticmethod
    def cpu() -> "Context": ...
    @staticmethod
    def cuda(stream: Any = None, context: int = 0) -> "Context": ...
    @property
    def device(self) -> str: ...
    def set_stream(self, stream: Any) -> None: ...
    def load_controller(self, path: str, candidates: Sequence[int] = ..., cost_json: Optional[str] = None) -> None: ...
    def softmax_stats(self, logits: Tensor, *, temperature: float = 1.0, sample: bool = False,
                      seed: int = 0, step: int = 0, accumulate: Optional[str] = None,
                      accum: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor: ...
    def softmax_stats_rows(self, logits: Tensor, rows: Tensor, *, accum: Optional[Tensor] = None,
                           out: Optional[Tensor] = None) -> Tensor: ...
    def load_hazard(self, path: Optional[str] = None) -> None: ...
    def softmax_stats_stop(self, logits: Tensor, *, state: Tensor, gammas: Tensor, costs: dict,
                           accumulate: str, accum: Tensor, gamma_max: Optional[int] = None,
                           compression_code: float = 0.0, odds_scale: float = 1.0,
                           lockstep: bool = False, odds_scales: Optional[Tensor] = None,
                           stopped: Optional[Tensor] = None, hazards: Optional[Tensor] = None,
                           temperature: float = 1.0,
                           sample: bool = False, seed: int = 0, step: int = 0,
                           out: Optional[Tensor] = None) -> Tensor: ...
    def decide_gamma(self, accum: Tensor, gammas: Tensor, *, compression_code: float = 0.0,
                     fallback_gamma: int = 4, expected: Optional[Tensor] = None,
                     flags: Optional[Tensor] = None) -> Tensor: ...
    def verify(self, target_logits: Tensor, draft: Tensor, draft_tokens: Tensor, gammas: Tensor, *,
               target_temperature: Optional[Tensor] = None, draft_temperature: Optional[Tensor] = None,
               draft_probs: bool = False, seed: int = 0, step: int = 0,
               out: Optional[Dict[str, Tensor]] = None) -> Dict[str, Tensor]: ...
