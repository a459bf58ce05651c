use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sluice_protocol::kind;

use crate::event::{
    InputEvent, StartEvent, StopEvent, ToolResultsEvent, WorkflowEvent, valid_name,
};
use crate::step::Step;
use crate::{Error, Result};

/// Checks a run's input before the run is accepted; `Err` names the offending field.
pub type InputValidator = Arc<dyn Fn(&Value) -> Result<(), String> + Send + Sync>;

/// A validated workflow definition: steps, routing table and limits. Cheap to clone.
#[derive(Clone)]
pub struct Workflow {
    pub(crate) inner: Arc<WorkflowDef>,
}

#[derive(Clone)]
pub(crate) struct WorkflowDef {
    pub name: String,
    pub kind: String,
    pub description: String,
    pub input_schema: Value,
    pub validator: Option<InputValidator>,
    pub steps: Vec<Step>,
    /// event name → indexes of the steps accepting it.
    pub routes: HashMap<String, Vec<usize>>,
    pub run_timeout: Option<Duration>,
    pub max_steps: u32,
    pub max_concurrent_runs: usize,
    pub queue: usize,
    /// The stream event types of its own that its steps write (besides the reserved ones).
    pub stream_events: BTreeSet<String>,
}

impl std::fmt::Debug for Workflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workflow")
            .field("name", &self.inner.name)
            .field("steps", &self.inner.steps)
            .finish_non_exhaustive()
    }
}

impl Workflow {
    /// Starts a definition.
    pub fn builder(name: impl Into<String>) -> WorkflowBuilder {
        WorkflowBuilder {
            name: name.into(),
            kind: "rust".into(),
            description: String::new(),
            input_schema: serde_json::json!({}),
            validator: None,
            steps: Vec::new(),
            run_timeout: None,
            max_steps: 1_000,
            max_concurrent_runs: 1_000,
            queue: 10_000,
            stream_events: BTreeSet::new(),
        }
    }

    /// The name runs are started by.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Its kind (`rust`, `ticker`, `ask-human`, `agent`…).
    pub fn kind(&self) -> &str {
        &self.inner.kind
    }

    /// What it does.
    pub fn description(&self) -> &str {
        &self.inner.description
    }

    /// JSON Schema of its input.
    pub fn input_schema(&self) -> &Value {
        &self.inner.input_schema
    }

    /// Runs executing at once; beyond, runs queue.
    pub fn max_concurrent_runs(&self) -> usize {
        self.inner.max_concurrent_runs
    }

    /// Queued runs allowed; beyond, starts are refused.
    pub fn queue(&self) -> usize {
        self.inner.queue
    }

    /// The stream event types of its own (declared with
    /// [`stream_event`](WorkflowBuilder::stream_event)), in order.
    pub fn stream_events(&self) -> impl Iterator<Item = &str> {
        self.inner.stream_events.iter().map(String::as_str)
    }

    /// Whether a run of this workflow can write stream events of type `t`: a reserved type, or
    /// one of its own.
    pub fn writes(&self, t: &str) -> bool {
        kind::is_reserved(t) || self.inner.stream_events.contains(t)
    }

    /// The same definition deployed under another name and with other limits (used to deploy a
    /// built-in kind from configuration).
    ///
    /// # Errors
    /// [`Error::InvalidWorkflow`] when the name is malformed.
    pub fn configure(&self, name: &str, limits: &Limits) -> Result<Workflow> {
        if !valid_name(name) {
            return Err(Error::InvalidWorkflow {
                workflow: name.to_owned(),
                message: "the workflow name must match [a-z][a-z0-9._-]{0,63}".into(),
            });
        }
        let mut def = (*self.inner).clone();
        def.name = name.to_owned();
        if let Some(n) = limits.max_concurrent_runs {
            def.max_concurrent_runs = n.max(1);
        }
        if let Some(n) = limits.queue {
            def.queue = n;
        }
        if let Some(t) = limits.run_timeout {
            def.run_timeout = Some(t);
        }
        if let Some(n) = limits.max_steps {
            def.max_steps = n.max(1);
        }
        if let Some(d) = &limits.description {
            def.description = d.clone();
        }
        Ok(Workflow {
            inner: Arc::new(def),
        })
    }

