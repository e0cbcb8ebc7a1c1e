//! The `unseen` command line: serve, demo, bootstrap, the ledger and the audit log offline, and
//! the operator's and auditor's tasks against a running server (`--server`, `--token`, or
//! `UNSEEN_SERVER`, `UNSEEN_TOKEN`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};
use unseen::config::{Config, Limits};
use unseen::principal::{NewPrincipal, Role};

#[derive(Parser)]
#[command(
    name = "unseen",
    version,
    about = "Compute on sensitive public data without seeing it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server.
    Serve {
        /// A TOML config file (data_dir, listen, policies_dir, [limits]).
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Seed the catalogue from the dataset policies (*.toml) and limits.toml in DIR.
        #[arg(long)]
        policies: Option<PathBuf>,
    },
    /// Walk through one job end to end on synthetic data.
    Demo {
        /// Keep the demo's state here instead of a temporary directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, default_value_t = 1_000_000)]
        rows: usize,
    },
    /// Manage principals directly in a data directory (bootstrap the first operator).
    Principal {
        #[command(subcommand)]
        command: PrincipalCommand,
    },
    /// Export and verify the privacy-budget ledger.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Run shared/bench/WORKLOADS.md's questions through the gate and in plain DataFusion;
    /// prints one JSON line per (question, mode).
    Bench {
        /// A Parquet file with the trips columns (e.g. from shared/bench/gen_trips.py); with
        /// --http, generated (--rows) if omitted.
        #[arg(long, required_unless_present_any = ["http", "instantiate"])]
        data: Option<PathBuf>,
        /// Measure the HTTP path instead: cold start, uploads, and small jobs under load
        /// from a server process on loopback.
        #[arg(long)]
        http: bool,
        /// Measure module instantiation instead (what every job pays before its entry runs).
        #[arg(long, conflicts_with = "http")]
        instantiate: bool,
        /// With --http and no --data: rows of synthetic trips to serve.
        #[arg(long, default_value_t = 1_000_000)]
        rows: usize,
        /// With --http: jobs per client at each concurrency.
        #[arg(long, default_value_t = 50)]
        jobs: usize,
        /// With --http: the client counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        clients: Vec<usize>,
        /// With --http: new modules to upload (each compiled).
        #[arg(long, default_value_t = 10)]
        uploads: usize,
        /// With --http: jobs the server runs at once (its `concurrent_jobs`; default: the
        /// server's default).
        #[arg(long)]
        concurrent_jobs: Option<usize>,
        /// Q1, Q2, Q3, Q4 or all.
        #[arg(long, default_value = "all")]
        query: String,
        /// Runs per measurement; the median is reported.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Only the runs that read the file (for files bigger than memory should hold).
        #[arg(long)]
        streaming: bool,
        /// The gate's runs read the table through the server's table cache, as served jobs
        /// do (decoded once, group-key positions kept with it); its runs from the file are
        /// skipped. Plain DataFusion runs as without it.
        #[arg(long, conflicts_with = "streaming")]
        cached: bool,
    },
    /// Principals on a running server (operators).
    Principals {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        command: PrincipalsCommand,
    },
    /// The catalogue on a running server.
    Datasets {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        command: DatasetsCommand,
    },
    /// Scenarios on a running server: list, show, approve, reject, suspend.
    Scenarios {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        command: ScenariosCommand,
    },
    /// Jobs on a running server: list, show, and review decisions.
    Jobs {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        command: JobsCommand,
    },
    /// Objections on a running server: list and answer.
    Objections {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        command: ObjectionsCommand,
    },
    /// ε spent, reserved and left, from a running server.
    Budget {
        #[command(flatten)]
        conn: Conn,
    },
    /// The audit log: list or export from a running server; verify an export or a data directory.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Write a synthetic trips table (the columns of shared/bench/WORKLOADS.md).
    GenTrips {
        #[arg(long)]
        rows: usize,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

/// Where the server is and who is calling.
#[derive(Args)]
struct Conn {
    #[arg(long, env = "UNSEEN_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    #[arg(long, env = "UNSEEN_TOKEN", hide_env_values = true)]
    token: String,
}

#[derive(Subcommand)]
enum PrincipalsCommand {
    /// Register a principal; prints it and its token (shown once).
    Add {
        #[command(flatten)]
        who: PrincipalArgs,
    },
    Revoke {
        id: String,
    },
    Suspend {
        id: String,
    },
    Reinstate {
        id: String,
    },
    /// A new token for a principal (the old one stops working).
    Rotate {
        id: String,
    },
}

#[derive(Subcommand)]
enum DatasetsCommand {
    List,
    Show {
        id: String,
    },
    /// Register a dataset from a policy file (TOML, as in policies/).
    Register {
        file: PathBuf,
    },
    /// Change the open attribute: unconditional, conditional or closed.
    SetOpen {
        id: String,
        attribute: String,
        #[arg(long)]
        reason: String,
    },
    /// Change metadata or the data file: a JSON object of the fields to change.
    Patch {
        id: String,
        json: String,
    },
}

#[derive(Subcommand)]
enum ScenariosCommand {
    List,
    Show {
        id: String,
    },
    /// Approve, optionally tightening limits.
    Approve {
        id: String,
        #[arg(long)]
        epsilon: Option<f64>,
        #[arg(long)]
        per_job_epsilon: Option<f64>,
        #[arg(long)]
        min_group_size: Option<u64>,
        /// End of the validity window (RFC 3339).
        #[arg(long)]
        valid_until: Option<String>,
        /// Require review before each report is released.
        #[arg(long)]
        require_review: bool,
    },
    Reject {
        id: String,
        #[arg(long)]
        reason: String,
    },
    Suspend {
        id: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum JobsCommand {
    /// Jobs, newest first (e.g. `--status awaiting_review`).
    List {
        #[arg(long)]
        status: Option<String>,
    },
    Show {
        id: String,
    },
    /// A job's report (operators may read held reports).
    Result {
        id: String,
    },
    /// Release a report held for review.
    Release {
        id: String,
    },
    /// Withhold a report held for review.
    Withhold {
        id: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum ObjectionsCommand {
    List,
    Show { id: String },
    Answer { id: String, answer: String },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Records in order, filtered.
    List {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        action: Option<String>,
        #[arg(long)]
        principal: Option<String>,
        #[arg(long)]
        target: Option<String>,
        #[arg(long)]
        after: Option<u64>,
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Every record as JSON lines, closed by a signed head.
    Export {
        #[command(flatten)]
        conn: Conn,
        /// Output file (standard output if omitted).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Verify the hash chain: of a data directory, or offline of an export and its signed head.
    Verify {
        #[command(flatten)]
        what: VerifyArgs,
    },
}

#[derive(Subcommand)]
enum PrincipalCommand {
    /// Register a principal and print its token (shown once).
    Add {
        #[arg(long)]
        data_dir: PathBuf,
        #[command(flatten)]
        who: PrincipalArgs,
    },
}

/// What to verify: a data directory in place, or an export offline with the ledger's key.
#[derive(Args)]
struct VerifyArgs {
    #[arg(long, conflicts_with_all = ["export", "public_key"])]
    data_dir: Option<PathBuf>,
    #[arg(long, requires = "public_key")]
    export: Option<PathBuf>,
    /// The ledger's public key: hex, or a file holding it.
    #[arg(long, requires = "export")]
    public_key: Option<String>,
}

/// A new principal: role (developer, operator or auditor), real name, organisation, licence.
#[derive(Args)]
struct PrincipalArgs {
    #[arg(long)]
    role: String,
    #[arg(long)]
    name: String,
    #[arg(long)]
    organisation: Option<String>,
    #[arg(long)]
    licence_id: Option<String>,
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Write every entry as JSON lines, closed by a signed checkpoint.
    Export {
        #[arg(long)]
        data_dir: PathBuf,
        /// Output file (standard output if omitted).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print the ledger's Ed25519 public key (hex).
    PublicKey {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Verify chain, signatures, Merkle root and checkpoint, and replay every debit against
    /// the grants: of a data directory, or offline of an export.
    Verify {
        #[command(flatten)]
        what: VerifyArgs,
    },
    /// ε spent per scenario, dataset and developer against the caps granted.
    Totals {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Measure durable reservations per second with N concurrent clients (prints JSON).
    Bench {
        #[arg(long, default_value_t = 1)]
        clients: usize,
        #[arg(long, default_value_t = 2000)]
        debits: usize,
    },
    /// Build a synthetic signed export of N entries, then time its offline verification.
    BenchVerify {
        #[arg(long, default_value_t = 1_000_000)]
        entries: u64,
    },
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line (with its causes) for a person, not a backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            data_dir,
            listen,
            policies,
        } => {
            let mut cfg = match config {
                Some(path) => Config::from_file(&path)?,
                None => Config::new(
                    data_dir
                        .clone()
                        .context("give --data-dir DIR or --config FILE")?,
                ),
            };
            if let Some(d) = data_dir {
                cfg.data_dir = d;
            }
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if let Some(p) = policies {
                if let Some(limits) = Limits::from_policies_dir(&p)? {
                    cfg.limits = limits;
                }
                cfg.policies_dir = Some(p);
            }
            runtime()?.block_on(async {
                let (addr, server) = unseen::api::start(cfg).await?;
                eprintln!("unseen listening on http://{addr}");
                tokio::select! {
                    _ = server => {}
                    _ = tokio::signal::ctrl_c() => eprintln!("shutting down"),
                }
                anyhow::Ok(())
            })
        }
        Command::Demo { data_dir, rows } => {
            runtime()?.block_on(unseen::demo::run(unseen::demo::DemoOptions {
                data_dir,
                rows,
            }))
        }
        Command::Principal {
            command:
                PrincipalCommand::Add {
                    data_dir,
                    who:
                        PrincipalArgs {
                            role,
                            name,
                            organisation,
                            licence_id,
                        },
                },
        } => {
            let role =
                Role::parse(&role).context("--role must be developer, operator or auditor")?;
            std::fs::create_dir_all(&data_dir)?;
            let store = unseen::store::Store::open(&data_dir)?;
            let (p, token) = unseen::principal::create(
                &store,
                &NewPrincipal {
                    role,
                    name,
                    organisation,
                    licence_id,
                },
            )?;
            let mut record =
                unseen::audit::NewRecord::system("create_principal_offline", &p.id, "ok")
                    .with("role", p.role.as_str());
            record.principal_id = std::env::var("USER").ok().map(|u| format!("os:{u}"));
            unseen::audit::append(&store, record)?;
            eprintln!(
                "registered {} {} — the token is shown only this once:",
                p.role.as_str(),
                p.id
            );
            println!("{}", token.0);
            Ok(())
        }
        Command::Ledger { command } => ledger(command),
        Command::Bench {
            instantiate: true,
            runs,
            ..
        } => unseen::bench::instantiation(runs.max(1000)),
        Command::Bench {
            data,
            http: true,
            rows,
            jobs,
            clients,
            uploads,
            concurrent_jobs,
            ..
        } => runtime()?.block_on(unseen::bench::http::run(
            unseen::bench::http::HttpBenchOptions {
                data,
                rows,
                jobs,
                clients,
                uploads,
                concurrent_jobs,
            },
        )),
        Command::Bench {
            data,
            query,
            runs,
            streaming,
            cached,
            ..
        } => runtime()?.block_on(unseen::bench::run(unseen::bench::BenchOptions {
            data: data.context("give --data FILE")?,
            query,
            runs,
            streaming,
            cached,
        })),
        Command::GenTrips { rows, out, seed } => unseen::demo::trips::generate(rows, &out, seed),
        Command::Audit {
            command:
                AuditCommand::Verify {
                    what:
                        VerifyArgs {
                            data_dir,
                            export,
                            public_key,
                        },
                },
        } => audit_verify(data_dir, export, public_key),
        Command::Audit {
            command: AuditCommand::Export { conn, out },
        } => runtime()?.block_on(async {
            let remote = unseen::client::Remote::new(&conn.server, &conn.token)?;
            let bytes = remote.call(Method::GET, "/v1/audit/export", None).await?;
            match out {
                Some(path) => std::fs::write(&path, &bytes)
                    .with_context(|| format!("write {}", path.display()))?,
                None => {
                    use std::io::Write;
                    std::io::stdout().write_all(&bytes)?
                }
            }
            anyhow::Ok(())
        }),
        other => {
            let (conn, method, path, body) = remote_call(other)?;
            runtime()?.block_on(async {
                let remote = unseen::client::Remote::new(&conn.server, &conn.token)?;
                let v = remote.json(method, &path, body.as_ref()).await?;
                if !v.is_null() {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                }
                anyhow::Ok(())
            })
        }
    }
}

/// The HTTP call behind each remote command.
fn remote_call(command: Command) -> anyhow::Result<(Conn, Method, String, Option<Value>)> {
    use Method as M;
    Ok(match command {
        Command::Principals { conn, command } => match command {
            PrincipalsCommand::Add {
                who:
                    PrincipalArgs {
                        role,
                        name,
                        organisation,
                        licence_id,
                    },
            } => (
                conn,
                M::POST,
                "/v1/principals".into(),
                Some(
                    json!({"role": role, "name": name, "organisation": organisation, "licence_id": licence_id}),
                ),
            ),
            PrincipalsCommand::Revoke { id } => {
                (conn, M::DELETE, format!("/v1/principals/{id}"), None)
            }
            PrincipalsCommand::Suspend { id } => {
                (conn, M::POST, format!("/v1/principals/{id}/suspend"), None)
            }
            PrincipalsCommand::Reinstate { id } => (
                conn,
                M::POST,
                format!("/v1/principals/{id}/reinstate"),
                None,
            ),
            PrincipalsCommand::Rotate { id } => {
                (conn, M::POST, format!("/v1/principals/{id}/rotate"), None)
            }
        },
        Command::Datasets { conn, command } => match command {
            DatasetsCommand::List => (conn, M::GET, "/v1/datasets".into(), None),
            DatasetsCommand::Show { id } => (conn, M::GET, format!("/v1/datasets/{id}"), None),
            DatasetsCommand::Register { file } => {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("read {}", file.display()))?;
                let policy =
                    unseen::catalog::DatasetPolicy::parse(&file.display().to_string(), &text)?;
                (
                    conn,
                    M::POST,
                    "/v1/datasets".into(),
                    Some(serde_json::to_value(policy)?),
                )
            }
            DatasetsCommand::SetOpen {
                id,
                attribute,
                reason,
            } => (
                conn,
                M::PATCH,
                format!("/v1/datasets/{id}"),
                Some(json!({"open_attribute": attribute, "reason": reason})),
            ),
            DatasetsCommand::Patch { id, json } => (
                conn,
                M::PATCH,
                format!("/v1/datasets/{id}"),
                Some(serde_json::from_str(&json).context("the patch must be a JSON object")?),
            ),
        },
        Command::Scenarios { conn, command } => match command {
            ScenariosCommand::List => (conn, M::GET, "/v1/scenarios".into(), None),
            ScenariosCommand::Show { id } => (conn, M::GET, format!("/v1/scenarios/{id}"), None),
            ScenariosCommand::Approve {
                id,
                epsilon,
                per_job_epsilon,
                min_group_size,
                valid_until,
                require_review,
            } => {
                let mut body = json!({});
                for (k, v) in [
                    ("epsilon", epsilon.map(|v| json!(v))),
                    ("per_job_epsilon", per_job_epsilon.map(|v| json!(v))),
                    ("min_group_size", min_group_size.map(|v| json!(v))),
                    ("valid_until", valid_until.map(|v| json!(v))),
                    ("requires_review", require_review.then_some(json!(true))),
                ] {
                    if let Some(v) = v {
                        body[k] = v;
                    }
                }
                (
                    conn,
                    M::POST,
                    format!("/v1/scenarios/{id}/approve"),
                    Some(body),
                )
            }
            ScenariosCommand::Reject { id, reason } => (
                conn,
                M::POST,
                format!("/v1/scenarios/{id}/reject"),
                Some(json!({"reason": reason})),
            ),
            ScenariosCommand::Suspend { id, reason } => (
                conn,
                M::POST,
                format!("/v1/scenarios/{id}/suspend"),
                Some(json!({"reason": reason})),
            ),
        },
        Command::Jobs { conn, command } => match command {
            JobsCommand::List { status } => (
                conn,
                M::GET,
                match status {
                    Some(s) => format!("/v1/jobs?status={s}"),
                    None => "/v1/jobs".into(),
                },
                None,
            ),
            JobsCommand::Show { id } => (conn, M::GET, format!("/v1/jobs/{id}"), None),
            JobsCommand::Result { id } => (conn, M::GET, format!("/v1/jobs/{id}/result"), None),
            JobsCommand::Release { id } => (conn, M::POST, format!("/v1/jobs/{id}/release"), None),
            JobsCommand::Withhold { id, reason } => (
                conn,
                M::POST,
                format!("/v1/jobs/{id}/withhold"),
                Some(json!({"reason": reason})),
            ),
        },
        Command::Objections { conn, command } => match command {
            ObjectionsCommand::List => (conn, M::GET, "/v1/objections".into(), None),
            ObjectionsCommand::Show { id } => (conn, M::GET, format!("/v1/objections/{id}"), None),
            ObjectionsCommand::Answer { id, answer } => (
                conn,
                M::POST,
                format!("/v1/objections/{id}/answer"),
                Some(json!({"answer": answer})),
            ),
        },
        Command::Budget { conn } => (conn, M::GET, "/v1/budget".into(), None),
        Command::Audit {
            command:
                AuditCommand::List {
                    conn,
                    action,
                    principal,
                    target,
                    after,
                    limit,
                },
        } => {
            let mut q = Vec::new();
            for (k, v) in [
                ("action", action),
                ("principal_id", principal),
                ("target", target),
                ("after", after.map(|a| a.to_string())),
                ("limit", limit.map(|l| l.to_string())),
            ] {
                if let Some(v) = v {
                    q.push(format!("{k}={}", url_escape(&v)));
                }
            }
            let path = if q.is_empty() {
                "/v1/audit".to_string()
            } else {
                format!("/v1/audit?{}", q.join("&"))
            };
            (conn, M::GET, path, None)
        }
        _ => unreachable!("local commands are handled in run()"),
    })
}

/// Percent-encodes a query value.
fn url_escape(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn audit_verify(
    data_dir: Option<PathBuf>,
    export: Option<PathBuf>,
    public_key: Option<String>,
) -> anyhow::Result<()> {
    let (n, signed) = match (data_dir, export, public_key) {
        (Some(dir), _, _) => {
            anyhow::ensure!(
                dir.join("unseen.sqlite").exists(),
                "no unseen data directory at {}",
                dir.display()
            );
            let store = unseen::store::Store::open(&dir)?;
            (
                unseen::audit::verify(&unseen::audit::all(&store)?, None, None)?,
                false,
            )
        }
        (None, Some(file), Some(key)) => {
            let f =
                std::fs::File::open(&file).with_context(|| format!("open {}", file.display()))?;
            let (records, head) = unseen::audit::read_export(std::io::BufReader::new(f))?;
            anyhow::ensure!(
                head.is_some(),
                "{} has no signed head: it may have been cut short",
                file.display()
            );
            let key = read_key(&key)?;
            (
                unseen::audit::verify(&records, head.as_ref(), Some(&key))?,
                true,
            )
        }
        _ => anyhow::bail!("give --data-dir DIR, or --export FILE with --public-key KEY"),
    };
    println!(
        "audit log verified: {n} records; hash chain intact{}",
        if signed { "; signed head matches" } else { "" }
    );
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn read_key(key: &str) -> anyhow::Result<String> {
    let key = if std::path::Path::new(key).exists() {
        std::fs::read_to_string(key)?
    } else {
        key.to_string()
    };
    Ok(key.trim().to_string())
}

fn ledger(command: LedgerCommand) -> anyhow::Result<()> {
    use unseen::ledger::{self, Ledger};
    let open = |dir: &PathBuf| -> anyhow::Result<Ledger> {
        anyhow::ensure!(
            dir.join("unseen.sqlite").exists(),
            "no unseen data directory at {}",
            dir.display()
        );
        Ok(Ledger::open(unseen::store::Store::open(dir)?, dir)?)
    };
    match command {
        LedgerCommand::Export { data_dir, out } => {
            let l = open(&data_dir)?;
            let checkpoint = l.checkpoint(true)?;
            let mut entries = l.all_entries()?;
            entries.truncate(checkpoint.tree_size as usize);
            match out {
                Some(path) => ledger::export(
                    &entries,
                    Some(&checkpoint),
                    std::io::BufWriter::new(std::fs::File::create(&path)?),
                )?,
                None => ledger::export(&entries, Some(&checkpoint), std::io::stdout().lock())?,
            }
            eprintln!(
                "exported {} entries, closed by a signed checkpoint (root {})",
                entries.len(),
                &checkpoint.root[..16]
            );
            Ok(())
        }
        LedgerCommand::PublicKey { data_dir } => {
            anyhow::ensure!(
                data_dir.join("ledger-key.pk8").exists(),
                "no ledger key in {}",
                data_dir.display()
            );
            println!(
                "{}",
                ledger::Signer::load_or_create(&data_dir)?.public_key_hex()
            );
            Ok(())
        }
        LedgerCommand::Verify {
            what:
                VerifyArgs {
                    data_dir,
                    export,
                    public_key,
                },
        } => {
            let started = std::time::Instant::now();
            let summary = match (data_dir, export, public_key) {
                (Some(dir), _, _) => {
                    let l = open(&dir)?;
                    let entries = l.all_entries()?;
                    let summary = ledger::verify(
                        &entries,
                        l.recorded_checkpoint()?.as_ref(),
                        &l.public_key_hex(),
                    )?;
                    // The running totals the server checks caps against must match the replay.
                    for (key, level) in &summary.per_scenario {
                        let (scenario, dataset) = key.split_once('/').unwrap_or((key, ""));
                        let stored = l.spent("scenario", scenario, dataset)?;
                        anyhow::ensure!(
                            (stored - level.spent).abs() < 1e-9,
                            "the stored total for {key} ({stored}) differs from the ledger's ({})",
                            level.spent
                        );
                    }
                    summary
                }
                (None, Some(file), Some(key)) => {
                    let f = std::fs::File::open(&file)
                        .with_context(|| format!("open {}", file.display()))?;
                    let export = ledger::read_export(std::io::BufReader::new(f))?;
                    ledger::verify(
                        &export.entries,
                        export.checkpoint.as_ref(),
                        &read_key(&key)?,
                    )?
                }
                _ => anyhow::bail!("give --data-dir DIR, or --export FILE with --public-key KEY"),
            };
            println!("{}", serde_json::to_string_pretty(&summary)?);
            eprintln!(
                "ledger verified in {:.2} s: {} entries; chain, signatures{} intact; every debit within its grant",
                started.elapsed().as_secs_f64(),
                summary.entries,
                if summary.checkpoint_size.is_some() {
                    ", Merkle root and signed checkpoint"
                } else {
                    " and Merkle tree"
                }
            );
            Ok(())
        }
        LedgerCommand::Totals { data_dir } => {
            let l = open(&data_dir)?;
            let summary = ledger::replay(&l.all_entries()?)?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
            Ok(())
        }
        LedgerCommand::Bench { clients, debits } => {
            unseen::ledger::bench::durable_debits(clients, debits)
        }
        LedgerCommand::BenchVerify { entries } => unseen::ledger::bench::verify_entries(entries),
    }
}
