//! Profiling passes on the real model: the sweep that warm-starts the
//! verification-time estimator at server start (also used by
//! `tandem-bench estimator`), and the idle penalty `--calibration-out`
//! writes for the simulator.

use std::collections::HashMap;
use std::time::Instant;
use tandem_estimators::{BatchShape, IdlePenalty};
use tandem_model::{KvCache, Llama, LogitsFor, Result, SeqPass};

/// Runs batches of chosen shapes. Each cache a pass used is truncated back
/// to its context and kept for the next pass at that context, so once a
/// shape has run, timing it again sets nothing up and passes run back to
/// back, as a busy server's do. (Until stop 50 each pass cloned its
/// caches first, one thread copying while the other idled, and this VM
/// runs a pass after idle slower: the sweep's 1-token pass read 4.4–9.0
/// ms over twelve server starts in stop 42, against 2.9 ms back to back.)
pub struct Profiler<'a> {
    llama: &'a Llama,
    /// By context length: a cache prefilled to it (cloned when more are
    /// needed at once) and the spare ones, each holding exactly that many
    /// positions.
    contexts: HashMap<usize, (KvCache, Vec<KvCache>)>,
}

fn filler(n: usize, salt: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + salt * 104_729) % 40_000 + 100) as u32).collect()
}

impl<'a> Profiler<'a> {
    pub fn new(llama: &'a Llama) -> Self {
        Profiler { llama, contexts: HashMap::new() }
    }

    /// A cache of `len` positions: a spare one, or a copy of the
    /// prefilled one.
    fn context(&mut self, len: usize) -> Result<KvCache> {
        if !self.contexts.contains_key(&len) {
            let mut cache = self.llama.new_cache(self.llama.config().n_layers);
            if len > 0 {
                self.llama.forward(&mut [SeqPass { cache: &mut cache, tokens: &filler(len, 0), logits: LogitsFor::None }])?;
            }
            self.contexts.insert(len, (cache, Vec::new()));
        }
        let (prefilled, spare) = self.contexts.get_mut(&len).expect("inserted above");
        Ok(spare.pop().unwrap_or_else(|| prefilled.clone()))
    }

    /// Back to the spares at `len` positions.
    fn keep(&mut self, mut cache: KvCache, len: usize) {
        cache.truncate(len);
        if let Some((_, spare)) = self.contexts.get_mut(&len) {
            spare.push(cache);
        }
    }

    /// One batch: sequences with (new tokens, context) each, plus one
    /// `prefill`-token prompt if non-zero. Returns its shape and wall time, ms.
    pub fn time_batch(&mut self, seqs: &[(usize, usize)], prefill: usize) -> Result<(BatchShape, f64)> {
        let mut caches = seqs.iter().map(|&(_, context)| self.context(context)).collect::<Result<Vec<_>>>()?;
        for (cache, &(tokens, _)) in caches.iter_mut().zip(seqs) {
            cache.reserve(tokens);
        }
        let mut prefill_cache = self.context(0)?;
        prefill_cache.reserve(prefill);
        let news: Vec<Vec<u32>> = seqs.iter().enumerate().map(|(s, &(tokens, _))| filler(tokens, s + 1)).collect();
        let prompt = filler(prefill, 7);
        let mut batch: Vec<SeqPass> = caches.iter_mut().zip(&news).map(|(cache, t)| SeqPass { cache, tokens: t, logits: LogitsFor::All }).collect();
        if prefill > 0 {
            batch.push(SeqPass { cache: &mut prefill_cache, tokens: &prompt, logits: LogitsFor::Last });
        }
        let start = Instant::now();
        self.llama.forward(&mut batch)?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        for (cache, &(_, context)) in caches.into_iter().zip(seqs) {
            self.keep(cache, context);
        }
        self.keep(prefill_cache, 0);
        let shape = seqs.iter().fold(
            BatchShape { seqs: usize::from(prefill > 0), tokens: prefill, token_context: prefill * prefill, prefill_tokens: prefill },
            |acc, &(tokens, context)| acc + BatchShape { seqs: 1, tokens, token_context: tokens * (context + tokens), prefill_tokens: 0 },
        );
        Ok((shape, ms))
    }
}

/// Timings per shape in the sweep; the median is kept.
const SWEEP_REPEATS: usize = 3;