    /// Checks an input with the workflow's validator.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field.
    pub fn validate_input(&self, input: &Value) -> Result<()> {
        match &self.inner.validator {
            Some(v) => v(input).map_err(Error::InvalidInput),
            None => Ok(()),
        }
    }
}

/// Per-deployment overrides of a workflow's limits; `None` keeps the definition's value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    /// Runs executing at once.
    pub max_concurrent_runs: Option<usize>,
    /// Runs allowed to queue.
    pub queue: Option<usize>,
    /// Time limit of a run.
    pub run_timeout: Option<Duration>,
    /// Step budget of a run.
    pub max_steps: Option<u32>,
    /// Description shown to clients.
    pub description: Option<String>,
}

/// Builds a [`Workflow`]; [`build`](WorkflowBuilder::build) validates it.
pub struct WorkflowBuilder {
    name: String,
    kind: String,
    description: String,
    input_schema: Value,
    validator: Option<InputValidator>,
    steps: Vec<Step>,
    run_timeout: Option<Duration>,
    max_steps: u32,
    max_concurrent_runs: usize,
    queue: usize,
    stream_events: BTreeSet<String>,
}

impl WorkflowBuilder {
    /// Adds a step.
    pub fn step(mut self, step: Step) -> Self {
        self.steps.push(step);
        self
    }

    /// Sets the kind shown by `GET /v1/workflows` (default `rust`).
    pub fn kind(mut self, kind: impl Into<String>) -> Self {
        self.kind = kind.into();
        self
    }

