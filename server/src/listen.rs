//! Accepting connections. A connection is handed to the gRPC server only
//! once its client has sent its first 24 bytes (the HTTP/2 preface, or the
//! start of a TLS ClientHello) within [`FIRST_BYTES_TIMEOUT`]: a client that
//! connects and stalls mid-handshake would otherwise hold a socket and a
//! task for ever (after the handshake, HTTP/2 keepalive pings find stalled
//! peers).
//!
//! When `stop` turns true (draining) the listening socket is closed — new
//! connections are refused, so a proxy sends new sessions to another
//! replica — while the connections already open carry on, health checks
//! on them included (the stream of connections stays open; ending it would
//! make the gRPC server send GOAWAY everywhere).

use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::debug;

pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);
const PREFACE_LEN: usize = 24;

/// Accepted connections that have started talking.
pub fn incoming(listener: TcpListener, mut stop: watch::Receiver<bool>) -> ReceiverStream<std::io::Result<TcpStream>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|&s| s) => break,
            };
            let conn = match accepted {
                // Verdicts are small and latency is the product: no Nagle.
                Ok((conn, _)) => {
                    let _ = conn.set_nodelay(true);
                    conn
                }
                Err(e) => {
                    // Out of descriptors and the like: pause, do not spin.
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(FIRST_BYTES_TIMEOUT, started(&conn)).await {
                    Ok(true) => drop(tx.send(Ok(conn)).await),
                    _ => debug!("connection dropped: no handshake within {FIRST_BYTES_TIMEOUT:?}"),
                }
            });
        }
        drop(listener);
        // Keep the stream of connections open until the server stops.
        tx.closed().await;
    });
    ReceiverStream::new(rx)
}

/// Waits until the first bytes are buffered (without consuming them);
/// false if the peer closed first.
async fn started(conn: &TcpStream) -> bool {
    let mut buf = [0u8; PREFACE_LEN];
    loop {
        match conn.peek(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) if n >= PREFACE_LEN => return true,
            // Part of it: more is coming, or the timeout ends the wait.
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}
