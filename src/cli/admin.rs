//! `likeness backup` (asks a running daemon for an online backup) and `likeness
//! restore` (offline: a backup into a new data dir, which `likeness serve` then serves).

use std::path::PathBuf;

use crate::grpc::pb;
use crate::grpc::pb::admin_client::AdminClient;

#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub conn: crate::cli::ConnectArgs,
    /// Directory for the backup on the DAEMON's machine (absolute; absent or empty;
    /// outside its data dir). Copy it off the machine afterwards.
    #[arg(long)]
    pub to: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// A directory written by `likeness backup`.
    #[arg(long)]
    pub from: PathBuf,
    /// The data dir to create (absent or empty); then `likeness serve --data-dir` it.
    #[arg(long, env = "LIKENESS_DATA_DIR")]
    pub data_dir: PathBuf,
}

/// Prints the backup's summary as JSON.
pub async fn backup(daemon: &super::Daemon, args: BackupArgs) -> Result<(), String> {
    let mut client = AdminClient::new(super::connect(daemon).await?);
    let info = client
        .backup(pb::BackupRequest {
            path: args.to.display().to_string(),
        })
        .await
        .map_err(super::status)?
        .into_inner();
    let collections = items_by_name(info.collections.iter().map(|c| (&c.name, c.items)));
    println!(
        "{}",
        serde_json::json!({
            "path": info.path,
            "collections": collections,
            "items": info.items,
            "bytes": info.bytes,
            "seconds": info.seconds,
            "longest_pause_seconds": info.longest_pause_seconds,
        })
    );
    Ok(())
}

/// Restores offline; prints what the backup held as JSON.
pub fn restore(args: RestoreArgs) -> Result<(), String> {
    let manifest = crate::store::backup::restore(&args.from, &args.data_dir)
        .map_err(|e| format!("restore from {}: {e}", args.from.display()))?;
    let collections = items_by_name(manifest.collections.iter().map(|c| (&c.name, c.items)));
    println!(
        "{}",
        serde_json::json!({
            "restored": args.data_dir.display().to_string(),
            "collections": collections,
            "items": manifest.collections.iter().map(|c| c.items).sum::<u64>(),
        })
    );
    Ok(())
}

/// `{"name": items, ...}` for the JSON summaries.
fn items_by_name<'a>(
    collections: impl Iterator<Item = (&'a String, u64)>,
) -> serde_json::Map<String, serde_json::Value> {
    collections
        .map(|(name, items)| (name.clone(), items.into()))
        .collect()
}
