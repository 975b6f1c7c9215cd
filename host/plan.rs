//! Launch plans: the entry point, grid, block and dynamic shared memory of a kernel launch for a
//! shape, computed in one place. The CUDA backend, the C ABI and the emulator launch exactly what
//! the plan says, and `speckv plan --json` prints it.

use serde::Serialize;
use speckv_kernels::softmax_stats::{self as stats_kernel, PlanV2};

use crate::stats::Dtype;
pub use crate::weights::gemv::XRead;

/// SMs of the GPU speckv designs for (H200); `speckv plan --sms` and the backends pass the real
/// count where they know it.
pub const H200_SMS: u32 = 132;

/// One kernel launch.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LaunchPlan {
    pub entry: String,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: usize,
    /// The SM count the plan was made for.
    pub sm_count: u32,
    /// Blocks per SM if the grid were spread evenly (grid / SMs).
    pub ctas_per_sm: f64,
}

impl LaunchPlan {
    fn new(entry: String, grid: u32, block: u32, shared_bytes: usize, sm_count: u32) -> Self {
        LaunchPlan {
            entry,
            grid: [grid, 1, 1],
            block: [block, 1, 1],
            shared_bytes,
            sm_count,
            ctas_per_sm: grid as f64 / sm_count.max(1) as f64,
        }
    }
}

/// `softmax_stats` v1: one block of 1024 threads per row.
pub const STATS_V1_BLOCK: u32 = 1024;

pub fn softmax_stats_v1(rows: u32, dtype: Dtype, sm_count: u32) -> LaunchPlan {
    LaunchPlan::new(
        format!("softmax_stats_{}", dtype.name()),
        rows,
        STATS_V1_BLOCK,
        stats_kernel::shared_bytes(STATS_V1_BLOCK),
        sm_count,
    )
}

/// `softmax_stats` v2: rows split across blocks (see `speckv_kernels::softmax_stats::plan_v2`).
pub fn softmax_stats_v2(
    rows: u32,
    vocab: u32,
    dtype: Dtype,
    sm_count: u32,
) -> (LaunchPlan, PlanV2) {
    let p = stats_kernel::plan_v2(rows, vocab, dtype.size(), sm_count);
    (
        LaunchPlan::new(
            format!("softmax_stats_v2_{}", dtype.name()),
            p.grid,
            p.block,
            p.shared_bytes,
            sm_count,
        ),
        p,
    )
}

/// `softmax_stats` v3: v2's plan for `rows` described rows (see
/// `speckv_kernels::softmax_stats::plan_v3`).
pub fn softmax_stats_v3(
    rows: u32,
    vocab: u32,
    dtype: Dtype,
    sm_count: u32,
) -> (LaunchPlan, PlanV2) {
    let p = stats_kernel::plan_v3(rows, vocab, dtype.size(), sm_count);
    (
        LaunchPlan::new(
            format!("softmax_stats_v3_{}", dtype.name()),
            p.grid,
            p.block,
            p.shared_bytes,
            sm_count,
        ),
        p,
    )
}

/// Which GEMV kernels a call launches: v1 (one warp per row, the oracle), v2's plan, v3's (v2
/// with the streaming kernel at M = 1 when K is a multiple of 64: what the device forward pass
/// launches for FP16) or v4's (v3 with INT8 and NF4 at M = 1 by integer dot products on 8-bit x:
/// what the device forward pass launches).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemvVersion {
    V1,
    V2,
    V3,
    V4,
}

impl GemvVersion {
    /// The version numbered `n` (1 to 4).
    pub fn from_number(n: u32) -> Option<GemvVersion> {
        match n {
            1 => Some(GemvVersion::V1),
            2 => Some(GemvVersion::V2),
            3 => Some(GemvVersion::V3),
            4 => Some(GemvVersion::V4),
            _ => None,
        }
    }

