//! [`RunHandle`] (a started run) and [`RunFilter`] (which runs to list).

use futures_util::StreamExt;
use reqwest::Url;
use serde_json::Value;
use sluice_protocol::{RunRecord, RunStatus, kind};

use crate::client::Client;
use crate::error::Result;
use crate::stream::EventStream;

/// A run started by [`Client::start`]: its record at start, and the calls that act on it.
#[derive(Debug, Clone)]
pub struct RunHandle {
    client: Client,
    record: RunRecord,
}

impl RunHandle {
    pub(crate) fn new(client: Client, record: RunRecord) -> Self {
        Self { client, record }
    }

    /// The run's id.
    pub fn id(&self) -> &str {
        &self.record.id
    }

    /// The record the server answered when the run was accepted.
    pub fn record(&self) -> &RunRecord {
        &self.record
    }

    /// The record as it is now (`GET /v1/runs/{id}`).
    ///
    /// ```no_run
    /// # async fn demo(run: sluice_client::RunHandle) -> sluice_client::Result<()> {
    /// println!("{}", run.refresh().await?.status.as_str());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Client::run`].
    pub async fn refresh(&self) -> Result<RunRecord> {
        self.client.run(self.id()).await
    }

    /// All the run's events, from the first; see [`Client::events`].
    ///
    /// ```no_run
    /// # async fn demo(run: sluice_client::RunHandle) -> sluice_client::Result<()> {
    /// use futures_util::StreamExt;
    /// let mut events = run.events();
    /// while let Some(e) = events.next().await {
    ///     println!("{}", e?.event_type);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn events(&self) -> EventStream {
        self.client.events(self.id(), 0)
    }

    /// Sends an event into the run; see [`Client::send`].
    ///
    /// ```no_run
    /// # async fn demo(run: sluice_client::RunHandle) -> sluice_client::Result<()> {
    /// run.send("input", serde_json::json!("yes")).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Client::send`].
    pub async fn send(&self, event_type: &str, data: Value) -> Result<()> {
        self.client.send(self.id(), event_type, data).await
    }

    /// Cancels the run; see [`Client::cancel`].
    ///
    /// ```no_run
    /// # async fn demo(run: sluice_client::RunHandle) -> sluice_client::Result<()> {
    /// run.cancel().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Client::cancel`].
    pub async fn cancel(&self) -> Result<RunRecord> {
        self.client.cancel(self.id()).await
    }

    /// Waits until the run has ended and answers its final record. It follows only the
    /// terminal event (server-side filter), resuming like any event stream.
    ///
    /// ```no_run
    /// # async fn demo(run: sluice_client::RunHandle) -> sluice_client::Result<()> {
    /// let done = run.wait().await?;
    /// println!("{}: {:?}", done.status.as_str(), done.result);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// Errors of the stream or of the final `GET`.
    pub async fn wait(&self) -> Result<RunRecord> {
        let mut events = self
            .client
            .events_filtered(self.id(), 0, &[kind::CHAIN_COMPLETED]);
        while let Some(event) = events.next().await {
            event?;
        }
        self.refresh().await
    }
}

/// Which runs [`Client::list_runs`] answers; every field optional.
///
/// ```
/// use sluice_client::{RunFilter, RunStatus};
/// let f = RunFilter::new().workflow("ticker").status(RunStatus::Failed).limit(10);
/// assert_eq!(f.limit, Some(10));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunFilter {
    /// Only runs of this workflow.
    pub workflow: Option<String>,
    /// Only runs in one of these states (any state when empty).
    pub statuses: Vec<RunStatus>,
    /// Only runs of this session.
    pub session_id: Option<String>,
    /// Page size (the server's default is 50, at most 1000).
    pub limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

impl RunFilter {
    /// Every run, first page.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only runs of `workflow`.
    pub fn workflow(mut self, workflow: impl Into<String>) -> Self {
        self.workflow = Some(workflow.into());
        self
    }

    /// Adds `status` to the states listed.
    pub fn status(mut self, status: RunStatus) -> Self {
        self.statuses.push(status);
        self
    }

    /// Only runs of `session_id`.
    pub fn session(mut self, session_id: impl Into<String>) -> Self {
        self.session_id = Some(session_id.into());
        self
    }

    /// Page size.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Continue after a previous page.
    pub fn cursor(mut self, cursor: impl Into<String>) -> Self {
        self.cursor = Some(cursor.into());
        self
    }

    pub(crate) fn append_query(&self, url: &mut Url) {
        let mut q = url.query_pairs_mut();
        if let Some(w) = &self.workflow {
            q.append_pair("workflow", w);
        }
        if !self.statuses.is_empty() {
            let list: Vec<&str> = self.statuses.iter().map(|s| s.as_str()).collect();
            q.append_pair("status", &list.join(","));
        }
        if let Some(s) = &self.session_id {
            q.append_pair("session_id", s);
        }
        if let Some(l) = self.limit {
            q.append_pair("limit", &l.to_string());
        }
        if let Some(c) = &self.cursor {
            q.append_pair("cursor", c);
        }
        drop(q);
        if url.query() == Some("") {
            url.set_query(None);
        }
    }
}
