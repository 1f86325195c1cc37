//! Training data for a draft, made here from real text: the target's own
//! greedy continuations (self-distillation) of chat requests built from
//! templates and of Python standard-library function headers, with the
//! target's hidden states at every position. Evaluation uses the bench's
//! prompts (HumanEval, the chat set), which never appear in training.

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use std::path::{Path, PathBuf};
use tandem_model::{argmax, LoadedModel, LogitsFor, SeqPass};

/// One traced sequence: every position the target was fed, its greedy
/// next token, and its hidden states.
#[derive(Clone)]
pub struct Traced {
    pub tokens: Vec<u32>,
    /// The target's greedy token after each position.
    pub labels: Vec<u32>,
    /// Positions before this are the prompt (their labels are the target's
    /// guesses about prompt text, not what a draft is asked for).
    pub prompt_len: usize,
    /// Residual stream after the early-exit layer, `len × hidden`.
    pub exit: Vec<f32>,
    /// Final hidden state before the norm, `len × hidden`.
    pub last: Vec<f32>,
    /// `chat` or `code`.
    pub kind: &'static str,
}

impl Traced {
    pub fn positions(&self) -> usize {
        self.tokens.len()
    }
}

const TOPICS: &[&str] = &[
    "volcanoes",
    "the moon",
    "photosynthesis",
    "coffee",
    "the Roman Empire",
    "machine learning",
    "recycling",
    "dogs",
    "the ocean",
    "chess",
    "gardening",
    "electric cars",
    "the human heart",
    "music theory",
    "climate change",
    "the internet",
    "bees",
    "mountains",
    "friendship",
    "sleep",
    "exercise",
    "baking bread",
    "the solar system",
    "rainforests",
    "ancient Egypt",
    "saving money",
    "time management",
    "birds",
    "trains",
    "the brain",
    "vaccines",
    "earthquakes",
    "painting",
    "poetry",
    "football",
    "the Olympics",
    "libraries",
    "smartphones",
    "rivers",
    "deserts",
    "whales",
    "honey",
    "the printing press",
    "robots",
    "airplanes",
    "snow",
    "cheese",
    "mathematics",
    "gravity",
    "dinosaurs",
    "the violin",
    "public speaking",
    "meditation",
    "camping",
    "volunteering",
    "bridges",
    "windmills",
    "green tea",
    "the alphabet",
    "clouds",
    "pizza",
    "tigers",
    "the piano",
    "photography",
    "Mars",
    "penguins",
    "the stock market",
    "knitting",
    "the Great Wall of China",
    "volleyball",
    "tomatoes",
    "lighthouses",
    "jazz",
    "museums",
    "castles",
    "the Amazon river",
    "coral reefs",
    "submarines",
    "astronauts",
    "chocolate",
    "origami",
    "board games",
    "the Renaissance",
    "elephants",
    "kites",
    "lightning",
    "glaciers",
    "spiders",
    "hot air balloons",
    "yoga",
    "the microscope",
    "wind energy",
    "solar panels",
    "the water cycle",
    "marathons",
    "podcasts",
    "the ancient Greeks",
    "octopuses",
    "fireworks",
    "the telephone",
    "pyramids",
    "vegetables",
    "rainbows",
    "sharks",
    "the Arctic",
    "farming",
    "mushrooms",
    "maps",
    "pottery",
    "comets",
    "the guitar",
    "skateboarding",
    "rice",
    "owls",
    "the metric system",
    "first aid",
    "video games",
    "umbrellas",
];

const TEMPLATES: &[&str] = &[
    "Explain {} in simple terms.",
    "What are three interesting facts about {}?",
    "Write a short poem about {}.",
    "Give me some practical tips about {}.",
    "What is the history of {}?",
    "Describe {} to a ten-year-old.",
    "What are the pros and cons of {}?",
    "Write a short story involving {}.",
    "Why do people care about {}?",
    "Summarize what you know about {} in one paragraph.",
    "How can I learn more about {}?",
    "Write a friendly email to a colleague about {}.",
    "Name three things related to {} and say why each matters.",
    "List five facts about {}.",
    "Write a haiku about {}.",
    "Answer in two sentences: what is special about {}?",
    "Give me a quiz question about {} with its answer.",
    "Suggest three titles for a blog post about {}.",
    "Write a short note to a friend that mentions {}.",
    "What questions should a beginner ask about {}?",
    "Compare {} with something from everyday life.",
    "Tell me a joke about {}.",
];

