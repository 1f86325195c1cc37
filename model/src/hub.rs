//! Models from the Hugging Face Hub: `hf:OWNER/NAME` (a safetensors
//! folder) or `hf:OWNER/NAME/FILE.gguf` (one GGUF file), each optionally
//! `@REVISION` (a branch, tag or commit; `main` by default).
//!
//! Files go into the Hub's own cache (`$HF_HOME/hub`, by default
//! `~/.cache/huggingface/hub`, the layout Python's `huggingface_hub` uses),
//! so a model fetched by either is not fetched again, and the path handed
//! back is the cache's snapshot folder or file. The environment is read as
//! the Python tools read it: `HF_ENDPOINT` (a mirror), `HF_HUB_CACHE` or
//! `HF_HOME` (the cache), `HF_TOKEN` (gated and private repos; else the
//! token file `huggingface-cli login` writes, or `HF_TOKEN_PATH`) and
//! `HF_HUB_OFFLINE` (cache only). When the Hub cannot be reached, a
//! snapshot already in the cache is used, with a warning.
//!
//! As in Python, a branch means its latest commit: when it has moved on
//! since the cache fetched it, the new commit's snapshot is made, a file
//! whose content the cache holds already (same ETag, the Hub's content
//! hash) linked to that blob rather than downloaded again (`hf-hub` 0.4
//! alone downloads every file of a new commit).

use crate::hf::{shards, SHARD_INDEX};
use crate::{ModelError, Result};
use hf_hub::api::sync::{Api, ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};

/// Resumptions of one file's download before giving up.
const RETRIES: usize = 4;

/// Prefix that marks a `--model` (or `model:` draft) as a Hub reference.
pub const PREFIX: &str = "hf:";

/// A parsed `hf:OWNER/NAME[/FILE.gguf][@REVISION]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubModel {
    /// `OWNER/NAME`.
    pub repo: String,
    /// A GGUF file in the repo; `None` for the repo's safetensors folder.
    pub file: Option<String>,
    pub revision: String,
}

impl HubModel {
    /// `None` when `spec` does not start with `hf:`.
    pub fn parse(spec: &str) -> Option<Result<HubModel>> {
        let rest = spec.strip_prefix(PREFIX)?;
        let bad = |why: &str| ModelError::InvalidArgument(format!("`{spec}`: {why} (expected hf:OWNER/NAME or hf:OWNER/NAME/FILE.gguf, optionally @REVISION)"));
        let (path, revision) = match rest.rsplit_once('@') {
            Some((_, "")) => return Some(Err(bad("empty revision"))),
            Some((path, rev)) => (path, rev.to_string()),
            None => (rest, "main".to_string()),
        };
        let parts: Vec<&str> = path.split('/').collect();
        if parts.len() < 2 || parts.iter().any(|p| p.is_empty() || *p == "." || *p == "..") {
            return Some(Err(bad("a repo is OWNER/NAME")));
        }
        let file = (parts.len() > 2).then(|| parts[2..].join("/"));
        if file.as_ref().is_some_and(|f| !f.ends_with(".gguf")) {
            return Some(Err(bad("a file in the repo must be a .gguf; for a safetensors model name the repo alone")));
        }
        Some(Ok(HubModel { repo: format!("{}/{}", parts[0], parts[1]), file, revision }))
    }

    fn repo(&self) -> Repo {
        Repo::with_revision(self.repo.clone(), RepoType::Model, self.revision.clone())
    }
}

impl std::fmt::Display for HubModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PREFIX}{}", self.repo)?;
        if let Some(file) = &self.file {
            write!(f, "/{file}")?;
        }
        if self.revision != "main" {
            write!(f, "@{}", self.revision)?;
        }
        Ok(())
    }
}

/// Where and how to reach the Hub.
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// The Hub's address; `None` for huggingface.co.
    pub endpoint: Option<String>,
    /// The cache folder (holding `models--OWNER--NAME`); `None` for
    /// `$HF_HOME/hub` or `~/.cache/huggingface/hub`.
    pub cache: Option<PathBuf>,
    /// An access token, if any.
    pub token: Option<String>,
    /// Use the cache only.
    pub offline: bool,
    /// Draw download progress bars on stderr.
    pub progress: bool,
}

impl HubOptions {
    /// `HF_ENDPOINT`, `HF_HOME`, `HF_HUB_CACHE`, `HF_TOKEN`,
    /// `HF_TOKEN_PATH` and `HF_HUB_OFFLINE`, as Python's `huggingface_hub`
    /// reads them.
    pub fn from_env() -> HubOptions {
        let var = |name| std::env::var(name).ok().filter(|v| !v.is_empty());
        // The token: HF_TOKEN, else the file `huggingface-cli login` wrote.
        let home = var("HF_HOME").map(PathBuf::from).or_else(|| var("HOME").map(|h| Path::new(&h).join(".cache/huggingface")));
        let token_file = var("HF_TOKEN_PATH").map(PathBuf::from).or_else(|| home.map(|h| h.join("token")));
        let token =
            var("HF_TOKEN").or_else(|| token_file.and_then(|f| std::fs::read_to_string(f).ok()).map(|t| t.trim().to_string()).filter(|t| !t.is_empty()));
        HubOptions {
            endpoint: var("HF_ENDPOINT").map(|e| e.trim_end_matches('/').to_string()),
            cache: var("HF_HUB_CACHE").map(PathBuf::from),
            token,
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| !matches!(v.to_ascii_lowercase().as_str(), "0" | "false" | "no" | "off")),
            progress: true,
        }
    }

    fn cache(&self) -> Cache {
        self.cache.clone().map_or_else(Cache::from_env, Cache::new)
    }
}

