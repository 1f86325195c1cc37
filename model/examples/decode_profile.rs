//! Runs decode steps in a loop, for profiling: `decode_profile MODEL STEPS`
//! (env: `TOKENS` new tokens a pass, default 1; `CONTEXT` cached positions
//! before each pass, default 64; `SEQS` sequences a pass, each with
//! `TOKENS` new tokens and `CONTEXT` cached, default 1; `GAP_MS` idle time
//! between passes, default 0, which prints the median pass instead of the
//! mean).
use tandem_model::*;
fn main() {
    let mut args = std::env::args().skip(1);
    let path = std::path::PathBuf::from(args.next().expect("MODEL"));
    let steps: usize = args.next().map_or(200, |s| s.parse().expect("STEPS"));
    let tokens: usize = std::env::var("TOKENS").map_or(1, |s| s.parse().unwrap());
    let context: usize = std::env::var("CONTEXT").map_or(64, |s| s.parse().unwrap());
    let m = LoadedModel::load(&path).unwrap();
    let seqs: usize = std::env::var("SEQS").map_or(1, |s| s.parse().unwrap());
    let mut caches: Vec<KvCache> = (0..seqs).map(|_| m.llama.new_cache(m.llama.config().n_layers)).collect();
    for cache in &mut caches {
        m.llama.forward(&mut [SeqPass { cache, tokens: &vec![1; context], logits: LogitsFor::None }]).unwrap();
    }
    let gap_ms: f64 = std::env::var("GAP_MS").map_or(0.0, |s| s.parse().unwrap());
    let feed = vec![42u32; tokens];
    let start = std::time::Instant::now();
    let mut passes = Vec::with_capacity(steps);
    for _ in 0..steps {
        if gap_ms > 0.0 {
            std::thread::sleep(std::time::Duration::from_secs_f64(gap_ms / 1e3));
        }
        let pass = std::time::Instant::now();
        let mut batch: Vec<SeqPass> = caches.iter_mut().map(|cache| SeqPass { cache, tokens: &feed, logits: LogitsFor::All }).collect();
        m.llama.forward(&mut batch).unwrap();
        caches.iter_mut().for_each(|c| c.truncate(context));
        passes.push(pass.elapsed().as_secs_f64() * 1e3);
    }
    if gap_ms > 0.0 {
        passes.sort_by(f64::total_cmp);
        eprintln!("{:.2} ms median pass of {seqs} × {tokens} after {gap_ms} ms gaps", passes[steps / 2]);
    } else {
        eprintln!("{:.2} ms per pass of {seqs} × {tokens}", start.elapsed().as_secs_f64() * 1e3 / steps as f64);
    }
}
