//! Prometheus text-format metrics and the `/metrics` HTTP endpoint.
//! Speculative-decoding counters follow vLLM's names
//! (`spec_decode_num_drafts`, `…_num_draft_tokens`, `…_num_accepted_tokens`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Cumulative histogram with fixed upper bounds.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(), sum_micros: AtomicU64::new(0), count: AtomicU64::new(0) }
    }

    pub fn observe(&self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if v <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros.fetch_add((v * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", c.load(Ordering::Relaxed));
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Per-tenant counters.
#[derive(Default, Clone, Copy)]
pub struct TenantStats {
    pub sessions_opened: u64,
    /// Sessions whose edge handed them to the server to decode.
    pub handoffs: u64,
    /// Sessions the server handed back to their edge to draft again.
    pub handbacks: u64,
    /// Verification rounds with at least one draft token.
    pub num_drafts: u64,
    pub num_draft_tokens: u64,
    pub num_accepted_tokens: u64,
    /// Positions the model verified (drafts + 1 per round).
    pub verified_positions: u64,
    pub prefill_tokens: u64,
    /// Prompt positions looked up in the prefix cache, and those found
    /// there (copied rather than prefilled): vLLM's `prefix_cache_queries`
    /// and `prefix_cache_hits`.
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    pub generated_tokens: u64,
    /// Requests (prefill, verification round, decode step) done by their deadline.
    pub slo_met: u64,
    pub slo_missed: u64,
}

pub struct Metrics {
    pub sessions: AtomicI64,
    /// 1 while draining (refusing new sessions before shutdown).
    pub draining: AtomicI64,
    /// 1 while the server could decode every session within its objectives.
    pub decode_room: AtomicI64,
    pub queue_depth: AtomicI64,
    pub kv_bytes_in_use: AtomicI64,
    pub kv_bytes_reserved: AtomicI64,
    pub kv_budget_bytes: AtomicI64,
    /// KV cache bytes the prefix cache holds (on top of the sessions' budget).
    pub prefix_cache_bytes: AtomicI64,
    pub batch_seqs: Histogram,
    pub batch_tokens: Histogram,
    pub pass_seconds: Histogram,
    refused: Mutex<BTreeMap<&'static str, u64>>,
    tenants: Mutex<BTreeMap<String, TenantStats>>,
    /// Fair-share counters per tenant (scheduler's view).
    service_counters: Mutex<Vec<(String, f64)>>,
    /// Largest spread of service counters between backlogged tenants so far.
    service_gap_max: Mutex<f64>,
    /// EWMA of |predicted − measured| / measured pass time.
    estimator_error: Mutex<Option<f64>>,
    /// The verification-time estimator's coefficients as last refitted.
    estimator_coefficients: Mutex<Option<[f64; 5]>>,
    /// Admission's estimated slack of the tightest round budget, ms.
    admission_headroom_ms: Mutex<Option<f64>>,
    /// EWMA over recent requests with a deadline of "met" (1) or not (0).
    slo_recent: Mutex<Option<f64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            sessions: AtomicI64::new(0),
            draining: AtomicI64::new(0),
            decode_room: AtomicI64::new(0),
            queue_depth: AtomicI64::new(0),
            kv_bytes_in_use: AtomicI64::new(0),
            kv_bytes_reserved: AtomicI64::new(0),
            kv_budget_bytes: AtomicI64::new(0),
            prefix_cache_bytes: AtomicI64::new(0),
            batch_seqs: Histogram::new(&[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
            batch_tokens: Histogram::new(&[1.0, 4.0, 16.0, 64.0, 128.0, 256.0, 512.0, 1024.0]),
            pass_seconds: Histogram::new(&[0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]),
            refused: Mutex::new(BTreeMap::new()),
            tenants: Mutex::new(BTreeMap::new()),
            service_counters: Mutex::new(Vec::new()),
            service_gap_max: Mutex::new(0.0),
            estimator_error: Mutex::new(None),
            estimator_coefficients: Mutex::new(None),
            admission_headroom_ms: Mutex::new(None),
            slo_recent: Mutex::new(None),
        }
    }
}

impl Metrics {
    pub fn refused(&self, reason: &'static str) {
        *self.refused.lock().expect("metrics lock").entry(reason).or_default() += 1;
    }

    pub fn tenant(&self, name: &str, f: impl FnOnce(&mut TenantStats)) {
        f(self.tenants.lock().expect("metrics lock").entry(name.to_string()).or_default());
    }

    /// A request with a deadline finished: counted per tenant and in the
    /// recent attainment an autoscaler watches.
    pub fn observe_slo(&self, tenant: &str, met: bool) {
        self.tenant(tenant, |t| if met { t.slo_met += 1 } else { t.slo_missed += 1 });
        let x = if met { 1.0 } else { 0.0 };
        let mut recent = self.slo_recent.lock().expect("metrics lock");
        *recent = Some(recent.map_or(x, |r| 0.98 * r + 0.02 * x));
    }

    pub fn set_service_counters(&self, counters: Vec<(String, f64)>) {
        *self.service_counters.lock().expect("metrics lock") = counters;
    }

    pub fn set_service_gap(&self, max: f64) {
        *self.service_gap_max.lock().expect("metrics lock") = max;
    }

    pub fn observe_estimate(&self, predicted_ms: f64, measured_ms: f64) {
        if measured_ms > 0.0 {
            let e = (predicted_ms - measured_ms).abs() / measured_ms;
            let mut cur = self.estimator_error.lock().expect("metrics lock");
            *cur = Some(cur.map_or(e, |c| 0.95 * c + 0.05 * e));
        }
    }

    pub fn set_estimator_coefficients(&self, c: Option<[f64; 5]>) {
        *self.estimator_coefficients.lock().expect("metrics lock") = c;
    }

    pub fn set_admission_headroom(&self, ms: Option<f64>) {
        *self.admission_headroom_ms.lock().expect("metrics lock") = ms;
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, v: i64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(&mut out, "tandem_sessions", "Open sessions.", self.sessions.load(Ordering::Relaxed));
        gauge(
            &mut out,
            "tandem_decode_room",
            "The server's room to decode every session itself within its objectives: 2 to spare (it suggests that sessions hand off), 1 some (hand-offs stand), 0 none (sessions handed off are handed back).",
            self.decode_room.load(Ordering::Relaxed),
        );
        gauge(&mut out, "tandem_queue_depth", "Requests waiting for a forward pass.", self.queue_depth.load(Ordering::Relaxed));
        gauge(&mut out, "tandem_draining", "1 while the server drains before shutdown (new sessions refused).", self.draining.load(Ordering::Relaxed));
        gauge(&mut out, "tandem_kv_bytes_in_use", "KV cache bytes held by sessions.", self.kv_bytes_in_use.load(Ordering::Relaxed));
        gauge(&mut out, "tandem_kv_bytes_reserved", "KV cache bytes reserved by admitted sessions.", self.kv_bytes_reserved.load(Ordering::Relaxed));
        gauge(&mut out, "tandem_kv_budget_bytes", "KV cache budget.", self.kv_budget_bytes.load(Ordering::Relaxed));
        gauge(&mut out, "tandem_prefix_cache_bytes", "KV cache bytes of prompts kept for reuse.", self.prefix_cache_bytes.load(Ordering::Relaxed));
        self.batch_seqs.render(&mut out, "tandem_batch_sequences", "Sequences per forward pass.");
        self.batch_tokens.render(&mut out, "tandem_batch_tokens", "New tokens per forward pass.");
        self.pass_seconds.render(&mut out, "tandem_pass_seconds", "Forward pass latency.");
        let _ = writeln!(out, "# HELP tandem_sessions_refused_total Sessions refused at admission.\n# TYPE tandem_sessions_refused_total counter");
        for (reason, n) in self.refused.lock().expect("metrics lock").iter() {
            let _ = writeln!(out, "tandem_sessions_refused_total{{reason=\"{reason}\"}} {n}");
        }
        let tenants = self.tenants.lock().expect("metrics lock").clone();
        if let Some(e) = *self.estimator_error.lock().expect("metrics lock") {
            gauge_f(&mut out, "tandem_estimator_relative_error", "EWMA of |predicted - measured| / measured pass time.", e);
        }
        if let Some(c) = *self.estimator_coefficients.lock().expect("metrics lock") {
            let _ = writeln!(
                out,
                "# HELP tandem_estimator_coefficient_ms Verification-time model T = Σ coefficient × term, as last refitted (token_context per 1000 token×context positions).\n# TYPE tandem_estimator_coefficient_ms gauge"
            );
            for (term, v) in ["pass", "seq", "token", "token_context", "scored"].iter().zip(c) {
                let _ = writeln!(out, "tandem_estimator_coefficient_ms{{term=\"{term}\"}} {v}");
            }
        }
        if let Some(ms) = *self.admission_headroom_ms.lock().expect("metrics lock") {
            gauge_f(
                &mut out,
                "tandem_admission_headroom_ms",
                "Estimated slack of the tightest round budget over a cycle of every session's round plus one pass; new sessions are refused below zero.",
                ms,
            );
        }
        if let Some(r) = *self.slo_recent.lock().expect("metrics lock") {
            gauge_f(&mut out, "tandem_slo_attainment_recent", "Fraction of recent requests (EWMA over ~50) that met their deadline.", r);
        }
        let _ = writeln!(
            out,
            "# HELP tandem_tenant_service_counter Fair-share service counter (weighted cost served).\n# TYPE tandem_tenant_service_counter gauge"
        );
        for (tenant, c) in self.service_counters.lock().expect("metrics lock").iter() {
            let _ = writeln!(out, "tandem_tenant_service_counter{{tenant=\"{tenant}\"}} {c}");
        }
        gauge_f(
            &mut out,
            "tandem_tenant_service_gap_max",
            "Largest spread so far of service counters (prefill token 1, verified position 2, over the tenant's weight) between tenants with work queued at once, whatever the policy.",
            *self.service_gap_max.lock().expect("metrics lock"),
        );
        // (metric, help, value of one tenant)
        type Counter = (&'static str, &'static str, fn(&TenantStats) -> u64);
        let counters: [Counter; 13] = [
            ("tandem_slo_met_total", "Requests finished by their SLO deadline.", |t| t.slo_met),
            ("tandem_slo_missed_total", "Requests finished after their SLO deadline.", |t| t.slo_missed),
            ("tandem_sessions_opened_total", "Sessions opened.", |t| t.sessions_opened),
            ("tandem_handoffs_total", "Sessions handed off by their edge for the server to decode.", |t| t.handoffs),
            ("tandem_handbacks_total", "Sessions the server handed back to their edge's drafts, its room to decode gone.", |t| t.handbacks),
            ("tandem_spec_decode_num_drafts_total", "Verification rounds with drafts.", |t| t.num_drafts),
            ("tandem_spec_decode_num_draft_tokens_total", "Draft tokens verified.", |t| t.num_draft_tokens),
            ("tandem_spec_decode_num_accepted_tokens_total", "Draft tokens accepted.", |t| t.num_accepted_tokens),
            ("tandem_verified_positions_total", "Positions verified (drafts + 1 per round).", |t| t.verified_positions),
            ("tandem_prefill_tokens_total", "Prompt tokens prefilled.", |t| t.prefill_tokens),
            ("tandem_prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.", |t| t.prefix_cache_queries),
            ("tandem_prefix_cache_hits_total", "Prompt tokens found in the prefix cache (copied, not prefilled).", |t| t.prefix_cache_hits),
            ("tandem_generated_tokens_total", "Tokens generated.", |t| t.generated_tokens),
        ];
        for (name, help, get) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (tenant, stats) in &tenants {
                let _ = writeln!(out, "{name}{{tenant=\"{tenant}\"}} {}", get(stats));
            }
        }
        out
    }
}

fn gauge_f(out: &mut String, name: &str, help: &str, v: f64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

/// Serves `GET /metrics` until the task is dropped.
pub async fn serve_metrics(listener: TcpListener, metrics: std::sync::Arc<Metrics>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else { continue };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            // Read the request head (bounded in size and time).
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while len < buf.len() {
                    match conn.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => len += n,
                    }
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            })
            .await;
            let response = if read.is_ok() && buf[..len].starts_with(b"GET /metrics") {
                let body = metrics.render();
                format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
            };
            let _ = conn.write_all(response.as_bytes()).await;
        });
    }
}
