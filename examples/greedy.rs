//! Plain greedy decoding of a GGUF model on the CPU backend: a smoke check of the model path.
//! `cargo run --release --example greedy -- models/SmolLM2-135M-Instruct.Q4_1.gguf "What is the capital of France?"`

use std::time::Instant;

use speckv::model::tokenizer::Tokenizer;
use speckv::model::{KvCache, Model};
use speckv::weights::quant::Format;

fn main() -> speckv::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::PathBuf::from(
        args.get(1)
            .cloned()
            .unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into()),
    );
    let prompt = args
        .get(2)
        .cloned()
        .unwrap_or_else(|| "What is the capital of France?".into());
    let t0 = Instant::now();
    let (c, _) = speckv::model::read_gguf(&path)?;
    let tok = Tokenizer::from_gguf(&c)?;
    let model = Model::load(&path, Format::Fp16)?;
    eprintln!(
        "loaded {:?} in {:.1} s",
        model.cfg,
        t0.elapsed().as_secs_f64()
    );
    let ids = tok.encode(&Tokenizer::chat_prompt(&prompt))?;
    eprintln!("prompt tokens: {ids:?}");
    let mut cache = KvCache::new(&model.cfg);
    let mut logits = model.forward(&ids, &mut cache, 1)?;
    let mut out = Vec::new();
    let t1 = Instant::now();
    for step in 0..40 {
        let next = speckv::decode::argmax(&logits, step)?;
        if tok.stop.contains(&next) {
            break;
        }
        out.push(next);
        logits = model.forward(&[next], &mut cache, 1)?;
    }
    println!("{}", tok.decode(&out)?);
    eprintln!(
        "{} tokens in {:.2} s",
        out.len(),
        t1.elapsed().as_secs_f64()
    );
    Ok(())
}
