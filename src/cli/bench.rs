//! `likeness bench`: measures the daemon beside its references in one run.

#[derive(Debug, clap::Args)]
pub struct BenchArgs {}

pub async fn run(_args: BenchArgs) -> Result<(), String> {
    Err("not yet".into())
}
