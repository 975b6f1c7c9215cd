//! The attention's vector pieces over an f16 KV cache: q · k and o += w · v with k, v in f16
//! (F16C + FMA when the CPU has them, plain Rust otherwise).

use half::f16;

fn has_f16c() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Σ a_j · b_j (a f32, b f16; equal lengths).
pub fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
    let n = a.len().min(b.len());
    #[cfg(target_arch = "x86_64")]
    if has_f16c() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above); loads stay within `n`.
        return unsafe { x86::dot_f16(&a[..n], &b[..n]) };
    }
    a[..n]
        .iter()
        .zip(&b[..n])
        .map(|(x, y)| x * y.to_f32())
        .sum()
}

/// y_j += w · x_j (x f16; equal lengths).
pub fn axpy_f16(y: &mut [f32], w: f32, x: &[f16]) {
    let n = y.len().min(x.len());
    #[cfg(target_arch = "x86_64")]
    if has_f16c() {
        // SAFETY: as in `dot_f16`.
        return unsafe { x86::axpy_f16(&mut y[..n], w, &x[..n]) };
    }
    for (a, b) in y[..n].iter_mut().zip(&x[..n]) {
        *a += w * b.to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
        let n = a.len();
        let mut acc = _mm256_setzero_ps();
        let mut k = 0;
        while k + 8 <= n {
            let bv = _mm256_cvtph_ps(_mm_loadu_si128(b[k..k + 8].as_ptr() as *const __m128i));
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(a[k..k + 8].as_ptr()), bv, acc);
            k += 8;
        }
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        let mut r = _mm_cvtss_f32(s);
        for j in k..n {
            r += a[j] * b[j].to_f32();
        }
        r
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn axpy_f16(y: &mut [f32], w: f32, x: &[f16]) {
        let n = y.len();
        let wv = _mm256_set1_ps(w);
        let mut k = 0;
        while k + 8 <= n {
            let xv = _mm256_cvtph_ps(_mm_loadu_si128(x[k..k + 8].as_ptr() as *const __m128i));
            let p = y[k..k + 8].as_mut_ptr();
            _mm256_storeu_ps(p, _mm256_fmadd_ps(wv, xv, _mm256_loadu_ps(p)));
            k += 8;
        }
        for j in k..n {
            y[j] += w * x[j].to_f32();
        }
    }
}
