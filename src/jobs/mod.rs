//! Jobs: a developer's request to run one entry of one module under one scenario. A job is
//! queued, then run on a blocking thread: the module in the sandbox, its queries through the
//! gate. Its report holds only the module's output and the releases it received — both
//! functions of DP releases — with the budget spent and the datasets' citations.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use unseen_guest::contract::{QueryRequest, QueryResponse, Release};

use crate::gate::{Gate, JobGrant, Released};
use crate::ledger::{Checkpoint, InclusionProof, Ledger};
use crate::sandbox::functions::UdfMode;
use crate::sandbox::{Host, Sandbox};
use crate::store::{Cached, Store, StoreError};

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitJob {
    pub scenario_id: String,
    /// The module's SHA-256 id.
    pub module: String,
    pub entry: String,
    #[serde(default)]
    pub params: serde_json::Value,
    /// Run the module now with every query only priced (see [`DryRun`]): nothing is queued,
    /// no data is read, nothing is spent.
    #[serde(default)]
    pub dry_run: bool,
}

/// What a dry run answers: the module's output over estimates, and each query's estimate (a
/// release with `dry_run` set and no rows) or refusal, in the order the module asked them.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DryRun {
    pub dry_run: bool,
    pub scenario_id: String,
    pub module: String,
    pub entry: String,
    #[schemars(with = "serde_json::Value")]
    pub output: serde_json::Value,
    /// Per query: `{"estimate": Release}` or `{"error": {code, message}}`.
    #[schemars(with = "Vec<serde_json::Value>")]
    pub answers: Vec<serde_json::Value>,
    /// What the estimated queries would spend together.
    pub epsilon: f64,
    pub delta: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    /// Finished; its report waits for an operator to release or withhold it.
    AwaitingReview,
    /// An operator withheld the report; its budget stays spent.
    Withheld,
    /// Its developer cancelled it: queued, it never ran; running, its module's further
    /// queries were refused and its report discarded. Budget already spent stays spent.
    Cancelled,
}

