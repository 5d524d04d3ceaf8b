//! The `convnet` command-line tool.

use clap::{Parser, Subcommand};

/// Train, evaluate and inspect convolutional neural networks.
#[derive(Parser)]
#[command(name = "convnet", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the layer table of the tutorial CNN for an input shape.
    Summary,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Summary => {
            println!("convnet {}", env!("CARGO_PKG_VERSION"));
        }
    }
    Ok(())
}