const CODE_TASKS: &[&str] = &[
    "reverses a string",
    "checks whether a number is prime",
    "returns the n-th Fibonacci number",
    "counts the vowels in a sentence",
    "merges two sorted lists",
    "removes duplicates from a list while keeping order",
    "computes the factorial of n",
    "checks whether a word is a palindrome",
    "finds the largest element of a list",
    "converts Celsius to Fahrenheit",
    "flattens a nested list",
    "computes the average of a list of numbers",
    "counts word frequencies in a text",
    "returns the greatest common divisor of two integers",
    "sorts a list of dictionaries by a key",
    "reads a CSV file and returns its rows",
    "validates an email address",
    "transposes a matrix",
    "finds all anagrams of a word in a list",
    "computes the running sum of a list",
];

/// Chat requests from the templates (every topic × template, then the
/// coding requests), shuffled reproducibly; `n` of them. Topics and
/// templates are broad on purpose: with the first 60 topics × 12 templates
/// alone, held-out chat agreement stopped rising at 40 % while training
/// agreement kept climbing. None is a bench chat prompt (those are held out).
pub fn chat_prompts(n: usize, seed: u64) -> Vec<String> {
    let mut all: Vec<String> = TOPICS.iter().flat_map(|t| TEMPLATES.iter().map(move |tpl| tpl.replace("{}", t))).collect();
    all.extend(CODE_TASKS.iter().map(|t| format!("Write a Python function that {t}.")));
    shuffle(&mut all, seed);
    all.truncate(n);
    all
}

/// Function headers with their docstrings from the Python standard
/// library (`def f(...):` followed by a `"""` docstring of at most 12
/// lines; tests, IDLE and demos left out), like HumanEval prompts; `n` of
/// them, chosen reproducibly.
pub fn stdlib_prompts(n: usize, seed: u64) -> Result<(Vec<String>, PathBuf)> {
    let root = python_stdlib()?;
    let mut files = Vec::new();
    python_files(&root, &mut files).with_context(|| format!("reading {}", root.display()))?;
    files.sort();
    let mut all = Vec::new();
    for f in &files {
        let Ok(text) = std::fs::read_to_string(f) else { continue };
        all.extend(functions_with_docstrings(&text));
    }
    all.sort();
    all.dedup();
    shuffle(&mut all, seed);
    all.truncate(n);
    Ok((all, root))
}

fn python_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    const SKIP: &[&str] = &["test", "tests", "idlelib", "turtledemo", "lib2to3", "site-packages", "dist-packages", "__pycache__"];
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if path.is_dir() && !SKIP.contains(&name.as_str()) {
            python_files(&path, out)?;
        } else if name.ends_with(".py") {
            out.push(path);
        }
    }
    Ok(())
}

fn python_stdlib() -> Result<PathBuf> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"])
        .output()
        .context("running python3 to find its standard library (the code half of the training data)")?;
    anyhow::ensure!(out.status.success(), "python3 could not report its standard library path");
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

pub(crate) fn functions_with_docstrings(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if !(line.starts_with("def ") && line.trim_end().ends_with(':')) || line.contains("def _") {
            continue;
        }
        let Some(first) = lines.get(i + 1) else { continue };
        if !first.trim_start().starts_with("\"\"\"") {
            continue;
        }
        let doc_end = if first.trim().len() > 3 && first.trim().ends_with("\"\"\"") {
            Some(i + 1)
        } else {
            (i + 2..lines.len().min(i + 14)).find(|&j| lines[j].contains("\"\"\""))
        };
        if let Some(end) = doc_end {
            out.push(lines[i..=end].join("\n") + "\n");
        }
    }
    out
}

/// Fisher–Yates with a splitmix64 stream: the same order on every machine.
pub fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut rng = Splitmix(seed);
    for i in (1..v.len()).rev() {
        v.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
}

pub struct Splitmix(pub u64);