    /// The entry point, launch and kernel plan of a v2, v3 or v4 GEMV (see
    /// `speckv_kernels::gemv::plan_v2` / `plan_v3` / `plan_v4`; v1 has its own fixed launch,
    /// [`gemv_v1`]: asked here, it gets v2's).
    pub fn plan(
        self,
        format: crate::weights::quant::Format,
        out: u32,
        inp: u32,
        m: u32,
        sm_count: u32,
    ) -> (LaunchPlan, speckv_kernels::gemv::GemvPlanV2) {
        use speckv_kernels::gemv::{self as k, PathV2};
        let code = gemv_format_code(format);
        let p = match self {
            GemvVersion::V4 => k::plan_v4(code, out, inp, m, sm_count),
            GemvVersion::V3 => k::plan_v3(code, out, inp, m, sm_count),
            GemvVersion::V1 | GemvVersion::V2 => k::plan_v2(code, out, inp, m, sm_count),
        };
        let entry = match p.path {
            PathV2::Cores { mt } => format!("gemv_v2_{}_m{mt}", format.name()),
            PathV2::Tensor { nt } => format!("gemv_tc_{}_n{}", format.name(), 8 * nt),
            PathV2::Stream => format!("gemv_v3_{}", format.name()),
            PathV2::Integer => format!("gemv_v4_{}", format.name()),
        };
        (
            LaunchPlan::new(entry, p.grid, p.block, p.shared_bytes, sm_count),
            p,
        )
    }
}

/// The launch of a GEMV of `out × inp` at `m` rows by `version`'s plan, reading x as `read`
/// says (the `_norm` / `_silu` entry points of v3 and v4: M = 1, K a multiple of 64), with `norm` =
/// (the gains' length, eps) checked for a normalised read: an error where the plan's kernel has no
/// such prologue, so a caller launches the norm or the gate on its own, not a silently plain
/// read.
#[allow(clippy::too_many_arguments)]
pub fn plan_fused(
    version: GemvVersion,
    format: crate::weights::quant::Format,
    out: usize,
    inp: usize,
    m: usize,
    sm_count: u32,
    read: XRead,
    norm: Option<(usize, f32)>,
) -> crate::error::Result<(LaunchPlan, speckv_kernels::gemv::GemvPlanV2)> {
    if let Some((gains, eps)) = norm {
        crate::weights::gemv::check_norm(gains, inp, eps)?;
    }
    use speckv_kernels::gemv::PathV2;
    let (mut lp, p) = version.plan(format, out as u32, inp as u32, m as u32, sm_count);
    match (read, p.path) {
        (XRead::Plain, _) => Ok((lp, p)),
        (XRead::Norm | XRead::Silu, PathV2::Stream | PathV2::Integer) => {
            lp.entry.push_str(read.suffix());
            Ok((lp, p))
        }
        (_, PathV2::Cores { .. } | PathV2::Tensor { .. }) => {
            Err(crate::error::Error::Unsupported(format!(
                "gemv {version:?} at M = {m}, K = {inp} reading x as {read:?}: only v3 and v4 at \
                 M = 1 with K a multiple of 64 have the fused reads"
            )))
        }
    }
}

/// The kernels' code of a weight format (0 fp16, 1 int8, 2 nf4).
fn gemv_format_code(format: crate::weights::quant::Format) -> u32 {
    match format {
        crate::weights::quant::Format::Fp16 => 0,
        crate::weights::quant::Format::Int8 => 1,
        crate::weights::quant::Format::Nf4 => 2,
    }
}

/// `gemv` v1: one warp per output row, four rows per block of 128.
pub fn gemv_v1(
    format: crate::weights::quant::Format,
    out: u32,
    m: u32,
    sm_count: u32,
) -> LaunchPlan {
    let tile = speckv_kernels::gemv::tile_for(m.clamp(1, 16)).unwrap_or(16);
    LaunchPlan::new(
        format!("gemv_{}_m{tile}", format.name()),
        out.div_ceil(4),
        128,
        0,
        sm_count,
    )
}

/// Block size of `verify` v1 (its ~80 registers per thread allow at most 768).
pub const VERIFY_V1_BLOCK: u32 = 256;

/// `verify` v1: one block of 256 threads per sequence.
pub fn verify_v1(batch: u32, dtype: Dtype, sm_count: u32) -> LaunchPlan {
    LaunchPlan::new(
        format!("verify_{}", dtype.name()),
        batch,
        VERIFY_V1_BLOCK,
        speckv_kernels::verify::shared_bytes(VERIFY_V1_BLOCK),
        sm_count,
    )
}

