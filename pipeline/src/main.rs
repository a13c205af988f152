//! The `tcplake` binary: parse the configuration, set up logging, run the mode, print the summary.

use std::process::ExitCode;
use std::sync::Arc;

use pipeline::config::{Cli, CliError, Command, Settings, SummaryFormat, Task};
use pipeline::metrics::Metrics;
use pipeline::{admin, mode, secrets, shutdown};

/// The `tcplake bench` harness (feature `bench`, on by default; production images leave it out).
#[cfg(feature = "bench")]
mod bench;

/// Exit status of a configuration error (bad flag, variable or file): nothing was started.
const CONFIG_ERROR: u8 = 2;
/// Exit status of a failed run.
const RUN_ERROR: u8 = 1;

fn main() -> ExitCode {
    // Secrets the AWS environment holds are scrubbed from every log line, whoever logs them.
    secrets::register_aws_environment();
    let cli = match Cli::parse_args() {
        Ok(c) => c,
        Err(CliError::Clap(e)) => e.exit(),
        Err(CliError::Env(line)) => {
            eprintln!("tcplake: error: {line}");
            return ExitCode::from(CONFIG_ERROR);
        }
    };
    init_tracing(cli.log_json);
    let settings = match Settings::resolve(&cli) {
        Ok(s) => s,
        Err(e) => return fail(&anyhow::Error::new(e), CONFIG_ERROR),
    };
    match &cli.command {
        #[cfg(not(feature = "bench"))]
        Some(Command::Bench(_)) => fail(
            &anyhow::anyhow!(
                "this tcplake was built without the bench harness (build it with `--features bench`)"
            ),
            CONFIG_ERROR,
        ),
        #[cfg(feature = "bench")]
        Some(Command::Bench(args)) => {
            let s3 = bench::S3Flags {
                endpoint: cli.s3_endpoint.clone(),
                region: cli.s3_region.clone(),
            };
            let cfg = match bench::config(args, s3) {
                Ok(c) => c,
                Err(e) => return fail(&anyhow::Error::msg(e), CONFIG_ERROR),
            };
            if cli.check_config {
                println!("tcplake: bench configuration ok");
                return ExitCode::SUCCESS;
            }
            finish(bench(cfg))
        }
        _ if cli.check_config => {
            match &settings.task {
                Task::Compact(_) => println!("{} (compact)", settings.describe()),
                Task::Vacuum { .. } => println!("{} (vacuum)", settings.describe()),
                _ => println!("{}", settings.describe()),
            }
            ExitCode::SUCCESS
        }
        _ => match &settings.task {
            Task::Compact(options) => finish(compact(&settings, options)),
            Task::Vacuum {
                datasets,
                retention,
            } => finish(vacuum(&settings, datasets, *retention)),
            _ => finish(run(&settings)),
        },
    }
}
fn finish(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e, RUN_ERROR),
    }
}

fn run(settings: &Settings) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (trigger, listener) = shutdown::channel();
        shutdown::on_signals(trigger)?;
        let metrics = Arc::new(Metrics::default());
        if let Some(addr) = settings.metrics_addr {
            match admin::bind(addr).await {
                Ok(l) => {
                    let bound = l.local_addr().unwrap_or(addr);
                    if addr.port() == 0 {
                        // The user asked the system to choose: the chosen port is worth one line.
                        tracing::warn!(%bound, "serving /metrics, /healthz and /readyz on a port the system chose");
                    } else {
                        tracing::info!(%bound, "serving /metrics, /healthz and /readyz");
                    }
                    if addr.ip().is_unspecified() {
                        tracing::warn!(
                            %bound,
                            "the metrics endpoint listens on every interface: its metrics name this \
                             host's connections (hosts, ports, processes); bind it to loopback or a \
                             private address unless it is firewalled"
                        );
                    }
                    admin::serve(l, Arc::clone(&metrics));
                }
                // The default address is a convenience: a second tcplake on the host still runs.
                Err(e @ admin::AdminError::InUse { .. }) if !settings.metrics_addr_given => {
                    tracing::warn!("{e}; running without the metrics endpoint");
                }
                Err(e) => return Err(e.into()),
            }
        }
        let mut stopping = listener.clone();
        let m = Arc::clone(&metrics);
        tokio::spawn(async move {
            stopping.wait().await;
            m.health.set_not_ready("shutting down");
        });
        let summary = mode::run(settings, Arc::clone(&metrics), listener).await?;
        metrics.health.set_not_ready("finished");
        match settings.summary {
            SummaryFormat::Text => println!("{summary}"),
            SummaryFormat::Json => println!("{}", serde_json::to_string(&summary)?),
        }
        Ok(())
    })
}

fn compact(
    settings: &Settings,
    options: &[pipeline::lake::compact::CompactOptions],
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let metrics = Metrics::default();
        let store = mode::open_existing(&settings.out, &metrics, mode::Access::ReadWrite).await?;
        for opts in options {
            let report = pipeline::lake::compact::run(&store, opts).await?;
            match settings.summary {
                SummaryFormat::Text => println!("{report}"),
                SummaryFormat::Json => println!("{}", serde_json::to_string(&report)?),
            }
        }
        Ok(())
    })
}

fn vacuum(
    settings: &Settings,
    datasets: &[pipeline::lake::Dataset],
    retention: std::time::Duration,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let metrics = Metrics::default();
        let store = mode::open_existing(&settings.out, &metrics, mode::Access::ReadWrite).await?;
        for &dataset in datasets {
            let report = pipeline::lake::vacuum::run(&store, dataset, retention).await?;
            match settings.summary {
                SummaryFormat::Text => println!("{report}"),
                SummaryFormat::Json => println!("{}", serde_json::to_string(&report)?),
            }
        }
        Ok(())
    })
}

#[cfg(feature = "bench")]
fn bench(cfg: bench::BenchConfig) -> anyhow::Result<()> {
    let report = bench::run(&cfg)?;
    println!("{}", report.table());
    report.write(&cfg.dir)?;
    eprintln!(
        "bench: report in {}/report.md (with report.json and report.svg)",
        cfg.dir.display()
    );
    Ok(())
}

/// One line on stderr naming the problem, then a non-zero exit. One line: the error and each cause it does not already say (library errors that wrap another often
/// name it in their own message), scrubbed of registered secrets like every log line.
fn fail(e: &anyhow::Error, code: u8) -> ExitCode {
    let line = pipeline::report::one_line(e.as_ref());
    eprintln!("tcplake: error: {}", secrets::scrub(&line));
    ExitCode::from(code)
}

fn init_tracing(json: bool) {
    use tracing_subscriber::EnvFilter;
    // By default only tcplake's own warnings: dependencies' logs (client libraries retrying, credential
    // providers probing) are noise beside tcplake's one line per problem. RUST_LOG opens them up.
    let filter = EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| EnvFilter::new("off,pipeline=warn,tcplake=warn"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(secrets::Stderr);
    if json {
        fmt.json().init();
    } else {
        // Colour codes only for a terminal: logs collected from a service stay plain text.
        fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}
