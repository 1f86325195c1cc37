//! Server configuration: a TOML file (`--config`), overridden by flags.

use crate::admission::PassLimits;
use crate::batcher::FifoBatcher;
use crate::wisp::WispConfig;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tandem_estimators::CounterWeights;

/// Everything the server needs to start. Field defaults are the documented
/// defaults; see README.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC address.
    pub listen: SocketAddr,
    /// Target model (a path or `hf:…`); None fetches the default model.
    pub model: Option<PathBuf>,
    /// Quantize a Hugging Face folder's weights as they load (`q4_0`,
    /// `q4_1`, `q8_0`, `q4_k`, `q6_k`); None keeps them f32.
    pub quantize: Option<String>,
    /// `cpu` (default build); `cuda` / `metal` need those cargo features.
    pub device: String,
    /// KV cache memory all sessions together may hold, MiB.
    pub kv_budget_mb: usize,
    /// KV cache memory of prompts kept after their prefill for later
    /// sessions of the same tenant to copy (`prefix_cache`), MiB, on top
    /// of `kv_budget_mb`; 0 keeps none.
    pub prefix_cache_mb: usize,
    /// TOML file with `[[tenant]]` tables; None admits only loopback clients.
    pub tenants: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Prometheus `/metrics` address; None disables it.
    pub metrics_listen: Option<SocketAddr>,
    /// Sessions with no message for this long are dropped, seconds.
    pub idle_ttl_s: u64,
    /// On SIGTERM: refuse new sessions and connections, report NOT_SERVING,
    /// and let open sessions finish for up to this long, seconds; then the
    /// rest are told to resume elsewhere.
    pub drain_s: u64,
    /// Pin the model's compute threads to CPUs, one each (Linux): steadier
    /// pass times, so a sharper verification-time estimate.
    pub pin_threads: bool,
    /// Decode the sessions edges hand off: suggest hand-offs (k = 0) while
    /// the server has room to spare, and hand sessions back when the room
    /// is gone. false: never suggest one, and hand any hand-off back after
    /// one token (every edge drafts; server time is kept for verification
    /// and server-only clients).
    pub hand_offs: bool,
    /// Warm-start the estimator from this file (`--calibration-out` of an
    /// earlier start with the same model and device) instead of the
    /// profiling sweep. None: sweep at start.
    pub calibration: Option<PathBuf>,
    pub batcher: BatcherConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:50051".parse().expect("literal address"),
            model: None,
            quantize: None,
            device: "cpu".into(),
            kv_budget_mb: 2048,
            prefix_cache_mb: 64,
            tenants: None,
            tls_cert: None,
            tls_key: None,
            metrics_listen: None,
            idle_ttl_s: 60,
            drain_s: 10,
            pin_threads: true,
            hand_offs: true,
            calibration: None,
            batcher: BatcherConfig::default(),
        }
    }
}

/// How passes are formed.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatcherConfig {
    /// `wisp` (SLO-aware, estimator, fair counters) or `fcfs` (first come,
    /// first served: the SLED baseline).
    pub policy: String,
    /// New tokens per pass (prefill chunks are cut to fit).
    pub max_batch_tokens: usize,
    /// Sequences per pass.
    pub max_batch_seqs: usize,
    /// Largest prefill chunk per pass (wisp).
    pub prefill_chunk: usize,
    /// Longest wait for more arrivals when nobody is in a hurry, ms (wisp).
    pub max_delay_ms: u64,
    /// q of the verification-time bound T_q (wisp).
    pub quantile: f64,
    /// Counter cost per prefill token and per verified position (wisp).
    pub charge_prefill: f64,
    pub charge_verify: f64,
    /// Most that work without a deadline may add to a pass of on-time work
    /// it rides along in, as a share of the pass's estimated time (wisp).
    pub best_effort_share: f64,
    /// Wait after which work without a deadline is served as on-time, ms (wisp).
    pub best_effort_wait_ms: u64,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        BatcherConfig {
            policy: "wisp".into(),
            max_batch_tokens: 256,
            max_batch_seqs: 32,
            prefill_chunk: 128,
            max_delay_ms: 2,
            quantile: 0.9,
            charge_prefill: 1.0,
            charge_verify: 2.0,
            best_effort_share: 0.05,
            best_effort_wait_ms: 500,
        }
    }
}

impl BatcherConfig {
    /// The WISP scheduler's settings from these (what the server and the
    /// simulator both build).
    pub fn wisp(&self) -> WispConfig {
        WispConfig {
            max_tokens: self.max_batch_tokens,
            max_seqs: self.max_batch_seqs,
            prefill_chunk: self.prefill_chunk,
            max_delay: Duration::from_millis(self.max_delay_ms),
            quantile: self.quantile,
            weights: CounterWeights { prefill: self.charge_prefill, verify: self.charge_verify },
            best_effort_share: self.best_effort_share,
            best_effort_wait: Duration::from_millis(self.best_effort_wait_ms),
            ..WispConfig::default()
        }
    }

    /// Refuses settings the batchers cannot work with, naming the field.
    pub fn check(&self) -> Result<(), String> {
        for (name, value) in [("max_batch_tokens", self.max_batch_tokens), ("max_batch_seqs", self.max_batch_seqs), ("prefill_chunk", self.prefill_chunk)] {
            if value == 0 {
                return Err(format!("`[batcher] {name}` must be at least 1"));
            }
        }
        if !(self.quantile > 0.0 && self.quantile < 1.0) {
            return Err(format!("`[batcher] quantile` must lie between 0 and 1, got {}", self.quantile));
        }
        for (name, value) in [("charge_prefill", self.charge_prefill), ("charge_verify", self.charge_verify), ("best_effort_share", self.best_effort_share)] {
            if !(value >= 0.0 && value.is_finite()) {
                return Err(format!("`[batcher] {name}` must be a finite number of at least 0, got {value}"));
            }
        }
        Ok(())
    }

    /// The pass limits admission costs sessions under.
    pub fn pass_limits(&self) -> PassLimits {
        PassLimits { max_batch_tokens: self.max_batch_tokens, max_batch_seqs: self.max_batch_seqs, prefill_chunk: self.prefill_chunk }
    }

    /// The first-come-first-served batcher with these budgets.
    pub fn fifo(&self) -> FifoBatcher {
        FifoBatcher { max_tokens: self.max_batch_tokens, max_seqs: self.max_batch_seqs }
    }
}

/// One `[[tenant]]` table of the tenants file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    pub api_key: String,
    #[serde(default = "one")]
    pub weight: f64,
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// Serve this tenant's sessions as if they set no objectives: their
    /// work fills the gaps other tenants' deadlines leave (a batch tenant,
    /// or one that hammers the server).
    #[serde(default)]
    pub best_effort: bool,
}

fn one() -> f64 {
    1.0
}
fn default_max_sessions() -> usize {
    64
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantsFile {
    #[serde(default)]
    pub tenant: Vec<TenantConfig>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batcher_settings_are_checked_by_name() {
        assert_eq!(BatcherConfig::default().check(), Ok(()));
        let bad = |text: &str| toml::from_str::<ServerConfig>(text).unwrap().batcher.check().unwrap_err();
        assert!(bad("[batcher]\nquantile = 1.5\n").contains("quantile"));
        assert!(bad("[batcher]\nmax_batch_seqs = 0\n").contains("max_batch_seqs"));
        assert!(bad("[batcher]\nbest_effort_share = -0.1\n").contains("best_effort_share"));
        assert!(bad("[batcher]\ncharge_verify = nan\n").contains("charge_verify"));
    }
}