impl Splitmix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Runs the target greedily on `prompts` (groups of sequences in one
/// batched pass), generating up to `max_new` tokens each (all of them given
/// when `max_new` is 0: the prompt already holds the continuation), and
/// records every position's greedy token and hidden states.
pub fn trace(model: &LoadedModel, prompts: &[(Vec<u32>, &'static str)], max_new: usize, exit_layer: usize, bar: &ProgressBar) -> Result<Vec<Traced>> {
    let llama = &model.llama;
    let (n_layers, hidden) = (llama.config().n_layers, llama.config().hidden);
    let eos = model.tokenizer.eos_tokens();
    let capture = [exit_layer, n_layers];
    let mut out = Vec::with_capacity(prompts.len());
    for group in prompts.chunks(16) {
        let mut caches: Vec<_> = group.iter().map(|_| llama.new_cache(n_layers)).collect();
        let mut seqs: Vec<Traced> =
            group.iter().map(|(p, kind)| Traced { tokens: vec![], labels: vec![], prompt_len: p.len(), exit: vec![], last: vec![], kind }).collect();
        // Tokens to feed next, per sequence (the whole prompt first).
        let mut feed: Vec<Vec<u32>> = group.iter().map(|(p, _)| p.clone()).collect();
        let mut live: Vec<usize> = (0..group.len()).collect();
        while !live.is_empty() {
            let mut passes: Vec<SeqPass> = caches
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| live.contains(i))
                .map(|(i, cache)| SeqPass { cache, tokens: &feed[i], logits: LogitsFor::All })
                .collect();
            let (logits, captured) = llama.forward_capturing(&mut passes, &capture)?;
            drop(passes);
            let mut row = 0;
            for (l, &i) in logits.iter().zip(&live) {
                let n = feed[i].len();
                let s = &mut seqs[i];
                s.tokens.extend_from_slice(&feed[i]);
                s.labels.extend((0..n).map(|r| argmax(l.row(r))));
                s.exit.extend_from_slice(&captured[0][row * hidden..(row + n) * hidden]);
                s.last.extend_from_slice(&captured[1][row * hidden..(row + n) * hidden]);
                row += n;
                bar.inc(n as u64);
            }
            live.retain(|&i| {
                let s = &seqs[i];
                let next = *s.labels.last().expect("a pass gives labels");
                let generated = s.positions() + 1 - s.prompt_len;
                let more = generated < max_new && !eos.contains(&next) && s.positions() + 1 < llama.config().context_len;
                feed[i] = vec![next];
                more
            });
        }
        out.extend(seqs);
    }
    Ok(out)
}

/// Traced sequences, saved and loaded as one safetensors file so an
/// interrupted run does not trace again.
pub fn save(path: &Path, seqs: &[Traced], hidden: usize) -> Result<()> {
    use candle_core::{Device, Tensor};
    let mut map = std::collections::HashMap::new();
    for (i, s) in seqs.iter().enumerate() {
        let n = s.positions();
        map.insert(format!("{i}.tokens"), Tensor::from_vec(s.tokens.clone(), n, &Device::Cpu)?);
        map.insert(format!("{i}.labels"), Tensor::from_vec(s.labels.clone(), n, &Device::Cpu)?);
        map.insert(format!("{i}.meta"), Tensor::from_vec(vec![s.prompt_len as u32, (s.kind == "code") as u32], 2, &Device::Cpu)?);
        map.insert(format!("{i}.exit"), Tensor::from_vec(s.exit.clone(), (n, hidden), &Device::Cpu)?.to_dtype(candle_core::DType::F16)?);
        map.insert(format!("{i}.last"), Tensor::from_vec(s.last.clone(), (n, hidden), &Device::Cpu)?.to_dtype(candle_core::DType::F16)?);
    }
    candle_core::safetensors::save(&map, path).with_context(|| format!("writing {}", path.display()))
}

pub fn load(path: &Path) -> Result<Vec<Traced>> {
    let map = candle_core::safetensors::load(path, &candle_core::Device::Cpu).with_context(|| format!("reading {}", path.display()))?;
    let count = map.keys().filter(|k| k.ends_with(".tokens")).count();
    (0..count)
        .map(|i| {
            let get = |f: &str| map.get(&format!("{i}.{f}")).with_context(|| format!("{}: missing {i}.{f}", path.display()));
            let meta = get("meta")?.to_vec1::<u32>()?;
            let floats = |f: &str| -> Result<Vec<f32>> { Ok(get(f)?.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?) };
            Ok(Traced {
                tokens: get("tokens")?.to_vec1()?,
                labels: get("labels")?.to_vec1()?,
                prompt_len: meta[0] as usize,
                kind: if meta[1] == 1 { "code" } else { "chat" },
                exit: floats("exit")?,
                last: floats("last")?,
            })
        })
        .collect()
}
