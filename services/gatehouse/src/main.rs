//! The `gatehouse` command: `serve`, `migrate`, `bench`, `audit`.

use clap::Parser;
use gatehouse::config::{Cli, Command, Config, FileConfig};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let file = FileConfig::load(cli.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Serve(args) => {
            runtime.block_on(gatehouse::server::serve(Config::resolve(*args, file)?))
        }
        Command::Migrate(args) => runtime.block_on(async {
            let (_, url) = args.resolve(&file);
            let store = gatehouse_events::connect(&url).await?;
            println!("migrations applied ({} store)", store.backend());
            Ok(())
        }),
        Command::Bench(args) => runtime.block_on(gatehouse::bench::run(args)),
        Command::Projections(args) => runtime.block_on(gatehouse::projections_cli::run(args, file)),
        Command::Audit(args) => {
            let code = runtime.block_on(gatehouse::audit::run_cli(args, file))?;
            std::process::exit(code);
        }
    }
}
