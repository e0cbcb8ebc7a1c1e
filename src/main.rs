//! The `unseen` command line: serve, demo, principals and the ledger.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
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
        /// A Parquet file with the trips columns (e.g. from shared/bench/gen_trips.py).
        #[arg(long)]
        data: PathBuf,
        /// Q1, Q3 or all.
        #[arg(long, default_value = "all")]
        query: String,
        /// Runs per measurement; the median is reported.
        #[arg(long, default_value_t = 5)]
        runs: usize,
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

#[derive(Subcommand)]
enum PrincipalCommand {
    /// Register a principal and print its token (shown once).
    Add {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        role: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        organisation: Option<String>,
        #[arg(long)]
        licence_id: Option<String>,
    },
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
        #[arg(long, conflicts_with_all = ["export", "public_key"])]
        data_dir: Option<PathBuf>,
        #[arg(long, requires = "public_key")]
        export: Option<PathBuf>,
        /// The public key: hex, or a file holding it.
        #[arg(long, requires = "export")]
        public_key: Option<String>,
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
                    role,
                    name,
                    organisation,
                    licence_id,
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
            unseen::audit::record(&store, None, "principal_created_cli", Some(&p.id), "ok")?;
            eprintln!(
                "registered {} {} — the token is shown only this once:",
                p.role.as_str(),
                p.id
            );
            println!("{}", token.0);
            Ok(())
        }
        Command::Ledger { command } => ledger(command),
        Command::Bench { data, query, runs } => {
            runtime()?.block_on(unseen::bench::run(unseen::bench::BenchOptions {
                data,
                query,
                runs,
            }))
        }
        Command::GenTrips { rows, out, seed } => unseen::demo::trips::generate(rows, &out, seed),
    }
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
            data_dir,
            export,
            public_key,
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
