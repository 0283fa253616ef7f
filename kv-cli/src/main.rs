//! The `kv` command: train, evaluate, generate and benchmark (conversion comes later) on
//! any backend compiled into this build.

mod backend;
mod bench;
mod eval;
mod generate;
mod model_source;
mod train;

use backend::{DeviceKind, run_on};
use clap::{Parser, Subcommand};
use kv_core::Result;

/// KV-cache compression toolkit: train, generate, evaluate and benchmark small transformers.
#[derive(Debug, Parser)]
#[command(name = "kv", version)]
struct Cli {
    /// Backend to run on; only those compiled in are available (default: flex).
    #[arg(long, global = true, value_enum)]
    device: Option<DeviceKind>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate text from a random or saved model, printing tokens as they come.
    Generate(generate::GenerateArgs),
    /// Measure decode tokens/s against context length and KV heads; writes JSON and Markdown.
    Bench(bench::BenchArgs),
    /// Train a preset or config from scratch, resume a run, or fine-tune from a checkpoint.
    Train(train::TrainArgs),
    /// Evaluate a checkpoint on a long-context task or perplexity at a chosen context.
    Eval(eval::EvalArgs),
}

fn run(cli: Cli) -> Result<()> {
    let device = cli.device.unwrap_or_else(DeviceKind::default_compiled);
    match cli.command {
        Command::Generate(args) => run_on(device, args),
        Command::Train(args) => run_on(device, args),
        Command::Eval(args) => {
            let result = run_on(device, args)?;
            println!("{result}");
            Ok(())
        }
        Command::Bench(args) => {
            let out = args.out.clone();
            let cells = run_on(device, bench::DecodeBench { args, device })?;
            bench::write_results(&out, &cells)?;
            println!("{}", bench::markdown(&cells));
            eprintln!("wrote {} and {}", out.join("bench.json").display(), out.join("bench.md").display());
            Ok(())
        }
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
