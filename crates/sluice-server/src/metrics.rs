//! Prometheus metrics, rendered by hand in the text exposition format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sluice_engine::{Engine, WorkflowStats};

/// Upper bounds of the latency histogram's buckets, in microseconds (1 ms … 5 s).
const BUCKETS_US: [u64; 10] = [
    1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000, 5_000_000,
];

/// A metric with one series per workflow: name, type, help, and its value from the stats.
type Series = (
    &'static str,
    &'static str,
    &'static str,
    fn(&WorkflowStats) -> u64,
);

/// Server counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Event stream responses open now.
    pub stream_readers: AtomicU64,
    rejected_queue_full: AtomicU64,
    rejected_shutting_down: AtomicU64,
    rejected_unauthorized: AtomicU64,
    rejected_too_many_streams: AtomicU64,
    http_requests: [AtomicU64; 5],
    latency_buckets: [AtomicU64; BUCKETS_US.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy)]
pub enum Rejection {
    /// 429.
    QueueFull,
    /// 503 while draining.
    ShuttingDown,
    /// 401.
    Unauthorized,
    /// 503 over `max_streams` open streams.
    TooManyStreams,
}

impl Metrics {
    /// Counts a refusal.
    pub fn reject(&self, why: Rejection) {
        let c = match why {
            Rejection::QueueFull => &self.rejected_queue_full,
            Rejection::ShuttingDown => &self.rejected_shutting_down,
            Rejection::Unauthorized => &self.rejected_unauthorized,
            Rejection::TooManyStreams => &self.rejected_too_many_streams,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Records one HTTP response (time to headers).
    pub fn observe(&self, status: u16, took: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.http_requests[class].fetch_add(1, Ordering::Relaxed);
        // Bucketed by the exact duration (a bucket's bound is inclusive: `le`), not by whole
        // milliseconds: 1.9 ms belongs in le="0.002", not le="0.001".
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let sub_us = !took.subsec_nanos().is_multiple_of(1_000);
        for (i, b) in BUCKETS_US.iter().enumerate() {
            if us < *b || (us == *b && !sub_us) {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// The exposition text; `connections` is the number of open TCP connections. The run
    /// gauges come from the engine's counters (no store access).
    pub fn render(&self, engine: &Engine, connections: u64) -> String {
        let mut out = String::with_capacity(4096);
        let g = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let stats = engine.stats();
        // One series per workflow: (name, type, help, value of a workflow's stats).
        let per_workflow: [Series; 4] = [
            (
                "sluice_runs_running",
                "gauge",
                "Runs holding an execution slot.",
                |s| s.running as u64,
            ),
            (
                "sluice_runs_queued",
                "gauge",
                "Runs waiting for a slot.",
                |s| s.queued as u64,
            ),
            (
                "sluice_runs_waiting",
                "gauge",
                "Runs paused for input or client tools.",
                |s| s.waiting as u64,
            ),
            (
                "sluice_runs_started_total",
                "counter",
                "Runs created since the server started.",
                |s| s.started,
            ),
        ];
        for (name, kind, help, value) in per_workflow {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for s in &stats {
                let _ = writeln!(out, "{name}{{workflow=\"{}\"}} {}", s.name, value(s));
            }
        }
        let _ = writeln!(
            out,
            "# HELP sluice_runs_ended_total Runs ended since the server started, by final status.\n# TYPE sluice_runs_ended_total counter"
        );
        for s in &stats {
            for (status, n) in [
                ("completed", s.completed),
                ("failed", s.failed),
                ("cancelled", s.cancelled),
            ] {
                let _ = writeln!(
                    out,
                    "sluice_runs_ended_total{{workflow=\"{}\",status=\"{status}\"}} {n}",
                    s.name
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP sluice_events_appended_total Events appended to run logs.\n# TYPE sluice_events_appended_total counter"
        );
        let _ = writeln!(
            out,
            "sluice_events_appended_total {}",
            engine.events_appended()
        );
        let _ = writeln!(
            out,
            "# HELP sluice_stream_readers Open event stream responses.\n# TYPE sluice_stream_readers gauge"
        );
        let _ = writeln!(out, "sluice_stream_readers {}", g(&self.stream_readers));
        let _ = writeln!(
            out,
            "# HELP sluice_connections_open Open TCP connections.\n# TYPE sluice_connections_open gauge"
        );
        let _ = writeln!(out, "sluice_connections_open {connections}");
        let _ = writeln!(
            out,
            "# HELP sluice_rejections_total Refused requests by reason.\n# TYPE sluice_rejections_total counter"
        );
        for (reason, v) in [
            ("queue_full", &self.rejected_queue_full),
            ("shutting_down", &self.rejected_shutting_down),
            ("unauthorized", &self.rejected_unauthorized),
            ("too_many_streams", &self.rejected_too_many_streams),
        ] {
            let _ = writeln!(
                out,
                "sluice_rejections_total{{reason=\"{reason}\"}} {}",
                g(v)
            );
        }
        let _ = writeln!(
            out,
            "# HELP sluice_http_responses_total HTTP responses by status class.\n# TYPE sluice_http_responses_total counter"
        );
        for (i, v) in self.http_requests.iter().enumerate() {
            let _ = writeln!(
                out,
                "sluice_http_responses_total{{class=\"{}xx\"}} {}",
                i + 1,
                g(v)
            );
        }
        let _ = writeln!(
            out,
            "# HELP sluice_http_request_duration_seconds Time to response headers.\n# TYPE sluice_http_request_duration_seconds histogram"
        );
        for (i, b) in BUCKETS_US.iter().enumerate() {
            let _ = writeln!(
                out,
                "sluice_http_request_duration_seconds_bucket{{le=\"{}\"}} {}",
                *b as f64 / 1e6,
                g(&self.latency_buckets[i])
            );
        }
        let count = g(&self.latency_count);
        let _ = writeln!(
            out,
            "sluice_http_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "sluice_http_request_duration_seconds_sum {}",
            g(&self.latency_sum_us) as f64 / 1e6
        );
        let _ = writeln!(out, "sluice_http_request_duration_seconds_count {count}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buckets(m: &Metrics) -> Vec<u64> {
        m.latency_buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect()
    }

    #[test]
    fn latencies_are_bucketed_by_their_exact_duration() {
        let m = Metrics::default();
        m.observe(200, Duration::from_micros(1_900));
        assert_eq!(
            buckets(&m),
            [0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
            "1.9 ms is not <= 1 ms"
        );
        let m = Metrics::default();
        m.observe(200, Duration::from_millis(1));
        assert_eq!(buckets(&m)[0], 1, "bounds are inclusive");
        let m = Metrics::default();
        m.observe(200, Duration::from_nanos(1_000_001));
        assert_eq!(buckets(&m)[..2], [0, 1], "just over 1 ms");
        let m = Metrics::default();
        m.observe(200, Duration::from_secs(6));
        assert_eq!(buckets(&m), [0; 10], "only in +Inf");
        assert_eq!(m.latency_count.load(Ordering::Relaxed), 1);
        assert_eq!(m.latency_sum_us.load(Ordering::Relaxed), 6_000_000);
    }
}
