//! The `kv` command: train, convert, evaluate, generate, benchmark and tour, on any backend
//! compiled into this build.

// Tests read what they assert; the library reads through kv_core::readback (clippy.toml).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

mod backend;
mod bench;
mod convert;
mod eval;
mod generate;
mod kept;
mod model_source;
mod peak;
mod plot;
mod report;
mod stream;
mod tour;
mod train;

use backend::{DeviceKind, run_on};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use kv_core::Result;

#[global_allocator]
static HEAP: peak::CountingAlloc = peak::CountingAlloc;

/// KV-cache compression toolkit: train, generate, evaluate and benchmark small transformers.
#[derive(Debug, Parser)]
#[command(name = "kv", version)]
struct Cli {
    /// Backend to run on; only those compiled in are available (default: flex).
    #[arg(long, global = true, value_enum)]
    device: Option<DeviceKind>,
    /// Kernels to take: auto (host kernels on CPU backends, the backend's ops on GPUs), host or
    /// backend. `kv bench` records the choice beside its numbers.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    kernels: backend::KernelChoice,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate text from a random or saved model, printing tokens as they come.
    Generate(generate::GenerateArgs),
    /// Measure cache bytes, prefill, decode tokens/s, policy cost and training speed; JSON, Markdown, PNGs.
    Bench(bench::BenchArgs),
    /// The first command to run: train (or reuse) the tiny presets, evaluate every policy at 50%
    /// and 87.5% compression, retrofit DMC, benchmark, and write a report folder.
    Tour(tour::TourArgs),
    /// Train a preset or config from scratch, resume a run, or fine-tune from a checkpoint (with
    /// `--dmc`, a DMC retrofit).
    Train(train::TrainArgs),
    /// Convert a trained checkpoint to fewer KV heads (GQA/MQA) or a latent cache (MLA).
    Convert(convert::ConvertArgs),
    /// Evaluate checkpoints x policies x compressions x tasks; writes JSON, Markdown and PNGs.
    Eval(eval::EvalArgs),
    /// Write which positions each policy keeps after a prompt, per layer and KV head, as JSON.
    Kept(kept::KeptArgs),
    /// Redraw an eval's Markdown table and charts from its eval.json.
    Report(ReportArgs),
    /// Decode a very long stream (a million tokens) under a bounded cache, recording resident
    /// memory as it goes; JSON, Markdown and a PNG of memory against tokens.
    Stream(stream::StreamArgs),
}

