//! `gatehouse projections status|rebuild`, on the store directly (a running server may be
//! running the projections meanwhile: see [`gatehouse_projections::runtime`]).

use crate::config::{FileConfig, ProjectionsArgs, ProjectionsCommand};
use gatehouse_events::readmodel::Statement;
use gatehouse_projections::runtime;

/// Runs the command.
pub async fn run(args: ProjectionsArgs, file: FileConfig) -> anyhow::Result<()> {
    let (_, url) = args.store.resolve(&file);
    let store = gatehouse_events::connect(&url).await?;
    let factories = gatehouse_projections::all();
    match args.command {
        ProjectionsCommand::Status => {
            for factory in &factories {
                let projection = factory();
                runtime::register(store.as_ref(), projection.as_ref()).await?;
                let rows = store
                    .read_model_query(Statement::new(
                        "SELECT p.generation, p.building, p.owner, p.lease_until, p.failure, \
                         coalesce(q.position, 0) FROM projections p LEFT JOIN projection_positions q \
                         ON q.name = p.name AND q.generation = p.generation WHERE p.name = ?",
                        vec![projection.name().into()],
                    ))
                    .await?;
                for row in rows {
                    println!(
                        "{}",
                        serde_json::json!({
                            "name": projection.name(),
                            "generation": row[0].int(),
                            "rebuilding": row[1].int(),
                            "owner": row[2].text(),
                            "lease_until_micros": row[3].int(),
                            "failure": row[4].text(),
                            "position": row[5].int(),
                        })
                    );
                }
            }
            Ok(())
        }
        ProjectionsCommand::Rebuild { name } => {
            let factory = factories
                .into_iter()
                .find(|f| f().name() == name)
                .ok_or_else(|| anyhow::anyhow!("no projection named '{name}'"))?;
            let started = std::time::Instant::now();
            let rebuilt = runtime::rebuild(&store, &factory).await?;
            println!(
                "{}",
                serde_json::json!({
                    "name": name,
                    "generation": rebuilt.generation,
                    "events": rebuilt.events,
                    "position": rebuilt.position,
                    "seconds": started.elapsed().as_secs_f64(),
                })
            );
            Ok(())
        }
    }
}
