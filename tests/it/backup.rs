//! Issue 8, backup and restore: an online backup while writers keep writing, restored
//! into a new data dir that then serves every write acknowledged before the backup and
//! nothing that was never acknowledged; the CLI round trip; bad paths; a disk that
//! fills during a backup.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use likeness::grpc::pb;
use likeness::grpc::pb::admin_client::AdminClient;
use likeness::grpc::pb::items_client::ItemsClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::common::store::{DIM, Tmpfs, full_item, vector_of};
use crate::common::*;

/// Every item of a collection, by id (ids `prefix0` .. `prefix{upto}`).
async fn items_by_id(
    items: &mut ItemsClient<Channel>,
    collection: &str,
    ids: &[String],
) -> HashMap<String, pb::Item> {
    let mut out = HashMap::new();
    for chunk in ids.chunks(1000) {
        for it in get(items, collection, chunk.to_vec(), true).await {
            out.insert(it.id.clone(), it);
        }
    }
    out
}

/// What a writer had acknowledged: (collection, id, item number).
type Acked = Arc<Mutex<Vec<(String, String, usize)>>>;

async fn backup(url: &str, path: &str) -> Result<pb::BackupInfo, tonic::Status> {
    AdminClient::new(channel(url).await)
        .backup(pb::BackupRequest { path: path.into() })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_online_backup_restores_every_acknowledged_write_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = TestServer::light_in(&data, |_| {}).await;
    let url = server.url();
    let mut colls = server.collections().await;
    let mut items = server.items().await;
    for name in ["a", "b"] {
        create(&mut colls, name, DIM as u32, pb::Metric::L2).await;
    }
    // A first load, then writers that keep upserting (and replacing) in both.
    let acked: Acked = Arc::default();
    for (name, base) in [("a", 0), ("b", 100_000)] {
        let batch: Vec<_> = (0..2000)
            .map(|i| full_item(&format!("{name}{i}"), base + i))
            .collect();
        upsert_ok(&mut items, name, batch).await;
        let mut a = acked.lock().unwrap();
        a.extend((0..2000).map(|i| (name.to_string(), format!("{name}{i}"), base + i)));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let attempted: Acked = Arc::default();
    let writers: Vec<_> = [("a", 0usize), ("b", 100_000)]
        .into_iter()
        .map(|(name, base)| {
            let (url, acked, attempted, stop) =
                (url.clone(), acked.clone(), attempted.clone(), stop.clone());
            tokio::spawn(async move {
                let mut items = ItemsClient::connect(url).await.unwrap();
                let mut round = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    // New ids, and replacements of old ones with new vectors.
                    let batch: Vec<(String, usize)> = (0..20)
                        .map(|i| {
                            let n = base + 2000 + round * 20 + i;
                            let id = if i % 4 == 0 {
                                format!("{name}{}", (round * 7 + i) % 2000)
                            } else {
                                format!("{name}{n}")
                            };
                            (id, n)
                        })
                        .collect();
                    attempted.lock().unwrap().extend(
                        batch
                            .iter()
                            .map(|(id, n)| (name.to_string(), id.clone(), *n)),
                    );
                    upsert_ok(
                        &mut items,
                        name,
                        batch.iter().map(|(id, n)| full_item(id, *n)).collect(),
                    )
                    .await;
                    acked
                        .lock()
                        .unwrap()
                        .extend(batch.into_iter().map(|(id, n)| (name.to_string(), id, n)));
                    round += 1;
                }
                round
            })
        })
        .collect();
    // The writers have had batches acknowledged (beyond the first load) before the
    // backup starts: it runs while they write.
    let loaded = acked.lock().unwrap().len();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while acked.lock().unwrap().len() < loaded + 20 * writers.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "the writers never wrote"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }

    // Bad paths first, while the writers run.
    let err = backup(&url, "relative/dir").await.unwrap_err();
    assert_status(
        "relative",
        &err,
        Code::InvalidArgument,
        &["path", "absolute"],
    );
    let inside = data.join("backup");
    let err = backup(&url, inside.to_str().unwrap()).await.unwrap_err();
    assert_status("inside", &err, Code::InvalidArgument, &["path", "data dir"]);
    let full = dir.path().join("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("x"), b"x").unwrap();
    let err = backup(&url, full.to_str().unwrap()).await.unwrap_err();
    assert_status(
        "non-empty",
        &err,
        Code::FailedPrecondition,
        &["path", "not empty"],
    );
    assert!(full.join("x").exists(), "a refused backup touches nothing");

    let before: Vec<_> = acked.lock().unwrap().clone();
    let to = dir.path().join("backup");
    let info = backup(&url, to.to_str().unwrap()).await.unwrap();
    // Whatever a writer sends from here on cannot be in the backup.
    let sent_by_end: std::collections::HashSet<(String, String, usize)> =
        attempted.lock().unwrap().iter().cloned().collect();
    // The writers go on after the backup: wait until one more batch of theirs is
    // acknowledged, which the backup must not hold.
    let acked_at_end = acked.lock().unwrap().len();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while acked.lock().unwrap().len() == acked_at_end {
        assert!(std::time::Instant::now() < deadline, "the writers stopped");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut rounds = 0;
    for w in writers {
        rounds += w.await.unwrap();
    }
    assert!(rounds > 10, "the writers kept writing ({rounds} batches)");
    eprintln!(
        "backup: {} items in {:.3} s, {} bytes, longest pause {:.3} s",
        info.items, info.seconds, info.bytes, info.longest_pause_seconds
    );
    let reported: BTreeMap<String, u64> = info
        .collections
        .iter()
        .map(|c| (c.name.clone(), c.items))
        .collect();
    assert_eq!(reported.keys().collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(info.items, reported.values().sum::<u64>());
    assert!(info.bytes > 0);
    server.stop().await;

    // Restore into a new data dir and serve it.
    let restored = dir.path().join("restored");
    let manifest = likeness::store::backup::restore(&to, &restored).unwrap();
    assert_eq!(manifest.collections.len(), 2);
    let server = TestServer::light_in(&restored, |_| {}).await;
    assert_eq!(
        health(&server.url(), "likeness.v1.Items").await,
        1,
        "the restored daemon is SERVING"
    );
    let mut colls = server.collections().await;
    let mut items = server.items().await;
    let mut latest_before: HashMap<(String, String), usize> = HashMap::new();
    for (c, id, n) in &before {
        latest_before.insert((c.clone(), id.clone()), *n);
    }
    let mut sent: HashMap<(String, String), Vec<usize>> = HashMap::new();
    for (c, id, n) in acked
        .lock()
        .unwrap()
        .iter()
        .chain(attempted.lock().unwrap().iter())
    {
        sent.entry((c.clone(), id.clone())).or_default().push(*n);
    }
    for name in ["a", "b"] {
        let count = count(&mut colls, name).await;
        assert_eq!(
            count, reported[name],
            "{name}: count vs the backup's report"
        );
        let ids: Vec<String> = sent
            .keys()
            .filter(|(c, _)| c == name)
            .map(|(_, id)| id.clone())
            .collect();
        let got = items_by_id(&mut items, name, &ids).await;
        assert_eq!(
            got.len() as u64,
            count,
            "{name}: the restored items are all ids a writer sent"
        );
        // Each restored item is exactly a version sent before the backup returned.
        for (id, it) in &got {
            let n: usize = it.metadata["n"].parse().unwrap();
            let first_load = n % 100_000 < 2000;
            assert!(
                first_load || sent_by_end.contains(&(name.to_string(), id.clone(), n)),
                "{name}/{id}: version {n} was sent after the backup returned"
            );
            let expected = full_item(id, n);
            assert_eq!(it.vector, expected.vector, "{name}/{id}: vector");
            assert_eq!(it.label, expected.label, "{name}/{id}: label");
            assert_eq!(it.metadata, expected.metadata, "{name}/{id}: metadata");
            assert_eq!(
                it.generation, expected.generation,
                "{name}/{id}: generation"
            );
        }
        // Every id acknowledged before the backup, at that version or a newer one.
        for ((c, id), n_before) in latest_before.iter().filter(|((c, _), _)| c == name) {
            let it = got
                .get(id)
                .unwrap_or_else(|| panic!("{c}/{id}: acknowledged before the backup, missing"));
            let n: usize = it.metadata["n"].parse().unwrap();
            assert!(
                n >= *n_before,
                "{c}/{id}: restored version {n} is older than the acknowledged {n_before}"
            );
        }
        // Search works on the restored daemon, through the rebuilt index.
        let (id, n) = latest_before
            .iter()
            .find(|((c, _), _)| c == name)
            .map(|((_, id), n)| (id.clone(), *n))
            .unwrap();
        let n = got[&id].metadata["n"].parse::<usize>().unwrap().max(n);
        let hits = items
            .search(pb::SearchRequest {
                collection: name.into(),
                query: vector_query(vector_of(n)),
                k: 3,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .hits;
        assert_eq!(hits[0].id, id, "{name}: search finds the item");
        assert!(hits[0].distance < 1e-5);
    }
    server.stop().await;

    // Restore refuses a data dir that is not empty.
    let err = likeness::store::backup::restore(&to, &restored).unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
}

/// `likeness backup` against a running daemon, `likeness restore`, then `likeness
/// serve` on the restored dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_backup_restore_serve() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let daemon = spawn_daemon(&data, &[], &[]);
    let url = format!("http://{}", daemon.addr);
    wait_serving(&url).await;
    let mut colls = pb::collections_client::CollectionsClient::new(channel(&url).await);
    create(&mut colls, "c", DIM as u32, pb::Metric::Cosine).await;
    let mut items = ItemsClient::new(channel(&url).await);
    upsert_ok(
        &mut items,
        "c",
        (0..300).map(|i| full_item(&format!("c{i}"), i)).collect(),
    )
    .await;
    let to = dir.path().join("bk");
    let run = |args: Vec<String>| async move {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_likeness"));
        cmd.args(&args);
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (ok, out, err) = run(vec![
        "--addr".into(),
        url.clone(),
        "backup".into(),
        "--to".into(),
        s(&to),
    ])
    .await;
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["collections"]["c"], 300, "{out}");
    // The same path again: it is not empty now.
    let (ok, _, err) = run(vec![
        "--addr".into(),
        url.clone(),
        "backup".into(),
        "--to".into(),
        s(&to),
    ])
    .await;
    assert!(!ok);
    assert!(
        err.contains("FailedPrecondition") && err.contains("path"),
        "{err}"
    );
    drop(daemon);

    let restored = dir.path().join("restored");
    let (ok, out, err) = run(vec![
        "restore".into(),
        "--from".into(),
        s(&to),
        "--data-dir".into(),
        s(&restored),
    ])
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("\"items\":300"), "{out}");
    let (ok, _, err) = run(vec![
        "restore".into(),
        "--from".into(),
        s(&to),
        "--data-dir".into(),
        s(&restored),
    ])
    .await;
    assert!(!ok && err.contains("not empty"), "{err}");
    // Not a backup.
    let (ok, _, err) = run(vec![
        "restore".into(),
        "--from".into(),
        s(&data),
        "--data-dir".into(),
        s(&dir.path().join("other")),
    ])
    .await;
    assert!(!ok && err.contains("not a likeness backup"), "{err}");
    assert!(!dir.path().join("other").exists());

    let daemon = spawn_daemon(&restored, &[], &[]);
    let url = format!("http://{}", daemon.addr);
    wait_serving(&url).await;
    let mut colls = pb::collections_client::CollectionsClient::new(channel(&url).await);
    assert_eq!(count(&mut colls, "c").await, 300);
    let mut items = ItemsClient::new(channel(&url).await);
    let got = get(&mut items, "c", vec!["c7".into()], true).await;
    assert_eq!(got[0].vector, vector_of(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_that_fills_its_disk_fails_cleanly_and_leaves_nothing() {
    let Some(fs) = Tmpfs::mount("2m") else {
        return;
    };
    let (server, _dir) = TestServer::light().await;
    let mut colls = server.collections().await;
    let mut items = server.items().await;
    create(&mut colls, "big", 256, pb::Metric::L2).await;
    let batch: Vec<_> = (0..4000)
        .map(|i| item(&format!("x{i}"), "l", vec![i as f32; 256]))
        .collect();
    upsert_ok(&mut items, "big", batch).await;
    let to = fs.path.join("bk");
    let err = backup(&server.url(), to.to_str().unwrap())
        .await
        .unwrap_err();
    assert_status(
        "full",
        &err,
        Code::ResourceExhausted,
        &["no space", "removed"],
    );
    assert!(!to.exists(), "the partial backup is gone");
    // The daemon's own store is unaffected: writes go on.
    upsert_ok(&mut items, "big", vec![item("after", "l", vec![1.0; 256])]).await;
    server.stop().await;
}
