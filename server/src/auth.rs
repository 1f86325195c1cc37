//! API keys → tenants. Identity comes only from request metadata.

use crate::config::{TenantConfig, TenantsFile};
use crate::ServeError;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug)]
pub struct Tenant {
    pub name: String,
    pub weight: f64,
    pub max_sessions: usize,
    /// Its sessions' objectives are not scheduled for: their work is
    /// best-effort (see `wisp`).
    pub best_effort: bool,
}

pub struct Auth {
    by_key: HashMap<String, Arc<Tenant>>,
    /// Without a tenants file: everyone is tenant `local` (loopback only).
    open: Option<Arc<Tenant>>,
}

impl Auth {
    /// Every client is the tenant `local`; the caller ensures loopback.
    pub fn local_only() -> Self {
        Auth { by_key: HashMap::new(), open: Some(Arc::new(Tenant { name: "local".into(), weight: 1.0, max_sessions: 256, best_effort: false })) }
    }

    pub fn from_file(text: &str) -> Result<Self, String> {
        let file: TenantsFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut by_key = HashMap::new();
        for TenantConfig { name, api_key, weight, max_sessions, best_effort } in file.tenant {
            if api_key.len() < 8 {
                return Err(format!("tenant `{name}`: `api_key` must be at least 8 characters"));
            }
            if !(weight > 0.0 && weight.is_finite()) {
                return Err(format!("tenant `{name}`: `weight` must be > 0"));
            }
            if by_key.insert(api_key, Arc::new(Tenant { name: name.clone(), weight, max_sessions, best_effort })).is_some() {
                return Err(format!("tenant `{name}`: `api_key` is used by another tenant"));
            }
        }
        if by_key.is_empty() {
            return Err("no `[[tenant]]` tables".into());
        }
        Ok(Auth { by_key, open: None })
    }

    /// `authorization: Bearer KEY` (or `x-api-key: KEY`) → tenant.
    pub fn authenticate(&self, md: &tonic::metadata::MetadataMap) -> Result<Arc<Tenant>, ServeError> {
        if let Some(t) = &self.open {
            return Ok(t.clone());
        }
        let key = md
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| md.get("x-api-key").and_then(|v| v.to_str().ok()))
            .ok_or_else(|| ServeError::Unauthenticated("missing API key (`authorization: Bearer KEY`)".into()))?;
        self.by_key.get(key).cloned().ok_or_else(|| ServeError::Unauthenticated("invalid API key".into()))
    }

    /// Every tenant's name and fair-share weight.
    pub fn tenant_weights(&self) -> Vec<(String, f64)> {
        self.open.iter().chain(self.by_key.values()).map(|t| (t.name.clone(), t.weight)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(auth: &Auth, key: &str) -> Arc<Tenant> {
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert("authorization", format!("Bearer {key}").parse().unwrap());
        auth.authenticate(&md).unwrap()
    }

    #[test]
    fn tenants_file_sets_weights_caps_and_best_effort() {
        let auth = Auth::from_file(
            "[[tenant]]\nname = \"a\"\napi_key = \"a-key-123\"\n\n[[tenant]]\nname = \"batch\"\napi_key = \"b-key-456\"\nweight = 0.5\nbest_effort = true\n",
        )
        .unwrap();
        let (a, b) = (tenant(&auth, "a-key-123"), tenant(&auth, "b-key-456"));
        assert_eq!((a.name.as_str(), a.weight, a.max_sessions, a.best_effort), ("a", 1.0, 64, false));
        assert_eq!((b.name.as_str(), b.weight, b.best_effort), ("batch", 0.5, true));
        let err = Auth::from_file("[[tenant]]\nname = \"x\"\napi_key = \"x-key-123\"\nbest_effort = 1\n").err().unwrap();
        assert!(err.contains("best_effort"), "{err}");
    }
}