    /// Sets the description.
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.description = text.into();
        self
    }

    /// Sets the JSON Schema of the input (documentation for clients).
    pub fn input_schema(mut self, schema: Value) -> Self {
        self.input_schema = schema;
        self
    }

    /// Checks inputs before runs are accepted.
    pub fn validate_input(
        mut self,
        f: impl Fn(&Value) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.validator = Some(Arc::new(f));
        self
    }

    /// Ends runs with `chain-error` `timeout` this long after they started, not counting the
    /// time they spent waiting for input (default: none).
    pub fn run_timeout(mut self, limit: Duration) -> Self {
        self.run_timeout = Some(limit);
        self
    }

    /// Ends runs with `chain-error` `max_steps` when they would start more step instances
    /// (default 1,000).
    pub fn max_steps(mut self, n: u32) -> Self {
        self.max_steps = n.max(1);
        self
    }

    /// Runs executing at once (default 1,000); waiting runs do not count.
    pub fn max_concurrent_runs(mut self, n: usize) -> Self {
        self.max_concurrent_runs = n.max(1);
        self
    }

    /// Runs allowed to queue beyond `max_concurrent_runs` (default 10,000).
    pub fn queue(mut self, n: usize) -> Self {
        self.queue = n;
        self
    }

    /// Declares a stream event type of its own that the workflow's steps write with
    /// [`Context::write_event_to_stream`](crate::Context::write_event_to_stream) (the reserved
    /// step-level types need no declaring). A step that writes an undeclared one gets
    /// [`Error::InvalidEventType`]; clients filtering a run's stream by type (`?types=`) may name
    /// only reserved and declared types.
    pub fn stream_event(mut self, name: impl Into<String>) -> Self {
        self.stream_events.insert(name.into());
        self
    }

    /// Validates and freezes the definition.
    ///
    /// # Errors
    /// [`Error::InvalidWorkflow`] naming the step and event type when: a name is malformed or
    /// taken twice; no step accepts [`StartEvent`]; a step emits a type no step accepts; a step
    /// accepts a type nothing produces; no [`StopEvent`] is reachable from the start.
    pub fn build(self) -> Result<Workflow> {
        let invalid = |message: String| Error::InvalidWorkflow {
            workflow: self.name.clone(),
            message,
        };
        if !valid_name(&self.name) {
            return Err(invalid(
                "the workflow name must match [a-z][a-z0-9._-]{0,63}".into(),
            ));
        }
        if self.steps.is_empty() {
            return Err(invalid("it has no steps".into()));
        }
        for e in &self.stream_events {
            if !valid_name(e) || kind::is_reserved(e) {
                return Err(invalid(format!(
                    "stream event {e:?}: must match [a-z][a-z0-9._-]{{0,63}} and not be a reserved type"
                )));
            }
        }
        let mut routes: HashMap<String, Vec<usize>> = HashMap::new();
        let mut names = BTreeSet::new();
        for (i, step) in self.steps.iter().enumerate() {
            if !names.insert(step.name.as_str()) {
                return Err(invalid(format!("two steps are named {:?}", step.name)));
            }
            if step.name.is_empty() {
                return Err(invalid("a step has an empty name".into()));
            }
            if step.accepts.is_empty() {
                return Err(invalid(format!(
                    "step {:?} accepts no event type",
                    step.name
                )));
            }
            for a in &step.accepts {
                if !valid_name(a) {
                    return Err(invalid(format!(
                        "step {:?} accepts {a:?}, not a valid event name",
                        step.name
                    )));
                }
                if a == StopEvent::NAME {
                    return Err(invalid(format!(
                        "step {:?} accepts \"stop\", which ends the run",
                        step.name
                    )));
                }
                routes.entry(a.clone()).or_default().push(i);
            }
        }
        if !routes.contains_key(StartEvent::NAME) {
            return Err(invalid(
                "no step accepts the start event (StartEvent)".into(),
            ));
        }
        let external = [InputEvent::NAME, ToolResultsEvent::NAME];
        let mut produced: BTreeSet<&str> = BTreeSet::from([StartEvent::NAME]);
        for step in &self.steps {
            for e in &step.emits {
                if !valid_name(e) {
                    return Err(invalid(format!(
                        "step {:?} emits {e:?}, not a valid event name",
                        step.name
                    )));
                }
                if e != StopEvent::NAME && !routes.contains_key(e) {
                    let what = if external.contains(&e.as_str()) {
                        "waits for"
                    } else {
                        "emits"
                    };
                    return Err(invalid(format!(
                        "step {:?} {what} {e:?} but no step accepts it",
                        step.name
                    )));
                }
                produced.insert(e);
            }
        }
        for step in &self.steps {
            for a in &step.accepts {
                if !produced.contains(a.as_str()) {
                    return Err(invalid(format!(
                        "step {:?} accepts {a:?} but no step emits it (declare it with .emits())",
                        step.name
                    )));
                }
            }
        }
        // Reachability: follow emits from the steps that accept the start event.
        let mut seen_types: BTreeSet<&str> = BTreeSet::from([StartEvent::NAME]);
        let mut frontier = vec![StartEvent::NAME];
        let mut stop_reachable = false;
        while let Some(t) = frontier.pop() {
            for &i in routes.get(t).map(Vec::as_slice).unwrap_or(&[]) {
                for e in &self.steps[i].emits {
                    if e == StopEvent::NAME {
                        stop_reachable = true;
                    } else if seen_types.insert(e) {
                        frontier.push(e);
                    }
                }
            }
        }
        if !stop_reachable {
            return Err(invalid(
                "no step reachable from the start emits StopEvent, so no run could complete".into(),
            ));
        }
        Ok(Workflow {
            inner: Arc::new(WorkflowDef {
                name: self.name,
                kind: self.kind,
                description: self.description,
                input_schema: self.input_schema,
                validator: self.validator,
                steps: self.steps,
                routes,
                run_timeout: self.run_timeout,
                max_steps: self.max_steps,
                max_concurrent_runs: self.max_concurrent_runs,
                queue: self.queue,
                stream_events: self.stream_events,
            }),
        })
    }
}
