//! The `tcplake` binary: parse the configuration, set up logging, run the mode, print the summary.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use pipeline::config::{BenchArgs, Cli, Command, CompactArgs, Settings, SummaryFormat};
use pipeline::metrics::Metrics;
use pipeline::{admin, mode, shutdown};

fn main() -> ExitCode {
    let cli = Cli::parse().expand();
    init_tracing(cli.log_json);
    if let Some(Command::Bench(args)) = &cli.command {
        if cli.check_config {
            return match pipeline::bench::config(args) {
                Ok(_) => {
                    println!("tcplake: bench configuration ok");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&anyhow::Error::msg(e), 2),
            };
        }
        return match bench(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e, 1),
        };
    }
    let settings = match Settings::resolve(&cli) {
        Ok(s) => s,
        Err(e) => return fail(&anyhow::Error::new(e), 2),
    };
    if let Some(Command::Compact(args)) = &cli.command {
        if cli.check_config {
            return match compact_options(&settings, args) {
                Ok(_) => {
                    println!("{} (compact)", settings.describe());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e, 2),
            };
        }
        return match compact(&settings, args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e, 1),
        };
    }
    if cli.check_config {
        println!("{}", settings.describe());
        return ExitCode::SUCCESS;
    }
    match run(&settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e, 1),
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
                    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
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

/// What `tcplake compact` will do, checked (a bad partition or size fails before anything is read).
fn compact_options(
    settings: &Settings,
    args: &CompactArgs,
) -> anyhow::Result<Vec<pipeline::compact::CompactOptions>> {
    let target_bytes = match &args.target_size {
        Some(t) => pipeline::config::parse_size(t)
            .map_err(|e| anyhow::anyhow!("invalid target size `{t}`: {e}"))?,
        None => settings.max_file_bytes,
    };
    if let Some(p) = &args.partition {
        pipeline::compact::validate_partition(p)?;
    }
    let datasets = match args.dataset {
        Some(d) => vec![d.into()],
        None => vec![
            pipeline::sink::Dataset::Events,
            pipeline::sink::Dataset::Flows,
        ],
    };
    Ok(datasets
        .into_iter()
        .map(|dataset| pipeline::compact::CompactOptions {
            dataset,
            partition: args.partition.clone(),
            target_bytes,
            row_group_rows: settings.row_group_rows,
        })
        .collect())
}

fn compact(settings: &Settings, args: &CompactArgs) -> anyhow::Result<()> {
    let options = compact_options(settings, args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let metrics = Metrics::default();
        let store = mode::open_existing(&settings.out, &metrics).await?;
        for opts in options {
            let report = pipeline::compact::run(&store, &opts).await?;
            match settings.summary {
                SummaryFormat::Text => println!("{report}"),
                SummaryFormat::Json => println!("{}", serde_json::to_string(&report)?),
            }
        }
        Ok(())
    })
}

fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    let cfg = pipeline::bench::config(args).map_err(anyhow::Error::msg)?;
    let report = pipeline::bench::run(&cfg)?;
    println!("{}", report.table());
    report.write(&cfg.dir)?;
    eprintln!(
        "bench: report in {}/report.md (with report.json and report.svg)",
        cfg.dir.display()
    );
    Ok(())
}

/// One line on stderr naming the problem, then a non-zero exit. The library's error messages already
/// carry their causes, so only the outermost message is printed (`{:#}` would repeat them).
fn fail(e: &anyhow::Error, code: u8) -> ExitCode {
    eprintln!("tcplake: error: {e}");
    ExitCode::from(code)
}

fn init_tracing(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        fmt.json().init();
    } else {
        // Colour codes only for a terminal: logs collected from a service stay plain text.
        fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}
