// Every entry point the PTX module defines, by name. One list, read by `build.rs` (which fails
// the PTX build when the module lacks one of these or defines one that is not listed), by the
// host backends (which resolve each at load time, so a missing one is a load error rather than a
// skipped test) and by `scripts/ptx-check`'s table. `docs/kernels.md` documents each.

/// The kernels' entry points, in the order `docs/kernels.md` documents them.
pub const ENTRY_POINTS: &[&str] = &[
    "softmax_stats_f32",
    "softmax_stats_f16",
    "softmax_stats_bf16",
    "softmax_stats_v2_f32",
    "softmax_stats_v2_f16",
    "softmax_stats_v2_bf16",
    "gamma_mlp_f32",
    "verify_f32",
    "verify_f16",
    "verify_bf16",
    "verify_v2_rows_f32",
    "verify_v2_sample_f32",
    "verify_v2_rows_f16",
    "verify_v2_sample_f16",
    "verify_v2_rows_bf16",
    "verify_v2_sample_bf16",
    "gemv_fp16_m1",
    "gemv_fp16_m2",
    "gemv_fp16_m4",
    "gemv_fp16_m8",
    "gemv_fp16_m16",
    "gemv_int8_m1",
    "gemv_int8_m2",
    "gemv_int8_m4",
    "gemv_int8_m8",
    "gemv_int8_m16",
    "gemv_nf4_m1",
    "gemv_nf4_m2",
    "gemv_nf4_m4",
    "gemv_nf4_m8",
    "gemv_nf4_m16",
];
