//! What the scenarios read from /proc besides CPU time ([`crate::report::cpu_secs`]):
//! a process's resident memory, the whole machine's busy CPU (so CPU taken by other
//! processes during a run shows), CPU between two [`CpuMark`]s, and a background
//! sampler of the hub during a connect storm, which follows a restarted hub through
//! a pid file.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::report::{Cpu, HubUsage, cpu_secs, own_cpu_secs};

/// `VmRSS` of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU seconds every core has spent busy since boot (`/proc/stat`: all but idle and
/// iowait, at 100 ticks/s).
pub fn machine_busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_machine_busy(stat.lines().next()?)
}

fn parse_machine_busy(line: &str) -> Option<f64> {
    let ticks: Vec<u64> = line
        .strip_prefix("cpu ")?
        .split_whitespace()
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some((ticks.iter().sum::<u64>() - idle) as f64 / 100.0)
}

/// Which process is the hub: a fixed pid, or a file the bench script rewrites when it
/// restarts the hub.
#[derive(Debug, Clone)]
pub enum HubProcess {
    /// `--hub-pid`.
    Pid(u32),
    /// `--hub-pid-file`.
    File(PathBuf),
}

impl HubProcess {
    /// From `--hub-pid-file` and `--hub-pid`; `None` when neither was given.
    pub fn from_flags(pid_file: Option<&Path>, pid: Option<u32>) -> Option<Self> {
        match (pid_file, pid) {
            (Some(path), _) => Some(Self::File(path.to_path_buf())),
            (None, Some(pid)) => Some(Self::Pid(pid)),
            (None, None) => None,
        }
    }

    /// The hub's pid now.
    pub fn pid(&self) -> Option<u32> {
        match self {
            Self::Pid(pid) => Some(*pid),
            Self::File(path) => std::fs::read_to_string(path).ok()?.trim().parse().ok(),
        }
    }

    /// (RSS KiB, CPU seconds) now.
    pub fn sample(&self) -> Option<(u64, f64)> {
        let pid = self.pid()?;
        Some((rss_kib(pid)?, cpu_secs(pid)?))
    }
}

/// Samples the hub in the background until [`Sampler::finish`].
pub struct Sampler {
    state: Arc<Mutex<SamplerState>>,
    task: tokio::task::JoinHandle<()>,
}

/// How often the sampler reads /proc.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

struct SamplerState {
    hub: HubProcess,
    usage: HubUsage,
    /// (pid, CPU seconds, when) of the previous sample: a new pid (restart) starts
    /// its CPU count afresh rather than subtracting another process's.
    last: Option<(u32, f64, std::time::Instant)>,
}

impl SamplerState {
    fn sample(&mut self) {
        let Some(pid) = self.hub.pid() else { return };
        let (Some(rss), Some(cpu)) = (rss_kib(pid), cpu_secs(pid)) else {
            return;
        };
        let now = std::time::Instant::now();
        let usage = &mut self.usage;
        if usage.samples == 0 {
            usage.rss_start_kib = rss;
        }
        usage.samples += 1;
        usage.rss_peak_kib = usage.rss_peak_kib.max(rss);
        usage.rss_end_kib = rss;
        let (used, over) = match self.last {
            Some((last_pid, last_cpu, at)) if last_pid == pid => (cpu - last_cpu, now - at),
            Some((_, _, at)) => (cpu, now - at),
            None => (0.0, SAMPLE_EVERY),
        };
        usage.cpu_secs += used;
        // Intervals much shorter than the 10 ms tick say nothing about cores.
        if over >= SAMPLE_EVERY / 2 {
            usage.cpu_peak_cores = usage.cpu_peak_cores.max(used / over.as_secs_f64());
        }
        self.last = Some((pid, cpu, now));
    }
}

impl Sampler {
    /// Starts sampling `hub` (the first sample at once).
    pub fn start(hub: HubProcess) -> Self {
        let state = Arc::new(Mutex::new(SamplerState {
            hub,
            usage: HubUsage::default(),
            last: None,
        }));
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tick.tick().await;
                match shared.lock() {
                    Ok(mut state) => state.sample(),
                    Err(_) => return,
                }
            }
        });
        Self { state, task }
    }

    /// Takes a last sample and stops; what it saw.
    pub fn finish(self) -> HubUsage {
        self.task.abort();
        match self.state.lock() {
            Ok(mut state) => {
                state.sample();
                state.usage.clone()
            }
            Err(_) => HubUsage::default(),
        }
    }
}

/// CPU of the simulator, the hub and the machine between two [`CpuMark`]s.
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    sim: Option<f64>,
    hub: Option<f64>,
    machine: Option<f64>,
    at: std::time::Instant,
}

impl CpuMark {
    /// Now, with the hub's pid if known.
    pub fn now(hub_pid: Option<u32>) -> Self {
        Self {
            sim: own_cpu_secs(),
            hub: hub_pid.and_then(cpu_secs),
            machine: machine_busy_secs(),
            at: std::time::Instant::now(),
        }
    }

    /// CPU used since `self`.
    pub fn since(&self, hub_pid: Option<u32>) -> Option<Cpu> {
        let end = Self::now(hub_pid);
        let secs = end.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let sim_secs = end.sim? - self.sim?;
        let hub_secs = match (self.hub, end.hub) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        let machine_secs = match (self.machine, end.machine) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        Some(Cpu {
            sim_secs,
            sim_cores: sim_secs / secs,
            hub_secs,
            hub_cores: hub_secs.map(|s| s / secs),
            machine_secs,
            other_secs: machine_secs.map(|m| (m - sim_secs - hub_secs.unwrap_or(0.0)).max(0.0)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_busy_time_leaves_out_idle_and_iowait() {
        assert_eq!(
            parse_machine_busy("cpu  100 0 50 1000 20 0 10 0 0 0"),
            Some(1.6)
        );
        assert_eq!(parse_machine_busy("intr 1 2 3"), None);
        assert!(machine_busy_secs().is_some());
        assert!(rss_kib(std::process::id()).is_some_and(|kib| kib > 0));
    }

    #[tokio::test]
    async fn the_sampler_sees_this_process() {
        let sampler = Sampler::start(HubProcess::Pid(std::process::id()));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while sampler.state.lock().unwrap().usage.samples < 1
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // finish() adds a last sample.
        let usage = sampler.finish();
        assert!(usage.samples >= 2, "{usage:?}");
        assert!(usage.rss_peak_kib >= usage.rss_start_kib && usage.rss_start_kib > 0);
    }
}
