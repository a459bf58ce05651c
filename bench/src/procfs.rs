//! Server resource use from `/proc`: RSS (sampled, and the kernel's high-water mark) and CPU time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, anyhow};

/// Linux reports `utime`/`stime` in clock ticks of `USER_HZ`, which is 100 on every Linux ABI.
const USER_HZ: f64 = 100.0;

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// `VmRSS`, KiB.
    pub rss_kib: u64,
    /// `VmHWM` (peak RSS since the process started), KiB.
    pub hwm_kib: u64,
    /// `utime + stime`, seconds.
    pub cpu_s: f64,
}

/// Reads `/proc/PID/status` and `/proc/PID/stat` (`pid` "self" for this process).
pub fn sample(pid: &str) -> anyhow::Result<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(Sample {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
        cpu_s: cpu_seconds(pid)?,
    })
}

fn cpu_seconds(pid: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("/proc/{pid}/stat: unexpected format"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3; utime and stime are fields 14 and 15.
    let ticks = |i: usize| -> anyhow::Result<f64> {
        f.get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .map(|v| v as f64)
            .ok_or_else(|| anyhow!("/proc/{pid}/stat: no field {}", i + 3))
    };
    Ok((ticks(11)? + ticks(12)?) / USER_HZ)
}

/// The soft limit on open files of this process, from `/proc/self/limits`.
pub fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Warns when `wanted` sockets would not fit under the open-files limit.
pub fn check_fd_budget(wanted: u64) {
    if let Some(limit) = open_files_limit()
        && wanted + 64 > limit
    {
        eprintln!(
            "warning: {wanted} connections need more than the open-files limit {limit}: \
             run `ulimit -n {}` (and the same for the server) first",
            wanted + 1024
        );
    }
}

/// Resource use of a process over one scenario.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// RSS when the scenario started, KiB.
    pub rss_before_kib: u64,
    /// Highest RSS sampled during it (every 50 ms), KiB.
    pub rss_peak_kib: u64,
    /// `VmHWM` at its end (peak since the process started), KiB.
    pub hwm_kib: u64,
    /// CPU seconds spent during it.
    pub cpu_s: f64,
}

/// Samples a process while a scenario runs.
pub struct Watch {
    pid: String,
    start: Sample,
    peak: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watch {
    /// Starts sampling `pid` every 50 ms.
    pub fn start(pid: &str) -> anyhow::Result<Self> {
        let start = sample(pid)?;
        let peak = Arc::new(AtomicU64::new(start.rss_kib));
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let p = peak.clone();
        let id = pid.to_owned();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tokio::select! {
                    _ = &mut rx => break,
                    _ = tick.tick() => {
                        match sample(&id) {
                            Ok(s) => { p.fetch_max(s.rss_kib, Ordering::Relaxed); }
                            Err(_) => break,
                        }
                    }
                }
            }
        });
        Ok(Self {
            pid: pid.to_owned(),
            start,
            peak,
            stop: Some(tx),
            task,
        })
    }

    /// Stops sampling and reports.
    pub async fn finish(mut self) -> anyhow::Result<Usage> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
        let end = sample(&self.pid)?;
        Ok(Usage {
            rss_before_kib: self.start.rss_kib,
            rss_peak_kib: self.peak.load(Ordering::Relaxed).max(end.rss_kib),
            hwm_kib: end.hwm_kib,
            cpu_s: end.cpu_s - self.start.cpu_s,
        })
    }
}

/// Starts a watch on `pid` when given; reports (and ignores) failures to read it.
pub fn maybe_watch(pid: Option<&str>) -> Option<Watch> {
    let pid = pid?;
    match Watch::start(pid) {
        Ok(w) => Some(w),
        Err(e) => {
            eprintln!("warning: cannot sample server process {pid}: {e:#}");
            None
        }
    }
}

/// Finishes an optional watch.
pub async fn maybe_finish(w: Option<Watch>) -> Option<Usage> {
    match w?.finish().await {
        Ok(u) => Some(u),
        Err(e) => {
            eprintln!("warning: cannot sample the server process: {e:#}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_itself() {
        let s = super::sample("self").unwrap();
        assert!(s.rss_kib > 0 && s.hwm_kib >= s.rss_kib);
        assert!(super::open_files_limit().is_some());
    }
}
