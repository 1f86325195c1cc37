//! A `tandem-server` child process on this machine, for the end-to-end
//! tests and the live bench: started from this build's binary, waited for
//! until it listens, killed when dropped.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A binary of this workspace's build: `$TANDEM_<NAME>_BIN`, else the one
/// beside the running executable, or beside its folder (test executables
/// live in `target/<profile>/deps/`).
pub fn sibling_binary(name: &str) -> std::io::Result<PathBuf> {
    let var = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Some(path) = std::env::var_os(&var) {
        return Ok(path.into());
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().expect("an executable lives in a folder");
    [dir.join(name), dir.parent().map(|d| d.join(name)).unwrap_or_default()].into_iter().find(|p| p.is_file()).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no `{name}` binary beside {}: run `cargo build --release -p {name}` first, or set {var}", exe.display()),
        )
    })
}

pub struct ServerProcess {
    pub child: Child,
    /// The address it listens on.
    pub addr: String,
}

impl ServerProcess {
    /// Starts the server with `args` (plus `--listen 127.0.0.1:0` unless
    /// given) and waits until it listens (model load and calibration
    /// included), up to a minute.
    pub fn try_start(args: &[&str]) -> std::io::Result<Self> {
        let mut cmd = Command::new(sibling_binary("tandem-server")?);
        if !args.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        let mut child = cmd.args(args).env("RUST_LOG", "warn").stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn()?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => Ok(ServerProcess { child, addr }),
            Err(_) => {
                let _ = child.kill();
                Err(std::io::Error::other("tandem-server did not start listening within 60 s"))
            }
        }
    }

    /// [`Self::try_start`] for tests: panics when the server cannot start.
    pub fn start(args: &[&str]) -> Self {
        Self::try_start(args).unwrap_or_else(|e| panic!("starting tandem-server {args:?}: {e}"))
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by number (15 = SIGTERM, 9 = SIGKILL).
    pub fn signal(&self, sig: i32) {
        let _ = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