/// Flags of `kv report`.
#[derive(Debug, clap::Args)]
struct ReportArgs {
    /// An eval.json written by `kv eval` or the tour.
    #[arg(long)]
    from: std::path::PathBuf,
    /// Folder for eval.md and the charts (default: the folder of --from).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

fn run(cli: Cli) -> Result<()> {
    let device = cli.device.unwrap_or_else(DeviceKind::default_compiled);
    backend::choose_kernels(cli.kernels);
    match cli.command {
        Command::Generate(args) => run_on(device, args),
        Command::Train(args) => run_on(device, args),
        Command::Convert(args) => {
            let out = args.out.clone();
            let r = run_on(device, args)?;
            let latent = r.latent_error.map_or(String::new(), |e| {
                format!(", worst latent factorisation error {:.1}%", e * 100.0)
            });
            eprintln!(
                "wrote {}: KV bytes/token {} -> {}{latent}; fine-tune it with `kv train --init {}`",
                out.display(),
                r.bytes_per_token.0,
                r.bytes_per_token.1,
                out.display()
            );
            Ok(())
        }
        Command::Tour(args) => {
            let plan = if args.quick {
                tour::TourPlan::quick(&args.presets)?
            } else {
                tour::TourPlan::standard(&args.presets)?
            };
            let out = args.out.clone();
            let report = run_on(device, tour::TourJob { args, plan, device })?;
            let written = tour::write_report(&out, &report)?;
            println!(
                "{}",
                std::fs::read_to_string(out.join("report.md")).unwrap_or_default()
            );
            eprintln!(
                "tour done in {:.0} s; wrote {} files into {}",
                report.seconds,
                written.len(),
                out.display()
            );
            Ok(())
        }
        Command::Eval(args) => {
            let out = args.out.clone();
            let file = run_on(device, eval::EvalJob { args, device })?;
            let written = report::write(&out, &file)?;
            println!("{}", report::markdown(&file.results));
            eprintln!(
                "wrote {}",
                written
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(())
        }
        Command::Kept(args) => {
            let out = args.out.clone();
            let file = run_on(device, args)?;
            let json = serde_json::to_string(&file).map_err(|e| kv_core::KvError::io(&out, e))?;
            kv_models::write_atomic(&out, json.as_bytes())?;
            let heads = kept::write_heads(&out, &file)?;
            let also: Vec<String> = heads.iter().map(|p| p.display().to_string()).collect();
            eprintln!(
                "wrote {} ({}): {} policies over {} prompt tokens",
                out.display(),
                also.join(", "),
                file.policies.len(),
                file.prompt_tokens
            );
            Ok(())
        }
        Command::Report(args) => {
            let file = report::GridFile::read(&args.from)?;
            let out = args.out.clone().unwrap_or_else(|| {
                args.from
                    .parent()
                    .map(|p| p.to_path_buf())
                    .unwrap_or_default()
            });
            let written = report::write(&out, &file)?;
            println!("{}", report::markdown(&file.results));
            eprintln!(
                "wrote {}",
                written
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(())
        }
        Command::Stream(args) => {
            let out = args.out.clone();
            let file = match &args.from {
                Some(path) => stream::read(path)?,
                None => run_on(device, stream::StreamJob { args, device })?,
            };
            let written = stream::write_results(&out, &file)?;
            println!("{}", stream::markdown(&file));
            eprintln!(
                "wrote {}",
                written
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(())
        }
        Command::Bench(args) => {
            let out = args.out.clone();
            // An output folder that cannot be made fails before any work; one made here is
            // removed again if the run fails, so a failed command leaves nothing behind.
            let made = make_out_dir(&out)?;
            let file = run_on(device, bench::BenchJob { args, device }).inspect_err(|_| {
                if let Some(top) = &made {
                    let _ = std::fs::remove_dir_all(top);
                }
            })?;
            let written = bench::write_results(&out, &file)?;
            println!("{}", bench::markdown(&file));
            eprintln!(
                "wrote {}",
                written
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(())
        }
    }
}

/// Creates `dir` (and any missing parents); returns the topmost folder it created, if any.
fn make_out_dir(dir: &std::path::Path) -> Result<Option<std::path::PathBuf>> {
    let top = dir
        .ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
        .last()
        .map(|a| a.to_path_buf());
    std::fs::create_dir_all(dir).map_err(|e| kv_core::KvError::io(dir, e))?;
    Ok(top)
}

/// Folds a message onto one line, so every failure reads as a single `error: ...` line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Writes the heap high-water mark to the file `KV_PEAK_HEAP_FILE` names, if set: the tests use
/// it to show that no input makes the command allocate more than the input justifies.
fn report_peak_heap() {
    if let Some(path) = std::env::var_os("KV_PEAK_HEAP_FILE") {
        let _ = std::fs::write(path, peak::peak().to_string());
    }
}

/// The policies a spec can name, from the registry, for the end of `kv --help`.
fn policy_help() -> String {
    format!(
        "Policies (--policy name:key=value,...):\n{}",
        backend::policies::<backend::NamingBackend>().help()
    )
}

fn main() {
    peak::tune_heap();
    let parsed = Cli::command()
        .after_help(policy_help())
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // clap's report spans several lines (the error, valid values, tips, usage): keep all
            // but the usage on one line.
            let text = e.render().to_string();
            let kept: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty())
                .collect();
            let line = if kept.is_empty() {
                "error: invalid arguments".to_string()
            } else {
                kept.join("; ")
            };
            eprintln!("{line} (see `kv --help`)");
            report_peak_heap();
            std::process::exit(2);
        }
    };
    let result = run(cli);
    report_peak_heap();
    if let Err(e) = result {
        eprintln!("error: {}", one_line(&e.to_string()));
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod fuzz;