impl JobStatus {
    fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::AwaitingReview => "awaiting_review",
            JobStatus::Withheld => "withheld",
            JobStatus::Cancelled => "cancelled",
        }
    }
    fn parse(s: &str) -> Self {
        match s {
            "running" => JobStatus::Running,
            "succeeded" => JobStatus::Succeeded,
            "failed" => JobStatus::Failed,
            "awaiting_review" => JobStatus::AwaitingReview,
            "withheld" => JobStatus::Withheld,
            "cancelled" => JobStatus::Cancelled,
            _ => JobStatus::Queued,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct JobError {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub id: String,
    pub developer_id: String,
    pub scenario_id: String,
    pub module: String,
    pub entry: String,
    pub status: JobStatus,
    pub error: Option<JobError>,
    pub created_at: String,
    pub finished_at: Option<String>,
}

/// 注明数据来源和获取日期: every report cites its datasets.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Citation {
    pub dataset: String,
    pub title: String,
    pub source: String,
    pub version_date: String,
    pub acquisition_date: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub job_id: String,
    pub scenario_id: String,
    /// What the module returned: its post-processing of the releases.
    pub output: serde_json::Value,
    /// Every release the module received, in order.
    pub releases: Vec<Release>,
    pub epsilon_spent: f64,
    /// δ this job spent (releases whose keys were chosen from the data).
    #[serde(default)]
    pub delta_spent: f64,
    /// ε left in the scenario after this job (the least left on any of its datasets).
    pub scenario_epsilon_left: f64,
    pub citations: Vec<Citation>,
    /// Proof that every release was charged in the ledger: a signed checkpoint and, per
    /// release, inclusion proofs of its `reserve` and `commit` entries under that checkpoint.
    pub ledger: LedgerEvidence,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LedgerEvidence {
    pub checkpoint: Checkpoint,
    pub releases: Vec<ReleaseEvidence>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseEvidence {
    pub reservation: InclusionProof,
    pub commit: InclusionProof,
    /// A join's release is charged to each dataset it read: the entries on the others.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub joint: Vec<ReleaseEvidence>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("{message}")]
    Refused { code: &'static str, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for SubmitError {
    fn from(e: rusqlite::Error) -> Self {
        SubmitError::Store(e.into())
    }
}

fn refused(code: &'static str, message: impl Into<String>) -> SubmitError {
    SubmitError::Refused {
        code,
        message: message.into(),
    }
}

/// Runs jobs: at most `concurrent_jobs` at once.
#[derive(Clone)]
pub struct Runner {
    store: Store,
    gate: Gate,
    ledger: Arc<Ledger>,
    sandbox: Arc<Sandbox>,
    modules_dir: std::path::PathBuf,
    slots: Arc<tokio::sync::Semaphore>,
    /// Bumped whenever a job's run ends, for callers waiting on one (`GET /v1/jobs/{id}?wait=`).
    finished: Arc<tokio::sync::watch::Sender<u64>>,
    /// Jobs whose outcome is being recorded: readers may already see it, but it is not yet
    /// durable, so its report is not shown ([`Runner::settled`]).
    settling: Arc<Mutex<HashSet<String>>>,
}

impl Runner {
    pub fn new(
        store: Store,
        gate: Gate,
        ledger: Arc<Ledger>,
        sandbox: Arc<Sandbox>,
        modules_dir: std::path::PathBuf,
    ) -> Self {
        let slots = Arc::new(tokio::sync::Semaphore::new(
            sandbox.limits().concurrent_jobs.max(1),
        ));
        Runner {
            store,
            gate,
            ledger,
            sandbox,
            modules_dir,
            slots,
            finished: Arc::new(tokio::sync::watch::Sender::new(0)),
            settling: Arc::default(),
        }
    }

    /// Cancels a queued or running job (see [`cancel`]) and wakes its waiters.
    pub fn cancel(&self, id: &str) -> Result<bool, StoreError> {
        let cancelled = cancel(&self.store, id)?;
        self.finished.send_modify(|n| *n += 1);
        Ok(cancelled)
    }

    /// Waits until job `id` has left `queued` and `running`, and its outcome is durable (or
    /// `timeout` passes); answers whether it has.
    pub async fn wait_finished(
        &self,
        id: &str,
        timeout: std::time::Duration,
    ) -> Result<bool, StoreError> {
        self.wait_until(timeout, || {
            let done = get(&self.store, id)?
                .is_none_or(|(j, _)| !matches!(j.status, JobStatus::Queued | JobStatus::Running));
            Ok(done && !self.settling().contains(id))
        })
        .await
    }

    /// Waits while job `id`'s outcome is committed but not yet durable: a sync at most (or 30
    /// seconds, for a disk that hangs, after which it answers false).
    pub async fn settled(&self, id: &str) -> bool {
        self.wait_until(std::time::Duration::from_secs(30), || {
            Ok(!self.settling().contains(id))
        })
        .await
        .unwrap_or(false)
    }

    /// Checks `done` now and whenever a job's run ends, until it holds (true) or `timeout`
    /// passes (false).
    async fn wait_until(
        &self,
        timeout: std::time::Duration,
        mut done: impl FnMut() -> Result<bool, StoreError>,
    ) -> Result<bool, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.finished.subscribe();
        loop {
            changes.mark_unchanged();
            if done()? {
                return Ok(true);
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Ok(false);
            }
        }
    }

    fn settling(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.settling.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Jobs left queued or running by a previous process did not finish: they fail, and any
    /// budget they debited stays spent.
    pub fn fail_interrupted(&self) -> Result<usize, StoreError> {
        Ok(self.store.conn().execute_cached(
            "UPDATE jobs SET status = 'failed', error_code = 'interrupted',
             error_message = 'the server stopped before the job finished; budget it spent stays spent', finished_at = ?1
             WHERE status IN ('queued', 'running')",
            params![crate::now_rfc3339()],
        )?)
    }

    /// Checks and queues a job, then starts it in the background.
    /// Runs a module now with every query only estimated: checked, planned and priced as a
    /// real job's would be, but no row is read, nothing is queued or spent, and the ledger is
    /// untouched. Runs under the same fuel, memory and time limits as a job.
    pub async fn dry_run(&self, developer_id: &str, req: SubmitJob) -> Result<DryRun, SubmitError> {
        let (scenario, params_text) = self.check_submission(developer_id, &req)?;
        let failed = |e: String| {
            tracing::error!("dry run: {e}");
            refused("internal", "the module could not be loaded")
        };
        let bytes = std::fs::read(self.modules_dir.join(format!("{}.wasm", req.module)))
            .map_err(|e| failed(e.to_string()))?;
        let module = self
            .sandbox
            .validate(&bytes)
            .map_err(|e| failed(e.to_string()))?;
        let guest = self
            .sandbox
            .functions(&module, udf_mode(&scenario, &module.hash));
        let grant = self
            .gate
            .open_for_estimates(&crate::new_id("dry"), developer_id, &scenario, Some(guest))
            .await
            .map_err(|e| match e {
                crate::gate::GateError::Refused { code, message } => refused(code, message),
                other => refused("internal", other.to_query_error().message),
            })?;
        let answers = Arc::new(Mutex::new(Vec::new()));
        let host = GateHost {
            job_id: String::new(),
            store: self.store.clone(),
            developer_id: developer_id.to_string(),
            gate: self.gate.clone(),
            grant: Arc::new(grant),
            runtime: tokio::runtime::Handle::current(),
            releases: Arc::new(Mutex::new(Vec::new())),
            dry_run: Some(answers.clone()),
        };
        let sandbox = self.sandbox.clone();
        let entry = req.entry.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            sandbox.run(&module, &entry, params_text.as_bytes(), Box::new(host))
        })
        .await
        .map_err(|_| refused("internal", "the dry run's thread failed"))?;
        let output_bytes = outcome.map_err(|e| refused(e.code(), e.to_string()))?;
        let output = serde_json::from_slice(&output_bytes)
            .map_err(|_| refused("bad_output", "the module's output is not JSON"))?;
        let answers = std::mem::take(&mut *answers.lock().unwrap_or_else(|p| p.into_inner()));
        let (epsilon, delta) = answers
            .iter()
            .flatten()
            .fold((0.0, 0.0), |(e, d), r| (e + r.epsilon, d + r.delta));
        Ok(DryRun {
            dry_run: true,
            scenario_id: scenario.id,
            module: req.module,
            entry: req.entry,
            output,
            answers: answers
                .into_iter()
                .map(|a| match a {
                    Ok(estimate) => serde_json::json!({ "estimate": estimate }),
                    Err(e) => serde_json::json!({ "error": e }),
                })
                .collect(),
            epsilon,
            delta,
        })
    }

    /// Everything a submission must satisfy before it runs: the caller's approved, started
    /// scenario allowing this module, the caller's module with this entry, bounded params.
    fn check_submission(
        &self,
        developer_id: &str,
        req: &SubmitJob,
    ) -> Result<(crate::scenario::Scenario, String), SubmitError> {
        let scenario = crate::scenario::get(&self.store, &req.scenario_id)?
            .filter(|s| s.developer_id == developer_id)
            .ok_or_else(|| {
                refused(
                    "scenario_not_found",
                    "no scenario with that id belongs to you",
                )
            })?;
        if scenario.status != crate::scenario::Status::Approved {
            return Err(refused(
                "scenario_not_approved",
                format!("the scenario is {}, not approved", scenario.status_str()),
            ));
        }
        if !crate::scenario::started(&scenario) {
            return Err(refused(
                "scenario_not_started",
                format!(
                    "the scenario's validity window begins at {}",
                    scenario
                        .application
                        .valid_from
                        .as_deref()
                        .unwrap_or_default()
                ),
            ));
        }
        if !scenario
            .application
            .modules
            .iter()
            .any(|m| *m == req.module)
        {
            return Err(refused(
                "module_not_in_scenario",
                "the scenario does not allow this module",
            ));
        }
        let entries: Option<String> = self
            .store
            .read()
            .query_row_cached(
                "SELECT entries FROM modules WHERE hash = ?1 AND owner_id = ?2",
                params![req.module, developer_id],
                |r| r.get(0),
            )
            .optional()?;
        let entries: Vec<String> = entries
            .and_then(|e| serde_json::from_str(&e).ok())
            .ok_or_else(|| {
                refused(
                    "module_not_found",
                    "you have not uploaded a module with that id",
                )
            })?;
        if !entries.contains(&req.entry) {
            return Err(refused(
                "unknown_entry",
                format!("the module's entry points are {}", entries.join(", ")),
            ));
        }
        let params_text =
            serde_json::to_string(&req.params).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if params_text.len() > 64 * 1024 {
            return Err(refused(
                "params_too_large",
                "params are limited to 64 KiB of JSON",
            ));
        }
        Ok((scenario, params_text))
    }

    pub fn submit(&self, developer_id: &str, req: SubmitJob) -> Result<Job, SubmitError> {
        let (scenario, params_text) = self.check_submission(developer_id, &req)?;
        let job = Job {
            id: crate::new_id("job"),
            developer_id: developer_id.to_string(),
            scenario_id: scenario.id.clone(),
            module: req.module.clone(),
            entry: req.entry.clone(),
            status: JobStatus::Queued,
            error: None,
            created_at: crate::now_rfc3339(),
            finished_at: None,
        };
        // Not fsynced here: the request's audit record, committed with fsync before the answer
        // leaves, makes it durable (see `Store::conn_without_fsync`).
        self.store.conn_without_fsync()?.execute_cached(
            "INSERT INTO jobs (id, developer_id, scenario_id, module_hash, entry, params, status, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'queued', ?7)",
            params![job.id, job.developer_id, job.scenario_id, job.module, job.entry, params_text, job.created_at],
        )?;
        let runner = self.clone();
        let id = job.id.clone();
        let developer_id = job.developer_id.clone();
        let pad = scenario
            .application
            .pad_to_seconds
            .map(std::time::Duration::from_secs);
        tokio::spawn(async move {
            let Ok(slot) = runner.slots.clone().acquire_owned().await else {
                return;
            };
            let started = tokio::time::Instant::now();
            let outcome = runner.run(&id).await;
            drop(slot);
            // Padded: the outcome appears at the deadline, however long the guest code ran
            // (a job that overruns it appears late: that much is visible).
            if let Some(pad) = pad {
                tokio::time::sleep_until(started + pad).await;
            }
            let (status, code, message, report) = match outcome {
                Ok((report, review)) => (
                    if review {
                        JobStatus::AwaitingReview
                    } else {
                        JobStatus::Succeeded
                    },
                    None,
                    None,
                    serde_json::to_string(&report).ok(),
                ),
                Err(e) => (JobStatus::Failed, Some(e.code), Some(e.message), None),
            };
            // Written from a blocking thread: the commit's fsync must not hold up a worker
            // that could be running another job's plan.
            let store = runner.store.clone();
            let job = id.clone();
            runner.settling().insert(id.clone());
            let recorded = tokio::task::spawn_blocking(move || {
                record_outcome(&store, &job, developer_id, status, code, message, report)
            })
            .await;
            if recorded.is_err() {
                tracing::error!(job = %id, "the thread recording the job's outcome failed");
            }
            runner.settling().remove(&id);
            runner.finished.send_modify(|n| *n += 1);
        });
        Ok(job)
    }

    /// Runs a job; returns its report and whether it must wait for review.
    async fn run(&self, job_id: &str) -> Result<(Report, bool), JobError> {
        let internal = |_| JobError {
            code: "internal".into(),
            message: "the job could not be started".into(),
        };
        let (developer_id, scenario_id, module_hash, entry, params_text): (String, String, String, String, String) = self
            .store
            .read()
            .query_row_cached(
                "SELECT developer_id, scenario_id, module_hash, entry, params FROM jobs WHERE id = ?1",
                params![job_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .map_err(|e| internal(e.to_string()))?;
        let store = self.store.clone();
        let id = job_id.to_string();
        // Claimed under the write lock (a cancellation cannot slip in), but not fsynced: lost
        // in a crash, the job is `queued` instead of `running`, and start-up fails both alike.
        // The next durable commit (a ledger reservation, or the job's outcome) covers it.
        let started = tokio::task::spawn_blocking(move || {
            store.without_fsync(|conn| {
                conn.execute_cached(
                    "UPDATE jobs SET status = 'running' WHERE id = ?1 AND status = 'queued'",
                    params![id],
                )
            })
        })
        .await
        .map_err(|e| internal(e.to_string()))?
        .map_err(|e| internal(e.to_string()))?;
        if started == 0 {
            return Err(JobError {
                code: "job_cancelled".into(),
                message: "the job was cancelled before it ran".into(),
            });
        }
        // A developer revoked or suspended while the job waited in the queue: it does not run.
        if crate::principal::get(&self.store, &developer_id)
            .map_err(|e| internal(e.to_string()))?
            .is_none()
        {
            return Err(JobError {
                code: "principal_inactive".into(),
                message: "the developer was revoked or suspended before the job ran".into(),
            });
        }
        let scenario = crate::scenario::get(&self.store, &scenario_id)
            .map_err(|e| internal(e.to_string()))?
            .ok_or_else(|| internal("scenario vanished".into()))?;
        let module = match self.sandbox.compiled(&module_hash) {
            Some(module) => module,
            None => {
                let bytes = std::fs::read(self.modules_dir.join(format!("{module_hash}.wasm")))
                    .map_err(|e| internal(e.to_string()))?;
                self.sandbox
                    .validate(&bytes)
                    .map_err(|e| internal(e.to_string()))?
            }
        };
        // The file is named by its hash; one whose bytes no longer match is not the module
        // the job was submitted with, and does not run.
        if module.hash != module_hash {
            return Err(internal("the module's file does not match its hash".into()));
        }
        let guest = self
            .sandbox
            .functions(&module, udf_mode(&scenario, &module.hash));
        let grant = self
            .gate
            .open_job(job_id, &developer_id, &scenario, false, Some(guest))
            .await
            .map_err(|e| {
                let q = e.to_query_error();
                JobError {
                    code: q.code,
                    message: q.message,
                }
            })?;
        let grant = Arc::new(grant);
        let releases = Arc::new(Mutex::new(Vec::new()));
        let host = GateHost {
            job_id: job_id.to_string(),
            store: self.store.clone(),
            developer_id: developer_id.clone(),
            gate: self.gate.clone(),
            grant: grant.clone(),
            runtime: tokio::runtime::Handle::current(),
            releases: releases.clone(),
            dry_run: None,
        };
        let sandbox = self.sandbox.clone();
        let entry_name = entry.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            sandbox.run(&module, &entry_name, params_text.as_bytes(), Box::new(host))
        })
        .await
        .map_err(|_| JobError {
            code: "internal".into(),
            message: "the job's thread failed".into(),
        })?;
        let output_bytes = outcome.map_err(|e| JobError {
            code: e.code().into(),
            message: e.to_string(),
        })?;
        let output: serde_json::Value =
            serde_json::from_slice(&output_bytes).map_err(|_| JobError {
                code: "bad_output".into(),
                message: "the module's output is not JSON".into(),
            })?;
        let released = std::mem::take(&mut *releases.lock().unwrap_or_else(|p| p.into_inner()));
        let spent: f64 = released
            .iter()
            .filter(|r| !r.release.reused)
            .map(|r| r.release.epsilon)
            .sum();
        let delta_spent: f64 = released
            .iter()
            .filter(|r| !r.release.reused)
            .map(|r| r.release.delta)
            .sum();
        let mut left = f64::INFINITY;
        for dataset in scenario.application.columns.keys() {
            let on_dataset = self
                .ledger
                .spent("scenario", &scenario_id, dataset)
                .map_err(|e| internal(e.to_string()))?;
            left = left.min(scenario.epsilon_cap.unwrap_or(0.0) - on_dataset);
        }
        let citations = grant
            .datasets
            .values()
            .map(|p| Citation {
                dataset: p.id.clone(),
                title: p.title.clone(),
                source: p.source.clone(),
                version_date: p.version_date.clone(),
                acquisition_date: p.acquisition_date.clone(),
            })
            .collect();
        let checkpoint = self
            .ledger
            .checkpoint(false)
            .map_err(|e| internal(e.to_string()))?;
        let evidence = released
            .iter()
            .map(|r| {
                let mut pairs = r
                    .entries
                    .iter()
                    .map(|(reservation, commit)| {
                        Ok(ReleaseEvidence {
                            reservation: self
                                .ledger
                                .inclusion_proof(*reservation, checkpoint.tree_size)?,
                            commit: self.ledger.inclusion_proof(*commit, checkpoint.tree_size)?,
                            joint: Vec::new(),
                        })
                    })
                    .collect::<Result<Vec<_>, crate::ledger::LedgerError>>()?;
                if pairs.is_empty() {
                    return Err(crate::ledger::LedgerError::Invalid(
                        "a release without ledger entries".into(),
                    ));
                }
                let mut first = pairs.remove(0);
                first.joint = pairs;
                Ok(first)
            })
            .collect::<Result<Vec<_>, crate::ledger::LedgerError>>()
            .map_err(|e| internal(e.to_string()))?;
        let review = scenario.requires_review;
        Ok((
            Report {
                job_id: job_id.to_string(),
                scenario_id,
                output,
                releases: released.into_iter().map(|r| r.release).collect(),
                epsilon_spent: spent,
                delta_spent,
                scenario_epsilon_left: left.max(0.0),
                citations,
                ledger: LedgerEvidence {
                    checkpoint,
                    releases: evidence,
                },
            },
            review,
        ))
    }
}

/// Answers a module's queries with the gate, from the job's blocking thread.
struct GateHost {
    job_id: String,
    store: Store,
    developer_id: String,
    gate: Gate,
    grant: Arc<JobGrant>,
    runtime: tokio::runtime::Handle,
    releases: Arc<Mutex<Vec<Released>>>,
    /// A dry-run job: every query is only estimated, and its answers are kept here.
    dry_run: Option<Arc<Mutex<Vec<QueryResponse>>>>,
}

impl Host for GateHost {
    fn query(&mut self, request: QueryRequest) -> QueryResponse {
        // Revocation and suspension take effect between two queries of a running job too.
        if !matches!(
            crate::principal::get(&self.store, &self.developer_id),
            Ok(Some(_))
        ) {
            return Err(unseen_guest::QueryError {
                code: "principal_inactive".into(),
                message: "the developer was revoked or suspended; nothing was released or spent"
                    .into(),
            });
        }
        // A dry run has no job row to cancel.
        if self.dry_run.is_none() && cancelled(&self.store, &self.job_id) {
            return Err(unseen_guest::QueryError {
                code: "job_cancelled".into(),
                message: "the job was cancelled; nothing was released or spent".into(),
            });
        }
        if self.dry_run.is_some() || request.dry_run {
            let answer = self
                .runtime
                .block_on(self.gate.estimate(&self.grant, &request))
                .map_err(|e| e.to_query_error());
            if let Some(answers) = &self.dry_run {
                answers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(answer.clone());
            }
            return answer;
        }
        match self
            .runtime
            .block_on(self.gate.release(&self.grant, &request))
        {
            Ok(released) => {
                let release = released.release.clone();
                self.releases
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(released);
                Ok(release)
            }
            Err(e) => Err(e.to_query_error()),
        }
    }
}

/// Per-batch UDFs only for a module the scenario's operator reviewed.
fn udf_mode(scenario: &crate::scenario::Scenario, module: &str) -> UdfMode {
    if scenario
        .application
        .reviewed_modules
        .iter()
        .any(|m| m == module)
    {
        UdfMode::Batch
    } else {
        UdfMode::Unit
    }
}

/// A job's outcome and its `job_finished` audit record, in one transaction: neither is on
/// disk without the other. A cancelled job keeps its status; its report is discarded.
fn record_outcome(
    store: &Store,
    job: &str,
    developer_id: String,
    status: JobStatus,
    code: Option<String>,
    message: Option<String>,
    report: Option<String>,
) {
    let audit = |outcome: &str| {
        let mut record = crate::audit::NewRecord::system("job_finished", job, outcome);
        record.principal_id = Some(developer_id.clone());
        record.role = Some("developer".into());
        if let Some(code) = &code {
            record.detail.insert("error_code".into(), code.clone());
        }
        record
    };
    // Durable before it returns; its fsync shared with the writers of that moment.
    let mut committed = false;
    let together = store.write_durably(|conn| -> Result<(), StoreError> {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let saved = tx.execute_cached(
            "UPDATE jobs SET status = ?2, error_code = ?3, error_message = ?4, report = ?5, finished_at = ?6
             WHERE id = ?1 AND status != 'cancelled'",
            params![job, status.as_str(), code, message, report, crate::now_rfc3339()],
        )?;
        let outcome = if saved == 1 {
            status.as_str()
        } else {
            "cancelled"
        };
        crate::audit::append_in(&tx, audit(outcome))?;
        tx.commit()?;
        committed = true;
        Ok(())
    });
    match together {
        Ok(()) => {}
        // Recorded, with its audit record; only the sync failed (the disk is failing): the
        // next sync, or the crash, decides.
        Err(e) if committed => {
            tracing::error!(job = %job, "the job's outcome is committed but not yet durable: {e}")
        }
        Err(e) => {
            tracing::error!(job = %job, "could not record the job's outcome: {e}");
            crate::audit::append_logged(store, audit("unrecorded"));
        }
    }
}

fn cancelled(store: &Store, job_id: &str) -> bool {
    store
        .read()
        .query_row_cached(
            "SELECT status = 'cancelled' FROM jobs WHERE id = ?1",
            params![job_id],
            |r| r.get(0),
        )
        .unwrap_or(true)
}

/// Cancels a developer's queued or running job. Returns false if it had already finished.
pub fn cancel(store: &Store, job_id: &str) -> Result<bool, StoreError> {
    Ok(store.conn().execute_cached(
        "UPDATE jobs SET status = 'cancelled', error_code = 'job_cancelled', error_message = 'cancelled by the developer', finished_at = ?2
         WHERE id = ?1 AND status IN ('queued', 'running')",
        params![job_id, crate::now_rfc3339()],
    )? == 1)
}

/// An operator's decision on a report awaiting review: release it, or withhold it with a
/// reason. Returns false if the job is not awaiting review.
pub fn decide_review(
    store: &Store,
    job_id: &str,
    release: bool,
    reason: Option<&str>,
) -> Result<bool, StoreError> {
    let (status, code) = if release {
        ("succeeded", None)
    } else {
        ("withheld", Some("withheld"))
    };
    Ok(store.conn().execute_cached(
        "UPDATE jobs SET status = ?2, error_code = ?3, error_message = ?4 WHERE id = ?1 AND status = 'awaiting_review'",
        params![job_id, status, code, reason],
    )? == 1)
}

/// Jobs, newest first: one developer's, or everyone's; optionally in one status.
pub fn list(
    store: &Store,
    developer_id: Option<&str>,
    status: Option<&str>,
) -> Result<Vec<Job>, StoreError> {
    let conn = store.conn();
    let mut stmt = conn.prepare(
        "SELECT id, developer_id, scenario_id, module_hash, entry, status, error_code, error_message, created_at, finished_at
         FROM jobs WHERE (?1 IS NULL OR developer_id = ?1) AND (?2 IS NULL OR status = ?2) ORDER BY created_at DESC, id LIMIT 1000",
    )?;
    let jobs = stmt
        .query_map(params![developer_id, status], job_from_row)?
        .collect::<Result<_, _>>()?;
    Ok(jobs)
}

fn job_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Job> {
    let status: String = r.get(5)?;
    let code: Option<String> = r.get(6)?;
    let message: Option<String> = r.get(7)?;
    Ok(Job {
        id: r.get(0)?,
        developer_id: r.get(1)?,
        scenario_id: r.get(2)?,
        module: r.get(3)?,
        entry: r.get(4)?,
        status: JobStatus::parse(&status),
        error: code.map(|code| JobError {
            code,
            message: message.unwrap_or_default(),
        }),
        created_at: r.get(8)?,
        finished_at: r.get(9)?,
    })
}

pub fn get(store: &Store, id: &str) -> Result<Option<(Job, Option<Report>)>, StoreError> {
    let row = store
        .read()
        .query_row_cached(
            "SELECT id, developer_id, scenario_id, module_hash, entry, status, error_code, error_message, created_at, finished_at, report
             FROM jobs WHERE id = ?1",
            params![id],
            |r| Ok((job_from_row(r)?, r.get::<_, Option<String>>(10)?)),
        )
        .optional()?;
    row.map(|(job, report)| {
        let report = report
            .map(|t| serde_json::from_str(&t).map_err(|e| StoreError::Corrupt(e.to_string())))
            .transpose()?;
        Ok((job, report))
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report waits while its job's outcome settles (committed, not yet durable), and only
    /// then: other jobs are not held up.
    #[tokio::test]
    async fn a_report_waits_until_its_outcome_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ledger = Arc::new(Ledger::open(store.clone(), dir.path()).unwrap());
        let limits = crate::config::Limits::default();
        let gate = Gate::new(
            store.clone(),
            ledger.clone(),
            dir.path().to_path_buf(),
            limits.clone(),
        );
        let sandbox = Arc::new(Sandbox::new(limits).unwrap());
        let runner = Runner::new(store, gate, ledger, sandbox, dir.path().join("modules"));
        let settle = |settling: bool| {
            let mut set = runner.settling();
            if settling {
                set.insert("job_a".to_string());
            } else {
                set.remove("job_a");
            }
        };
        settle(true);
        let waiting = runner.clone();
        let waiter = tokio::spawn(async move { waiting.settled("job_a").await });
        assert!(
            runner.settled("job_b").await,
            "another job's report is not held"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(
            !waiter.is_finished(),
            "shown while its outcome was settling"
        );
        // Another job's end wakes the waiter, which keeps waiting.
        runner.finished.send_modify(|n| *n += 1);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!waiter.is_finished(), "woken by another job's end");
        settle(false);
        runner.finished.send_modify(|n| *n += 1);
        assert!(waiter.await.unwrap(), "settled");
    }
}
