//! System metrics: CPU, memory, swap, disk per mount, load, network counters (sysinfo).

use std::sync::Arc;
use std::time::Duration;

use fleetbus_protocol::Metric;
use sysinfo::{Disks, Networks, System};
use tokio::sync::watch;

use super::{initial_spread, jittered};
use crate::outbox::Outbox;

/// Stream the system metrics collector writes to.
pub const METRICS_STREAM: &str = "metrics";

/// Keeps the sysinfo handles between samples (CPU usage needs two samples).
pub struct SystemSampler {
    system: Option<System>,
    disks: Option<Disks>,
    networks: Option<Networks>,
}

impl Default for SystemSampler {
    fn default() -> Self {
        let mut system = System::new().ok();
        if let Some(s) = system.as_mut() {
            s.refresh_cpu_usage();
        }
        SystemSampler {
            system,
            disks: Disks::new_with_refreshed_list().ok(),
            networks: Networks::new_with_refreshed_list().ok(),
        }
    }
}

/// Takes one sample of every system metric. Parts the platform cannot report are left out.
pub fn collect_system_metrics(sampler: &mut SystemSampler) -> Vec<Metric> {
    let mut out = Vec::new();
    if let Some(sys) = sampler.system.as_mut() {
        sys.refresh_cpu_usage();
        sys.refresh_memory();
        let mut cpu = Metric::new("cpu.usage", sys.global_cpu_usage() as f64, Some("%"));
        cpu.min = Some(0.0);
        cpu.max = Some(100.0);
        out.push(cpu);
        let total = sys.total_memory() as f64;
        let used = sys.used_memory() as f64;
        out.push(bounded("mem.used", used, "B", total));
        out.push(Metric::new("mem.total", total, Some("B")));
        if total > 0.0 {
            out.push(bounded(
                "mem.used_percent",
                used * 100.0 / total,
                "%",
                100.0,
            ));
        }
        let swap_total = sys.total_swap() as f64;
        out.push(bounded(
            "swap.used",
            sys.used_swap() as f64,
            "B",
            swap_total,
        ));
        out.push(Metric::new("swap.total", swap_total, Some("B")));
    }
    if let Ok(load) = System::load_average() {
        out.push(Metric::new("load.1", load.one, None));
        out.push(Metric::new("load.5", load.five, None));
        out.push(Metric::new("load.15", load.fifteen, None));
    }
    if let Some(disks) = sampler.disks.as_mut() {
        disks.refresh(true);
        for disk in disks.iter() {
            let mount = disk.mount_point().to_string_lossy().to_string();
            let fs = disk.file_system().to_string_lossy().to_string();
            let total = disk.total_space() as f64;
            let used = total - disk.available_space() as f64;
            out.push(
                bounded("disk.used", used, "B", total)
                    .label("mount", &mount)
                    .label("fs", &fs),
            );
            out.push(
                Metric::new("disk.total", total, Some("B"))
                    .label("mount", &mount)
                    .label("fs", &fs),
            );
            if total > 0.0 {
                out.push(
                    bounded("disk.used_percent", used * 100.0 / total, "%", 100.0)
                        .label("mount", &mount)
                        .label("fs", &fs),
                );
            }
        }
    }
    if let Some(networks) = sampler.networks.as_mut() {
        networks.refresh(true);
        for (name, data) in networks.iter() {
            let iface = name.to_string_lossy().to_string();
            out.push(
                Metric::new("net.rx_bytes", data.total_received() as f64, Some("c"))
                    .label("iface", &iface),
            );
            out.push(
                Metric::new("net.tx_bytes", data.total_transmitted() as f64, Some("c"))
                    .label("iface", &iface),
            );
        }
    }
    out
}

fn bounded(name: &str, value: f64, unit: &str, max: f64) -> Metric {
    let mut m = Metric::new(name, value, Some(unit));
    m.min = Some(0.0);
    m.max = Some(max);
    m
}

/// Pushes one `metrics` record every `interval` (±10% jitter) until `shutdown` turns true.
pub async fn run_system_metrics(
    outbox: Arc<Outbox>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut sampler = Some(SystemSampler::default());
    let mut delay = initial_spread(interval).max(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = crate::stopped(&mut shutdown) => return,
        }
        delay = jittered(interval, 0.1);
        // sysinfo reads /proc synchronously: keep it off the async worker threads
        let Some(mut s) = sampler.take() else { return };
        let (s, metrics) = match tokio::task::spawn_blocking(move || {
            let metrics = collect_system_metrics(&mut s);
            (s, metrics)
        })
        .await
        {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "system metrics collection failed; restarting the sampler");
                (SystemSampler::default(), Vec::new())
            }
        };
        sampler = Some(s);
        if metrics.is_empty() {
            continue;
        }
        if let Err(e) = outbox.push(METRICS_STREAM, |r| r.metrics = metrics) {
            tracing::error!(error = %e, "metrics record not stored");
        }
    }
}