/// The local path of `model`: the cached snapshot folder (or GGUF file),
/// downloading what is missing.
pub fn fetch(model: &HubModel, options: &HubOptions) -> Result<PathBuf> {
    let cache = options.cache().repo(model.repo());
    if options.offline {
        return cached(model, |f| cache.get(f))
            .ok_or_else(|| hub_error(model, format!("not in the cache {} and HF_HUB_OFFLINE is set", options.cache().path().display())));
    }
    let mut builder = ApiBuilder::from_cache(options.cache()).with_progress(options.progress);
    if let Some(endpoint) = &options.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    // A dropped connection resumes where it stopped (a ranged request
    // from the partial file's end), a few times, rather than failing a
    // download of gigabytes.
    builder = builder.with_token(options.token.clone()).with_retries(RETRIES);
    let api = builder.build().map_err(|e| hub_error(model, e.to_string()))?;
    match download(model, &api, options) {
        Ok(path) => Ok(path),
        // Unreachable (not refused): a snapshot fetched before still serves.
        Err(Failure::Unreachable(why)) => match cached(model, |f| cache.get(f)) {
            Some(path) => {
                tracing::warn!("the Hub is unreachable ({why}); using {model} from the cache at {}", path.display());
                Ok(path)
            }
            None => Err(hub_error(model, format!("the Hub is unreachable ({why}) and the model is not in the cache"))),
        },
        Err(Failure::Refused(why)) => Err(hub_error(model, why)),
    }
}

enum Failure {
    /// No answer: the network, DNS or TLS.
    Unreachable(String),
    /// An answer that says no, or a repo without what a model needs.
    Refused(String),
}

impl Failure {
    fn of(file: &str, e: ApiError) -> Failure {
        let ApiError::RequestError(e) = e else { return Failure::Refused(format!("{file}: {e}")) };
        match *e {
            ureq::Error::Status(401 | 403, _) => {
                Failure::Refused(format!("{file}: access denied; a gated or private repo needs a token (HF_TOKEN, or `huggingface-cli login`)"))
            }
            ureq::Error::Status(404, _) => Failure::Refused(format!("{file}: not found (check the repo name, the file and the revision)")),
            ureq::Error::Status(code, _) => Failure::Refused(format!("{file}: the Hub answered HTTP {code}")),
            ureq::Error::Transport(t) => Failure::Unreachable(t.to_string()),
        }
    }
}

/// The model's local path: its files at the commit the Hub's revision is
/// at now, in that commit's snapshot folder, which the revision's ref
/// then names.
fn download(model: &HubModel, api: &Api, options: &HubOptions) -> Result<PathBuf, Failure> {
    let info = api.repo(model.repo()).info().map_err(|e| Failure::of("the repo's file list", e))?;
    let commit = Repo::with_revision(model.repo.clone(), RepoType::Model, info.sha.clone());
    let at_commit =
        CommitFiles { api: api.repo(commit.clone()), repo_dir: options.cache().path().join(commit.folder_name()), commit: info.sha.clone(), options };
    let get = |file: &str| at_commit.get(file);
    let path = match &model.file {
        Some(file) => get(file)?,
        None => {
            let has = |name: &str| info.siblings.iter().any(|s| s.rfilename == name);
            for required in ["config.json", "tokenizer.json"] {
                if !has(required) {
                    return Err(Failure::Refused(no_folder(&info.siblings, required)));
                }
            }
            let config = get("config.json")?;
            get("tokenizer.json")?;
            if has("tokenizer_config.json") {
                get("tokenizer_config.json")?;
            }
            if has(SHARD_INDEX) {
                for shard in shards(&get(SHARD_INDEX)?).map_err(|e| Failure::Refused(e.to_string()))? {
                    get(&shard)?;
                }
            } else if has("model.safetensors") {
                get("model.safetensors")?;
            } else {
                return Err(Failure::Refused(no_folder(&info.siblings, "model.safetensors")));
            }
            snapshot_of(&config)
        }
    };
    // Only now, with every file in place, does the revision name the commit.
    if model.revision != info.sha {
        options.cache().repo(model.repo()).create_ref(&info.sha).map_err(|e| Failure::Refused(format!("writing the cache's ref: {e}")))?;
    }
    Ok(path)
}

/// A repo's files at one commit, in the cache.
struct CommitFiles<'a> {
    /// The Hub, at that commit.
    api: ApiRepo,
    /// `models--OWNER--NAME` in the cache.
    repo_dir: PathBuf,
    commit: String,
    options: &'a HubOptions,
}