/// Load before the first timing: from idle, this VM takes about 110 ms of
/// back-to-back passes to reach its speed (stop 46's ramps).
const WARM_UP: std::time::Duration = std::time::Duration::from_millis(150);

/// A grid of verification-like and mixed batches, timed back to back after
/// a warm-up: what a pass costs on a busy server (the simulator adds the
/// cost of idling before a pass from [`idle_penalty`]). Each shape runs
/// once untimed (its caches are prefilled then), then [`SWEEP_REPEATS`]
/// times, and the median is kept, so one pass caught by a slow moment of
/// a shared machine does not move the whole fit. Slow phases longer than
/// a shape's repeats still show. Four to five seconds on this VM.
pub fn sweep(llama: &Llama) -> Result<Vec<(BatchShape, f64)>> {
    let mut p = Profiler::new(llama);
    let mut samples = Vec::new();
    for &(seqs, tokens, context, prefill) in &[
        (1, 1, 32, 0),
        (1, 5, 32, 0),
        (1, 5, 192, 0),
        (2, 3, 64, 0),
        (4, 5, 64, 0),
        (4, 1, 128, 0),
        (8, 5, 32, 0),
        (8, 2, 192, 0),
        (0, 0, 0, 64),
        (2, 5, 64, 32),
        (1, 9, 128, 0),
        (3, 5, 160, 0),
        (0, 0, 0, 128),
        (6, 3, 96, 16),
        // What a busy server runs: many sessions a pass. Without these the
        // fit's cost per sequence came from passes of one to eight and
        // predicted 32 one-token sequences at 57–69 ms against 43–45.
        (16, 1, 128, 0),
        (32, 1, 160, 0),
        (24, 2, 192, 0),
        (12, 5, 96, 0),
        (20, 3, 160, 32),
    ] {
        let batch = vec![(tokens, context); seqs];
        p.time_batch(&batch, prefill)?;
        if samples.is_empty() {
            let start = Instant::now();
            while start.elapsed() < WARM_UP {
                p.time_batch(&batch, prefill)?;
            }
        }
        let mut timed = (0..SWEEP_REPEATS).map(|_| p.time_batch(&batch, prefill)).collect::<Result<Vec<_>>>()?;
        timed.sort_by(|a, b| a.1.total_cmp(&b.1));
        samples.push(timed[SWEEP_REPEATS / 2]);
    }
    Ok(samples)
}

/// Idle times the penalty is measured after, ms.
const IDLE_GAPS_MS: [f64; 7] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];
/// Rounds over the gaps; each gap's median is kept.
const IDLE_ROUNDS: usize = 5;
/// Back-to-back passes before each gap, the last few timed as the reference.
const BUSY_PASSES: usize = 8;

/// What a pass costs beyond a back-to-back one after the device idled
/// (for the simulator, which adds it to [`sweep`]'s fit). A decode step at
/// a short context is timed after each of [`IDLE_GAPS_MS`] of sleep, each
/// gap preceded by back-to-back steps, in interleaved rounds; each point
/// is the median after the gap minus the median back to back, at least 0.
/// About two seconds.
pub fn idle_penalty(llama: &Llama) -> Result<IdlePenalty> {
    let mut p = Profiler::new(llama);
    let step = [(1, 32)];
    let start = Instant::now();
    while start.elapsed() < WARM_UP {
        p.time_batch(&step, 0)?;
    }
    let mut busy = Vec::new();
    let mut after: Vec<Vec<f64>> = vec![Vec::new(); IDLE_GAPS_MS.len()];
    for _ in 0..IDLE_ROUNDS {
        for (gap, times) in IDLE_GAPS_MS.iter().zip(&mut after) {
            for i in 0..BUSY_PASSES {
                let ms = p.time_batch(&step, 0)?.1;
                if i >= BUSY_PASSES / 2 {
                    busy.push(ms);
                }
            }
            std::thread::sleep(std::time::Duration::from_secs_f64(gap / 1e3));
            times.push(p.time_batch(&step, 0)?.1);
        }
    }
    let back_to_back = median(&mut busy);
    let points = IDLE_GAPS_MS.iter().zip(&mut after).map(|(&gap, times)| (gap, (median(times) - back_to_back).max(0.0))).collect();
    Ok(IdlePenalty { points })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
