//! A real TCP load balancer for the cluster tests: HAProxy (Debian package `haproxy`)
//! in TCP mode on a free loopback port, round-robin over hub nodes' ports, with health
//! checks so a killed node is taken out and new connections go to the others.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// Where Debian installs the binary (not on every user's PATH).
const CANDIDATES: [&str; 2] = ["/usr/sbin/haproxy", "/usr/bin/haproxy"];

/// The haproxy binary, or an error saying how to install it.
pub fn haproxy_binary() -> Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("haproxy"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(CANDIDATES.iter().map(PathBuf::from))
        .find(|candidate| candidate.is_file())
        .context("haproxy is not installed: apt-get install haproxy")
}

/// The configuration: one TCP frontend on `listen`, round-robin over `servers`,
/// checked every 500 ms; a connection that fails to reach a server is sent to another.
pub fn config(listen: SocketAddr, servers: &[SocketAddr]) -> String {
    let mut text = format!(
        "global\n  maxconn 4096\n\
         defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 5m\n  timeout server 5m\n  retries 3\n  option redispatch\n\
         frontend hubs\n  bind {listen}\n  default_backend hubs\n\
         backend hubs\n  balance roundrobin\n  default-server inter 500ms fall 2 rise 2\n"
    );
    for (i, server) in servers.iter().enumerate() {
        text.push_str(&format!("  server hub{i} {server} check\n"));
    }
    text
}

/// A running HAProxy.
#[derive(Debug)]
pub struct HaProxy {
    child: Child,
    addr: SocketAddr,
    config: PathBuf,
}

impl HaProxy {
    /// Starts HAProxy in front of `servers` with its configuration in `dir`; waits
    /// (bounded) until it accepts connections.
    pub async fn start(dir: &Path, servers: &[SocketAddr]) -> Result<Self> {
        let binary = haproxy_binary()?;
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("cannot find a free loopback port")?;
        let config_path = dir.join("haproxy.cfg");
        std::fs::write(&config_path, config(addr, servers))?;
        let mut child = Command::new(&binary)
            // -db: stay in the foreground, so the test owns the process.
            .args(["-db", "-f"])
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                let mut log = String::new();
                if let Some(mut stderr) = child.stderr.take() {
                    use tokio::io::AsyncReadExt;
                    let _ = stderr.read_to_string(&mut log).await;
                }
                bail!("haproxy exited ({status}):\n{log}");
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                bail!("haproxy does not listen on {addr} after 10 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            child,
            addr,
            config: config_path,
        })
    }

    /// The frontend's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The configuration file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Stops HAProxy.
    pub async fn stop(mut self) -> Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_lists_every_server_with_checks() {
        let listen: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let servers: Vec<SocketAddr> = vec![
            "127.0.0.1:1883".parse().unwrap(),
            "127.0.0.1:1884".parse().unwrap(),
        ];
        let text = config(listen, &servers);
        assert!(text.contains("mode tcp"));
        assert!(text.contains("bind 127.0.0.1:9000"));
        assert!(text.contains("server hub0 127.0.0.1:1883 check"));
        assert!(text.contains("server hub1 127.0.0.1:1884 check"));
    }
}
