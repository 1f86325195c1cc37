//! The edge client's settings file.
//!
//! Precedence, highest first: command-line flag, environment variable
//! (`TANDEM_SERVER`, `TANDEM_API_KEY`), this file, built-in default. The
//! file is `--config FILE`, else `$TANDEM_CONFIG`, else
//! `$XDG_CONFIG_HOME/tandem/edge.toml` (`~/.config/tandem/edge.toml`) when it
//! exists. Every field is optional:
//!
//! ```toml
//! server = "https://verify.example.com:50051"
//! api_key = "…"
//! ca_cert = "/etc/tandem/ca.pem"
//! model = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
//! draft = "layers:25"
//! backend = "cpu"
//! draft_len = 4
//! controller = "confidence:0.4"
//! slo_ttft_ms = 2000
//! slo_tpot_ms = 150
//! ```

use crate::EdgeError;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    pub server: Option<String>,
    pub api_key: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub model: Option<PathBuf>,
    pub quantize: Option<String>,
    pub draft: Option<String>,
    pub backend: Option<String>,
    pub draft_len: Option<usize>,
    pub controller: Option<String>,
    pub slo_ttft_ms: Option<u32>,
    pub slo_tpot_ms: Option<u32>,
}

impl EdgeConfig {
    /// Reads `explicit` (which must exist), else `$TANDEM_CONFIG` (which
    /// must exist), else the per-user file if there is one.
    pub fn load(explicit: Option<&Path>) -> Result<Self, EdgeError> {
        let from_env = std::env::var_os("TANDEM_CONFIG").filter(|v| !v.is_empty()).map(PathBuf::from);
        match explicit.map(Path::to_path_buf).or(from_env) {
            Some(path) => Self::read(&path),
            None => match user_config_path() {
                Some(path) if path.is_file() => Self::read(&path),
                _ => Ok(EdgeConfig::default()),
            },
        }
    }

    fn read(path: &Path) -> Result<Self, EdgeError> {
        let text = std::fs::read_to_string(path).map_err(|e| EdgeError::InvalidArgument(format!("`--config {}`: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| EdgeError::InvalidArgument(format!("`--config {}`: {e}", path.display())))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.message().to_string())
    }
}

/// `$XDG_CONFIG_HOME/tandem/edge.toml`, or `~/.config/tandem/edge.toml`.
pub fn user_config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("tandem").join("edge.toml"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_parses_and_unknown_ones_are_named() {
        let c = EdgeConfig::parse("server = \"http://h:1\"\napi_key = \"k\"\ndraft_len = 6\nslo_tpot_ms = 90\n").unwrap();
        assert_eq!(c.server.as_deref(), Some("http://h:1"));
        assert_eq!((c.api_key.as_deref(), c.draft_len, c.slo_tpot_ms), (Some("k"), Some(6), Some(90)));
        let err = EdgeConfig::parse("sever = \"typo\"").unwrap_err();
        assert!(err.contains("sever"), "{err}");
        assert!(EdgeConfig::parse("draft_len = \"four\"").is_err());
    }
}
