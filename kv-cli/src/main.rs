//! The `kv` command: generate and benchmark (training, evaluation and conversion come later) on
//! any backend compiled into this build.

mod backend;
mod bench;
mod generate;
mod model_source;

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
}

fn run(cli: Cli) -> Result<()> {
    let device = cli.device.unwrap_or_else(DeviceKind::default_compiled);
    match cli.command {
        Command::Generate(args) => run_on(device, args),
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
