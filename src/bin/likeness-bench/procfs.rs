//! What the kernel says about a process: CPU time (/proc/PID/stat) and memory
//! (/proc/PID/status). Linux only, like the daemon's deployment.

/// Clock ticks per second of utime and stime in /proc/PID/stat. sysconf(_SC_CLK_TCK) is
/// 100 on every Linux architecture the daemon ships for (USER_HZ is fixed at 100 in the
/// kernel ABI); hard-coded so the bench needs no libc binding.
const CLK_TCK: f64 = 100.0;

/// User + system CPU seconds used so far by every thread of `pid` ("self" for this
/// process); 10 ms resolution.
pub fn cpu_secs(pid: &str) -> Result<f64, String> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count fields
    // after its closing parenthesis. utime and stime are fields 14 and 15, that is the
    // 12th and 13th after it.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| format!("{path}: no command field"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64, String> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("{path}: field {} unreadable", i + 3))
    };
    Ok((ticks(11)? + ticks(12)?) as f64 / CLK_TCK)
}

/// A field of /proc/PID/status in KiB (VmRSS, RssAnon, VmHWM, ...).
pub fn status_kib(pid: u32, field: &str) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)
                .and_then(|r| r.strip_prefix(':'))
                .and_then(|r| r.split_whitespace().next())
                .and_then(|kb| kb.parse().ok())
        })
        .ok_or_else(|| format!("{path}: no {field}"))
}

/// CPU seconds spent by the daemon and by this process (the clients) over a span.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    pub daemon: f64,
    pub client: f64,
}

impl Cpu {
    /// Microseconds of daemon and client CPU per unit of work (query, vector, image).
    pub fn per(self, units: usize) -> (f64, f64) {
        let n = units.max(1) as f64;
        (self.daemon * 1e6 / n, self.client * 1e6 / n)
    }
}

/// Starts measuring CPU of `daemon` (a pid; None: only this process).
pub struct Meter {
    pid: Option<String>,
    daemon: f64,
    client: f64,
}

impl Meter {
    pub fn start(pid: Option<u32>) -> Meter {
        let pid = pid.map(|p| p.to_string());
        Meter {
            daemon: pid.as_deref().map_or(0.0, |p| cpu_secs(p).unwrap_or(0.0)),
            client: cpu_secs("self").unwrap_or(0.0),
            pid,
        }
    }

    pub fn stop(&self) -> Cpu {
        Cpu {
            daemon: self
                .pid
                .as_deref()
                .map_or(0.0, |p| cpu_secs(p).unwrap_or(self.daemon) - self.daemon),
            client: cpu_secs("self").unwrap_or(self.client) - self.client,
        }
    }
}

/// The machine, as BENCHMARKS.md asks: cores, CPU model, memory.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or("?".into(), |kb| {
            format!("{:.1} GiB", kb as f64 / (1u64 << 20) as f64)
        });
    // A shared machine: what else ran when the bench started says how far to trust
    // its absolute figures.
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    format!(
        "machine: {} cores (nproc), {cpu}, {mem} RAM; load average {load} at the start",
        cores()
    )
}

pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
