//! The K-quant (Q4_K, Q6_K) row kernels, expanded inside each ISA's module of `simd` (the same
//! body compiled once per instruction set, like the rest of `simd`): a whole 256-element super-block
//! is summed in integers against the per-256 activations, its sub-block scales applied by `madd`.

macro_rules! k_quant_kernels {
    ($feat:literal) => {
        /// Two high bits of each byte's code, moved to bits 4–5.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn high2(t: __m256i, m3: __m256i) -> __m256i {
            _mm256_slli_epi16(_mm256_and_si256(t, m3), 4)
        }

        /// Σ of 16 i16 lanes of (u8 × i8 pair sums) times per-lane i16 scales → i32 lanes.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn scaled_dot(w: __m256i, x: __m256i, scale: __m256i) -> __m256i {
            _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), scale)
        }

        /// Base pointers of each position's per-256 codes, scales and sums of 16; every
        /// slice was checked to cover the whole row (`Acts::row_k` of a k = in row).
        #[inline(always)]
        unsafe fn k_rows<const MB: usize>(
            a: &Acts,
            i0: usize,
            inp: usize,
        ) -> ([*const i8; MB], [*const f32; MB], [*const i16; MB]) {
            let mut q = [std::ptr::null(); MB];
            let mut d = [std::ptr::null(); MB];
            let mut bs = [std::ptr::null(); MB];
            for i in 0..MB {
                let (qk, dk, b) = a.row_k(i0 + i);
                assert!(qk.len() >= inp && dk.len() >= inp / 256 && b.len() >= inp / 16);
                q[i] = qk.as_ptr();
                d[i] = dk.as_ptr();
                bs[i] = b.as_ptr();
            }
            (q, d, bs)
        }

        /// Q4_K rows against 8-bit activations with one scale per 256: each super-block is
        /// summed in integers (sub-block scales applied by `madd`), scaled in f32 once.
        #[target_feature(enable = $feat)]
        unsafe fn row_q4k<const MB: usize>(
            row: &[u8],
            a: &Acts,
            i0: usize,
            acc: &mut [__m256; MB],
            off: &mut [f32; MB],
        ) {
            let m4 = _mm256_set1_epi8(0x0F);
            let (xq, xd, xb) = k_rows::<MB>(a, i0, row.len() / 144 * 256);
            for (sb, blk) in row.chunks_exact(144).enumerate() {
                let (d, dmin) = (half(blk, 0), half(blk, 2));
                // The twelve bytes → eight 6-bit scales then eight 6-bit mins, as u8.
                let u = |k: usize| {
                    u32::from_le_bytes([
                        blk[4 + 4 * k],
                        blk[5 + 4 * k],
                        blk[6 + 4 * k],
                        blk[7 + 4 * k],
                    ])
                };
                let (u0, u1, u2) = (u(0), u(1), u(2));
                let (k1, k2, k3) = (0x3f3f3f3fu32, 0x0f0f0f0fu32, 0x03030303u32);
                let t3 = ((u2 >> 4) & k2) | (((u1 >> 6) & k3) << 4);
                let t1 = (u2 & k2) | (((u0 >> 6) & k3) << 4);
                let (t0, t2) = (u0 & k1, u1 & k1);
                let ms =
                    _mm256_cvtepu8_epi16(_mm_set_epi32(t3 as i32, t2 as i32, t1 as i32, t0 as i32));
                let sc128 = _mm256_castsi256_si128(ms);
                let mins = _mm256_extracti128_si256(ms, 1);
                let scales = _mm256_set_m128i(sc128, sc128);
                let qs = blk[16..144].as_ptr();
                let mut sumi = [_mm256_setzero_si256(); MB];
                for c in 0..4 {
                    let v = _mm256_loadu_si256(qs.add(32 * c) as *const __m256i);
                    let lo = _mm256_and_si256(v, m4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                    // Broadcast i16 lanes 2c and 2c + 1 of the scales.
                    let j0 = (4 * c) as i16;
                    let s0 = _mm256_shuffle_epi8(scales, _mm256_set1_epi16(((j0 + 1) << 8) | j0));
                    let s1 =
                        _mm256_shuffle_epi8(scales, _mm256_set1_epi16(((j0 + 3) << 8) | (j0 + 2)));
                    for i in 0..MB {
                        // In bounds: k_rows checked each position covers the row.
                        let q = xq[i].add(256 * sb + 64 * c);
                        let x0 = _mm256_loadu_si256(q as *const __m256i);
                        let x1 = _mm256_loadu_si256(q.add(32) as *const __m256i);
                        let p = _mm256_add_epi32(scaled_dot(lo, x0, s0), scaled_dot(hi, x1, s1));
                        sumi[i] = _mm256_add_epi32(sumi[i], p);
                    }
                }
                for i in 0..MB {
                    let dk = *xd[i].add(sb);
                    let bs = _mm256_loadu_si256(xb[i].add(16 * sb) as *const __m256i);
                    // Sums of 32 (pairs of sums of 16) times the mins, in four i32 lanes.
                    let b32 =
                        _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
                    let mp = _mm256_zextps128_ps256(_mm_cvtepi32_ps(_mm_madd_epi16(mins, b32)));
                    acc[i] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(sumi[i]),
                        _mm256_set1_ps(d * dk),
                        acc[i],
                    );
                    acc[i] = _mm256_fmadd_ps(mp, _mm256_set1_ps(-dmin * dk), acc[i]);
                }
            }
            let _ = off;
        }

        /// Q6_K rows, as [`row_q4k`]: 6-bit codes 0..63 (their −32 is applied through the
        /// sums of 16), i8 scales per 16 applied by `madd`.
        #[target_feature(enable = $feat)]
        unsafe fn row_q6k<const MB: usize>(
            row: &[u8],
            a: &Acts,
            i0: usize,
            acc: &mut [__m256; MB],
            off: &mut [f32; MB],
        ) {
            let m4 = _mm256_set1_epi8(0x0F);
            let m3 = _mm256_set1_epi8(3);
            let (xq, xd, xb) = k_rows::<MB>(a, i0, row.len() / 210 * 256);
            for (sb, blk) in row.chunks_exact(210).enumerate() {
                let d = half(blk, 208);
                let scales: &[u8; 16] = blk[192..208].try_into().unwrap_or(&[0; 16]);
                let p = blk.as_ptr();
                let mut sumi = [_mm256_setzero_si256(); MB];
                for h in 0..2 {
                    let qla = _mm256_loadu_si256(p.add(64 * h) as *const __m256i);
                    let qlb = _mm256_loadu_si256(p.add(64 * h + 32) as *const __m256i);
                    let qh = _mm256_loadu_si256(p.add(128 + 32 * h) as *const __m256i);
                    let codes = [
                        _mm256_or_si256(_mm256_and_si256(qla, m4), high2(qh, m3)),
                        _mm256_or_si256(
                            _mm256_and_si256(qlb, m4),
                            high2(_mm256_srli_epi16(qh, 2), m3),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(qla, 4), m4),
                            high2(_mm256_srli_epi16(qh, 4), m3),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(qlb, 4), m4),
                            high2(_mm256_srli_epi16(qh, 6), m3),
                        ),
                    ];
                    for (j, wv) in codes.into_iter().enumerate() {
                        let sub = 4 * h + j;
                        let sv = _mm256_set_m128i(
                            _mm_set1_epi16(scales[2 * sub + 1] as i8 as i16),
                            _mm_set1_epi16(scales[2 * sub] as i8 as i16),
                        );
                        for i in 0..MB {
                            let xv = _mm256_loadu_si256(
                                xq[i].add(256 * sb + 32 * sub) as *const __m256i
                            );
                            sumi[i] = _mm256_add_epi32(sumi[i], scaled_dot(wv, xv, sv));
                        }
                    }
                }
                let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(scales.as_ptr() as *const __m128i));
                for i in 0..MB {
                    let dk = *xd[i].add(sb);
                    let bs = _mm256_loadu_si256(xb[i].add(16 * sb) as *const __m256i);
                    let corr = _mm256_cvtepi32_ps(_mm256_madd_epi16(sc16, bs));
                    acc[i] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(sumi[i]),
                        _mm256_set1_ps(d * dk),
                        acc[i],
                    );
                    acc[i] = _mm256_fmadd_ps(corr, _mm256_set1_ps(-32.0 * d * dk), acc[i]);
                }
                let _ = &off;
            }
        }
    };
}
