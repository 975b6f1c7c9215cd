//! criterion bench of the γ decision: one decision on the CPU (all candidate γ through the 6-16-1
//! MLP), and one `gamma_mlp` launch for 256 sequences on a GPU when present. The paper reports
//! 0.336 ms per decision.

use std::time::Duration;

use criterion::{criterion_group, Criterion};
use speckv::backend::cuda::CudaBackend;
use speckv::controller::records::Compression;
use speckv::controller::{Controller, PAPER_CANDIDATES};
use speckv::measure::overhead::random_mlp;
use speckv::FeatureAccum;

fn bench(c: &mut Criterion) {
    let ctl = Controller::new(random_mlp(1), &PAPER_CANDIDATES, None).expect("valid candidates");
    let feats = [
        [1.2, 0.7, 2.5, 0.4],
        [0.1, 0.98, 0.3, 0.9],
        [3.0, 0.3, 5.0, 0.05],
    ];
    let mut i = 0usize;
    c.bench_function("gamma_decision/cpu", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            ctl.decide(feats[i % 3], Compression::ALL[i % 3])
        })
    });
    match CudaBackend::new(0) {
        Ok(cu) => {
            let dc = cu.upload_controller(&ctl).expect("upload");
            let accum = vec![
                FeatureAccum {
                    count: 4,
                    flags: 0,
                    entropy_sum: 4.0,
                    entropy_max: 2.0,
                    confidence_sum: 2.8,
                    confidence_min: 0.4
                };
                256
            ];
            c.bench_function("gamma_decision/cuda_batch256", |b| {
                b.iter_custom(|iters| {
                    cu.time_gamma_mlp(&dc, &accum, iters as u32)
                        .expect("launch")
                        * iters as u32
                })
            });
        }
        Err(e) => eprintln!("gamma_decision: CUDA skipped ({e})"),
    }
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args()
}

criterion_group! { name = benches; config = config(); targets = bench }

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