impl CommitFiles<'_> {
    /// `file` in the commit's snapshot folder: there already; linked to
    /// the blob of an earlier commit with the same content; or downloaded.
    fn get(&self, file: &str) -> Result<PathBuf, Failure> {
        let path = self.repo_dir.join("snapshots").join(&self.commit).join(file);
        if path.exists() {
            return Ok(path);
        }
        let blob = self.repo_dir.join("blobs").join(self.etag(file)?);
        if !blob.is_file() {
            return self.api.download(file).map_err(|e| Failure::of(file, e));
        }
        let linked = || -> std::io::Result<()> {
            std::fs::create_dir_all(path.parent().expect("a snapshot file has a folder"))?;
            // Relative, as the Hub's tools link: `../../blobs/ETAG`, one
            // more `..` for each folder the file sits in.
            #[cfg(unix)]
            return std::os::unix::fs::symlink(
                Path::new(&"../".repeat(Path::new(file).components().count() + 1)).join("blobs").join(blob.file_name().expect("a blob has a name")),
                &path,
            );
            // Windows may refuse links without developer mode: a copy.
            #[cfg(not(unix))]
            return std::fs::copy(&blob, &path).map(|_| ());
        };
        linked().map_err(|e| Failure::Refused(format!("{file}: linking {} to its cached blob: {e}", path.display())))?;
        tracing::info!("{file}: unchanged at commit {}, linked to the cached blob", self.commit);
        Ok(path)
    }

    /// The ETag the Hub gives `file` at the commit: `X-Linked-Etag` (the
    /// content's SHA-256, on the redirect to the CDN for large files) or
    /// `ETag`, unquoted; the name its blob has in the cache.
    fn etag(&self, file: &str) -> Result<String, Failure> {
        let agent = ureq::AgentBuilder::new().redirects(0).build();
        let mut request = agent.get(&self.api.url(file)).set("Range", "bytes=0-0");
        if let Some(token) = &self.options.token {
            request = request.set("Authorization", &format!("Bearer {token}"));
        }
        let response = request.call().map_err(|e| Failure::of(file, ApiError::RequestError(Box::new(e))))?;
        let etag = response.header("x-linked-etag").or(response.header("etag")).ok_or_else(|| Failure::Refused(format!("{file}: the Hub gave no ETag")))?;
        Ok(etag.trim_start_matches("W/").trim_matches('"').to_string())
    }
}

/// What the cache holds of `model`, if all of it is there.
fn cached(model: &HubModel, get: impl Fn(&str) -> Option<PathBuf>) -> Option<PathBuf> {
    if let Some(file) = &model.file {
        return get(file);
    }
    let config = get("config.json")?;
    get("tokenizer.json")?;
    let weights_present = match get(SHARD_INDEX) {
        Some(index) => shards(&index).ok()?.iter().all(|s| get(s).is_some()),
        None => get("model.safetensors").is_some(),
    };
    weights_present.then(|| snapshot_of(&config))
}

/// The snapshot folder a file of it sits in.
fn snapshot_of(config: &Path) -> PathBuf {
    config.parent().expect("a cached file sits in its snapshot folder").to_path_buf()
}

/// Why a repo is not a loadable folder, naming its GGUF files if it has any.
fn no_folder(siblings: &[hf_hub::api::Siblings], missing: &str) -> String {
    let ggufs: Vec<&str> = siblings.iter().map(|s| s.rfilename.as_str()).filter(|f| f.ends_with(".gguf")).collect();
    match ggufs.as_slice() {
        [] => format!("the repo has no {missing}, so it is not a llama-family safetensors model"),
        some => format!("the repo has no {missing}; it holds GGUF files, so name one: hf:OWNER/NAME/FILE.gguf ({})", some.join(", ")),
    }
}

fn hub_error(model: &HubModel, why: String) -> ModelError {
    ModelError::Fetch(format!("{model}: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_references_parse_and_print_back() {
        for (spec, repo, file, revision) in [
            ("hf:HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", None, "main"),
            ("hf:owner/name@v1.0", "owner/name", None, "v1.0"),
            ("hf:owner/name/sub/model-Q4_K_M.gguf@0123abc", "owner/name", Some("sub/model-Q4_K_M.gguf"), "0123abc"),
        ] {
            let parsed = HubModel::parse(spec).unwrap().unwrap();
            assert_eq!(parsed, HubModel { repo: repo.into(), file: file.map(Into::into), revision: revision.into() });
            assert_eq!(parsed.to_string(), spec);
        }
        assert!(HubModel::parse("/models/x.gguf").is_none());
        for bad in ["hf:", "hf:name", "hf:/name", "hf:owner/", "hf:owner/name@", "hf:owner/../x.gguf", "hf:owner/name/weights.bin"] {
            let err = HubModel::parse(bad).unwrap().unwrap_err().to_string();
            assert!(err.starts_with(&format!("`{bad}`")) && err.contains("expected hf:OWNER/NAME"), "{bad}: {err}");
        }
    }
}