/// `verify` v2, stand-alone: the draft rows' statistics (logits mode), `verify_v2_rows`,
/// `verify_v2_sample`.
pub fn verify_v2(
    batch: u32,
    gamma_max: u32,
    vocab: u32,
    dtype: Dtype,
    sm_count: u32,
) -> (Vec<LaunchPlan>, speckv_kernels::verify::FullPlanV2) {
    let f = speckv_kernels::verify::full_plan_v2(batch, gamma_max, vocab, dtype.size(), sm_count);
    let mut v = Vec::new();
    if batch * gamma_max > 0 {
        v.push(LaunchPlan::new(
            format!("softmax_stats_v2_{}", dtype.name()),
            f.stats.grid,
            f.stats.block,
            f.stats.shared_bytes,
            sm_count,
        ));
    }
    v.push(LaunchPlan::new(
        format!("verify_v2_rows_{}", dtype.name()),
        f.verify.row_grid,
        f.verify.row_block,
        f.verify.shared_bytes,
        sm_count,
    ));
    v.push(LaunchPlan::new(
        format!("verify_v2_sample_{}", dtype.name()),
        f.verify.sample_grid,
        f.verify.sample_block,
        f.verify.shared_bytes,
        sm_count,
    ));
    (v, f)
}

/// Block sizes of the forward pass's elementwise and attention kernels.
pub const EMBED_BLOCK: u32 = 128;
pub const RMS_NORM_BLOCK: u32 = 256;
// The `_norm` GEMVs compute the norm's scale with `rms_norm_f32`'s reduction at their own block size;
// the two programs give the same bits only while that is the norm launch's block size too.
const _: () = assert!(speckv_kernels::gemv::V3_WARPS * 32 == RMS_NORM_BLOCK);
pub const QKV_ROPE_BLOCK: u32 = 256;
pub const ATTENTION_BLOCK: u32 = 128;
pub const SILU_MUL_BLOCK: u32 = 256;

/// `embed_f16`: one block per token.
pub fn embed(m: u32, sm_count: u32) -> LaunchPlan {
    LaunchPlan::new("embed_f16".into(), m, EMBED_BLOCK, 0, sm_count)
}

/// `rms_norm_f32` with `block` threads: one block per row.
pub fn rms_norm(rows: u32, block: u32, sm_count: u32) -> LaunchPlan {
    LaunchPlan::new(
        "rms_norm_f32".into(),
        rows,
        block,
        speckv_kernels::rms_norm::shared_bytes(block),
        sm_count,
    )
}

/// `qkv_rope_f32` with `block` threads: one thread per rotated pair and per v element.
pub fn qkv_rope(
    m: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    block: u32,
    sm_count: u32,
) -> LaunchPlan {
    let items = speckv_kernels::qkv_rope::work_items(m, heads, kv_heads, head_dim);
    LaunchPlan::new(
        "qkv_rope_f32".into(),
        items.div_ceil(block.max(1)).max(1),
        block,
        0,
        sm_count,
    )
}

/// `attention_f32_e{1,2,4,8}` with `block` threads: one block per (position, head); None for a
/// head size the kernel does not take.
pub fn attention(
    m: u32,
    heads: u32,
    head_dim: u32,
    block: u32,
    sm_count: u32,
) -> Option<LaunchPlan> {
    let epl = speckv_kernels::attention::per_lane(head_dim)?;
    Some(LaunchPlan::new(
        format!("attention_f32_e{epl}"),
        m * heads,
        block,
        speckv_kernels::attention::shared_bytes(block, head_dim),
        sm_count,
    ))
}

/// `attention_v2_f32_e{1,2,4,8}` with `block` threads: each (position, head) pair's cache positions
/// split across blocks so the grid has at least two blocks per SM; the plan, the splits and the
/// workspace bytes (None for a head size the kernel does not take).
pub fn attention_v2(
    m: u32,
    heads: u32,
    head_dim: u32,
    block: u32,
    sm_count: u32,
) -> Option<(LaunchPlan, u32, usize)> {
    use speckv_kernels::attention as a;
    let epl = a::per_lane(head_dim)?;
    let pairs = m * heads;
    let splits = a::splits_v2(pairs, sm_count);
    Some((
        LaunchPlan::new(
            format!("attention_v2_f32_e{epl}"),
            pairs * splits,
            block,
            a::shared_bytes_v2(block, head_dim),
            sm_count,
        ),
        splits,
        a::workspace_bytes_v2(pairs, splits, head_dim),
    ))
}

/// `silu_mul_f32` with `block` threads: one thread per four outputs.
pub fn silu_mul(m: u32, ffn: u32, block: u32, sm_count: u32) -> LaunchPlan {
    LaunchPlan::new(
        "silu_mul_f32".into(),
        (m * ffn / 4).div_ceil(block.max(1)).max(1),
        block,
        0,
        sm_count,
    )
}
