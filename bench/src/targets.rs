//! Starting and stopping the measured processes, and reading their CPU time
//! and memory from /proc.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A process under measurement, stopped (SIGTERM) when dropped.
pub struct Process {
    pub name: String,
    pub base: String,
    child: Child,
}

impl Process {
    /// Runs `exe args...` and waits for it to print where it listens:
    /// `listening on <addr>` on stdout, or wasmtime's `Serving HTTP on
    /// <url>` on stderr.
    pub async fn start(name: &str, exe: &Path, args: &[String]) -> Result<Process> {
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let mut stdout = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let mut stderr = BufReader::new(child.stderr.take().context("stderr")?).lines();
        let base = tokio::time::timeout(Duration::from_secs(120), async {
            loop {
                tokio::select! {
                    line = stdout.next_line() => match line? {
                        Some(line) => if let Some(addr) = line.strip_prefix("listening on ") {
                            return Ok(format!("http://{addr}"));
                        },
                        None => bail!("{name} exited before listening"),
                    },
                    line = stderr.next_line() => {
                        if let Some(line) = line?
                            && let Some(url) = line.strip_prefix("Serving HTTP on ")
                        {
                            return Ok(url.trim_end_matches('/').to_string());
                        }
                    }
                }
            }
        })
        .await
        .with_context(|| format!("{name} did not listen within 120 s"))??;
        // Drain both pipes so the process never blocks on a full one.
        tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
        tokio::spawn(async move { while let Ok(Some(_)) = stderr.next_line().await {} });
        Ok(Process {
            name: name.to_string(),
            base,
            child,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// User + system CPU time so far.
    pub fn cpu(&self) -> Duration {
        self.pid().map(cpu_time_of).unwrap_or_default()
    }

    /// Peak resident memory so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        self.pid()
            .map(|pid| status_kib(pid, "VmHWM:") * 1024)
            .unwrap_or(0)
    }

    pub fn rss(&self) -> u64 {
        self.pid().map(rss_of).unwrap_or(0)
    }

    /// File descriptors the process has open now.
    pub fn open_fds(&self) -> usize {
        self.pid()
            .and_then(|pid| std::fs::read_dir(format!("/proc/{pid}/fd")).ok())
            .map(|dir| dir.count())
            .unwrap_or(0)
    }

    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}

/// utime + stime from /proc/<pid>/stat, in clock ticks of 10 ms (USER_HZ is
/// 100 on every Linux this runs on).
pub fn cpu_time_of(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // The command name may hold spaces: fields count from after its ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// Resident memory (VmRSS) of `pid` now, in bytes.
pub fn rss_of(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:") * 1024
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Sockets in TIME_WAIT on this machine (IPv4 and IPv6).
pub fn time_wait_sockets() -> usize {
    tcp_sockets(|_remote, state| state == "06")
}

/// TCP sockets of this machine (`/proc/net/tcp` and `tcp6`) whose remote
/// address and state (hex, as the kernel writes them) pass `keep`.
fn tcp_sockets(keep: impl Fn(&str, &str) -> bool) -> usize {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|t| {
            t.lines()
                .skip(1)
                .filter(|l| {
                    let fields: Vec<&str> = l.split_whitespace().collect();
                    matches!((fields.get(2), fields.get(3)), (Some(r), Some(s)) if keep(r, s))
                })
                .count()
        })
        .sum()
}

/// Established TCP connections to `port` on this machine (the client
/// ends: the aggregator's pooled connections to an upstream).
pub fn established_to(port: u16) -> usize {
    let port = format!(":{port:04X}");
    tcp_sockets(|remote, state| remote.ends_with(&port) && state == "01")
}

/// `wasmtime` 48.0.8 on PATH, if any.
pub fn wasmtime() -> Option<PathBuf> {
    let out = std::process::Command::new("wasmtime")
        .arg("--version")
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .contains("48.0.8")
        .then(|| PathBuf::from("wasmtime"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_connection_is_counted_by_its_remote_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(established_to(port), 0);
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _server = listener.accept().unwrap();
        assert_eq!(established_to(port), 1);
    }
}
