//! The built-ins that read the machine (sysinfo): disk, load, memory, swap, processes.

use std::ffi::OsStr;

use fleetbus_protocol::check::CheckState;
use sysinfo::{Disks, ProcessRefreshKind, ProcessesToUpdate, System};

use super::{datum, Builtin, DiskCheck, LoadCheck, Measured};

/// A system built-in's settings, owned (to move onto a blocking thread).
pub(super) enum Owned {
    Disk(DiskCheck),
    Load(LoadCheck),
    Memory,
    Swap,
    Process(String),
}

/// At most this many mounts are named in a disk check's text (all are in its data).
const MOUNTS_NAMED: usize = 5;

impl Owned {
    pub(super) fn of(builtin: Builtin<'_>) -> Owned {
        match builtin {
            Builtin::Disk(c) => Owned::Disk(c.clone()),
            Builtin::Load(c) => Owned::Load(c.clone()),
            Builtin::Memory => Owned::Memory,
            Builtin::Swap => Owned::Swap,
            Builtin::Process(c) => Owned::Process(c.name.clone()),
            // the network built-ins never come here
            Builtin::Tcp(_) | Builtin::Http(_) => Owned::Memory,
        }
    }

    pub(super) fn measure(self) -> Measured {
        match self {
            Owned::Disk(c) => disk(&c),
            Owned::Load(c) => load(&c),
            Owned::Memory => usage("memory", |s| (s.used_memory(), s.total_memory())),
            Owned::Swap => usage("swap", |s| (s.used_swap(), s.total_swap())),
            Owned::Process(name) => processes(&name),
        }
    }
}

fn unknown(text: String) -> Measured {
    Measured {
        fixed: Some(CheckState::Unknown),
        text,
        values: Vec::new(),
    }
}

fn disk(c: &DiskCheck) -> Measured {
    let disks = match Disks::new_with_refreshed_list() {
        Ok(d) => d,
        Err(e) => return unknown(format!("cannot list the mounted file systems: {e}")),
    };
    let mut values = Vec::new();
    let mut named = Vec::new();
    let mut missing = Vec::new();
    let wanted = |mount: &str| c.mounts.is_empty() || c.mounts.iter().any(|m| m == mount);
    for d in disks.iter() {
        let mount = d.mount_point().to_string_lossy().to_string();
        let total = d.total_space() as f64;
        if !wanted(&mount) || total <= 0.0 {
            continue;
        }
        let used = (total - d.available_space() as f64) * 100.0 / total;
        let used = (used * 100.0).round() / 100.0;
        if named.len() < MOUNTS_NAMED {
            named.push(format!(
                "{mount} {used:.1}% used ({} free)",
                human_bytes(d.available_space())
            ));
        }
        values.push((datum(&mount, used, "%", Some(0.0), Some(100.0)), true));
    }
    for m in &c.mounts {
        if !values.iter().any(|(d, _)| &d.label == m) {
            missing.push(m.as_str());
        }
    }
    let mut text = named.join(", ");
    if values.len() > named.len() {
        text.push_str(&format!(" and {} more", values.len() - named.len()));
    }
    let fixed = if !missing.is_empty() {
        text = format!("not mounted: {}; {text}", missing.join(", "));
        Some(CheckState::Unknown)
    } else if values.is_empty() {
        text = "no mounted file system with a size".into();
        Some(CheckState::Unknown)
    } else {
        None
    };
    Measured {
        fixed,
        text,
        values,
    }
}

fn load(c: &LoadCheck) -> Measured {
    let avg = match System::load_average() {
        Ok(a) => a,
        Err(e) => return unknown(format!("cannot read the load average: {e}")),
    };
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as f64)
        .unwrap_or(1.0);
    let scale = if c.per_cpu { cpus } else { 1.0 };
    let [one, five, fifteen] =
        [avg.one, avg.five, avg.fifteen].map(|v| ((v / scale) * 100.0).round() / 100.0);
    let per = if c.per_cpu { " per CPU" } else { "" };
    Measured {
        fixed: None,
        text: format!("load average{per}: {one}, {five}, {fifteen}"),
        values: vec![
            (datum("load1", one, "", Some(0.0), None), true),
            (datum("load5", five, "", Some(0.0), None), true),
            (datum("load15", fifteen, "", Some(0.0), None), true),
        ],
    }
}

fn usage(what: &str, read: impl Fn(&System) -> (u64, u64)) -> Measured {
    let mut system = match System::new() {
        Ok(s) => s,
        Err(e) => return unknown(format!("cannot read the {what}: {e}")),
    };
    system.refresh_memory();
    let (used, total) = read(&system);
    if total == 0 {
        return Measured {
            fixed: None,
            text: format!("no {what}"),
            values: Vec::new(),
        };
    }
    let percent = ((used as f64 * 100.0 / total as f64) * 100.0).round() / 100.0;
    Measured {
        fixed: None,
        text: format!(
            "{percent:.1}% {what} used ({} of {})",
            human_bytes(used),
            human_bytes(total)
        ),
        values: vec![
            (datum("used", percent, "%", Some(0.0), Some(100.0)), true),
            (
                datum(
                    "used_bytes",
                    used as f64,
                    "B",
                    Some(0.0),
                    Some(total as f64),
                ),
                false,
            ),
        ],
    }
}

fn processes(name: &str) -> Measured {
    let mut system = match System::new() {
        Ok(s) => s,
        Err(e) => return unknown(format!("cannot list the processes: {e}")),
    };
    system.refresh_processes_specifics(ProcessesToUpdate::All, true, ProcessRefreshKind::nothing());
    let count = system.processes_by_exact_name(OsStr::new(name)).count();
    let plural = if count == 1 { "process" } else { "processes" };
    Measured {
        fixed: None,
        text: format!("{count} {plural} named {name}"),
        values: vec![(datum("procs", count as f64, "", Some(0.0), None), true)],
    }
}

/// `12.3 GB`, `512 MB`, `900 B` (powers of 1024, as `df -h`).
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
