//! The markdown table every scenario contributes rows to.

/// What a row's verdict means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Correctness (lost, duplicated, complete): a failure makes the tool exit non-zero.
    Check,
    /// A performance target: reported, never fatal.
    Target,
    /// A number without a target.
    Info,
}

/// One line of the results table.
#[derive(Debug, Clone)]
pub struct Row {
    /// Scenario label, e.g. `S2 C=1000, 50 ev/s`.
    pub scenario: String,
    /// What is measured.
    pub metric: String,
    /// The measurement.
    pub value: String,
    /// The target, if any.
    pub target: String,
    /// Whether the target is met (`None`: no target).
    pub ok: Option<bool>,
    /// Check, target or information.
    pub kind: Kind,
}

impl Row {
    /// A row without a target.
    pub fn info(scenario: &str, metric: &str, value: impl Into<String>) -> Self {
        Self {
            scenario: scenario.into(),
            metric: metric.into(),
            value: value.into(),
            target: String::new(),
            ok: None,
            kind: Kind::Info,
        }
    }

    /// A correctness row.
    pub fn check(
        scenario: &str,
        metric: &str,
        value: impl Into<String>,
        target: &str,
        ok: bool,
    ) -> Self {
        Self {
            target: target.into(),
            ok: Some(ok),
            kind: Kind::Check,
            ..Self::info(scenario, metric, value)
        }
    }

    /// A performance-target row.
    pub fn target(
        scenario: &str,
        metric: &str,
        value: impl Into<String>,
        target: &str,
        ok: bool,
    ) -> Self {
        Self {
            target: target.into(),
            ok: Some(ok),
            kind: Kind::Target,
            ..Self::info(scenario, metric, value)
        }
    }

    /// A scenario that could not run.
    pub fn error(scenario: &str, e: &anyhow::Error) -> Self {
        let msg = format!("{e:#}").replace('|', "\\|").replace('\n', " ");
        Self::check(scenario, "error", msg, "runs", false)
    }
}

/// Whether any correctness row failed.
pub fn failed(rows: &[Row]) -> bool {
    rows.iter()
        .any(|r| r.kind == Kind::Check && r.ok == Some(false))
}

/// Prints the rows as a markdown table.
pub fn print_table(rows: &[Row]) {
    println!("| Scenario | Metric | Measured | Target | |");
    println!("|---|---|---|---|---|");
    let mut last = "";
    for r in rows {
        let scenario = if r.scenario == last {
            ""
        } else {
            r.scenario.as_str()
        };
        last = &r.scenario;
        let verdict = match r.ok {
            Some(true) => "pass",
            Some(false) if r.kind == Kind::Target => "miss",
            Some(false) => "FAIL",
            None => "",
        };
        println!(
            "| {scenario} | {} | {} | {} | {verdict} |",
            r.metric, r.value, r.target
        );
    }
}
