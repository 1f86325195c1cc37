//! Ragged passes in a loop, for profiling: `ragged_profile MODEL STEPS`.
use tandem_model::*;
fn main() {
    let mut args = std::env::args().skip(1);
    let path = std::path::PathBuf::from(args.next().expect("MODEL"));
    let steps: usize = args.next().map_or(30, |s| s.parse().expect("STEPS"));
    let m = LoadedModel::load(&path).unwrap();
    let ctx = [16usize, 48, 96, 160, 224, 320, 448, 640];
    let mut caches: Vec<KvCache> = ctx
        .iter()
        .map(|&c| {
            let mut cache = m.llama.new_cache(m.llama.config().n_layers);
            let toks: Vec<u32> = (0..c as u32).map(|i| 100 + i % 1000).collect();
            m.llama.forward(&mut [SeqPass { cache: &mut cache, tokens: &toks, logits: LogitsFor::None }]).unwrap();
            cache
        })
        .collect();
    let feed = vec![42u32; 5];
    let start = std::time::Instant::now();
    for _ in 0..steps {
        let mut passes: Vec<SeqPass> = caches.iter_mut().map(|c| SeqPass { cache: c, tokens: &feed, logits: LogitsFor::All }).collect();
        m.llama.forward(&mut passes).unwrap();
        for (c, &l) in caches.iter_mut().zip(&ctx) {
            c.truncate(l);
        }
    }
    eprintln!("{:.2} ms per ragged pass", start.elapsed().as_secs_f64() * 1e3 / steps as f64);
}
