//! Runs decode steps in a loop, for profiling: `decode_profile MODEL STEPS`
//! (env: `TOKENS` new tokens a pass, default 1; `CONTEXT` cached positions
//! before each pass, default 64).
use tandem_model::*;
fn main() {
    let mut args = std::env::args().skip(1);
    let path = std::path::PathBuf::from(args.next().expect("MODEL"));
    let steps: usize = args.next().map_or(200, |s| s.parse().expect("STEPS"));
    let tokens: usize = std::env::var("TOKENS").map_or(1, |s| s.parse().unwrap());
    let context: usize = std::env::var("CONTEXT").map_or(64, |s| s.parse().unwrap());
    let m = LoadedModel::load(&path).unwrap();
    let mut cache = m.llama.new_cache(m.llama.config().n_layers);
    m.llama.forward(&mut [SeqPass { cache: &mut cache, tokens: &vec![1; context], logits: LogitsFor::None }]).unwrap();
    let feed = vec![42u32; tokens];
    let start = std::time::Instant::now();
    for _ in 0..steps {
        m.llama.forward(&mut [SeqPass { cache: &mut cache, tokens: &feed, logits: LogitsFor::All }]).unwrap();
        cache.truncate(context);
    }
    eprintln!("{:.2} ms per pass of {tokens}", start.elapsed().as_secs_f64() * 1e3 / steps as f64);
}
