//! Issue 8, disk full or a storage error: the failing write gets UNAVAILABLE with a
//! clear message, reads go on (and never show the failed write), nothing acknowledged
//! is lost, and writes resume by themselves once the storage recovers. Once with an
//! injected fault (always), once on a real, size-limited filesystem (where the machine
//! lets the test mount one).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use likeness::grpc::pb;
use likeness::grpc::pb::items_client::ItemsClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::common::store::{Tmpfs, full_item, vector_of};
use crate::common::*;

const DIM: u32 = 8;

async fn upsert(
    items: &mut ItemsClient<Channel>,
    ids: std::ops::Range<usize>,
) -> Result<(), tonic::Status> {
    items
        .upsert(pb::UpsertRequest {
            collection: "c".into(),
            items: ids.map(|n| full_item(&format!("i{n}"), n)).collect(),
        })
        .await
        .map(|_| ())
}

async fn nearest(items: &mut ItemsClient<Channel>, n: usize) -> pb::Hit {
    items
        .search(pb::SearchRequest {
            collection: "c".into(),
            query: vector_query(vector_of(n)),
            k: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .hits
        .remove(0)
}

async fn metric(app: &likeness::app::App, name: &str) -> f64 {
    let text = likeness::exporter::render(app);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not exported"))
}

/// Every acknowledged item is there with exactly its vector, label and metadata.
async fn assert_all_there(items: &mut ItemsClient<Channel>, acked: &[usize], when: &str) {
    let ids: Vec<String> = acked.iter().map(|n| format!("i{n}")).collect();
    let mut got: HashMap<String, pb::Item> = HashMap::new();
    for chunk in ids.chunks(1000) {
        for it in get(items, "c", chunk.to_vec(), true).await {
            got.insert(it.id.clone(), it);
        }
    }
    for n in acked {
        let id = format!("i{n}");
        let it = got
            .get(&id)
            .unwrap_or_else(|| panic!("{when}: acknowledged {id} is missing"));
        let want = full_item(&id, *n);
        assert_eq!(it.vector, want.vector, "{when}: {id}");
        assert_eq!(it.label, want.label, "{when}: {id}");
        assert_eq!(it.metadata, want.metadata, "{when}: {id}");
    }
}

async fn wait_writable(app: &likeness::app::App) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !app.registry().storage_writable() {
        assert!(
            Instant::now() < deadline,
            "writes never resumed after the storage recovered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Regression test for issue 8 (storage errors), with an injected flush failure: the
/// batch is in sled's memory but not on disk, as on a full disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_storage_error_refuses_writes_keeps_reads_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::light_in(dir.path(), |_| {}).await;
    let app = server.app().await;
    let mut colls = server.collections().await;
    let mut items = server.items().await;
    create(&mut colls, "c", DIM, pb::Metric::L2).await;
    upsert(&mut items, 0..200).await.unwrap();
    let mut acked: Vec<usize> = (0..200).collect();
    assert_eq!(metric(&app, "likeness_storage_writable").await, 1.0);

    app.registry().inject_storage_fault(true);
    // The batch that meets the failure: 200..210, new ids, and a replacement of i0.
    let err = items
        .upsert(pb::UpsertRequest {
            collection: "c".into(),
            items: (200..210)
                .map(|n| full_item(&format!("i{n}"), n))
                .chain([full_item("i0", 999)])
                .collect(),
        })
        .await
        .unwrap_err();
    assert_status(
        "failing write",
        &err,
        Code::Unavailable,
        &[
            "storage unavailable",
            "No space left on device",
            "writes resume when the data dir has space",
        ],
    );
    // Later writes are refused at once, deletes too.
    let started = Instant::now();
    let err = upsert(&mut items, 300..301).await.unwrap_err();
    assert_status(
        "next write",
        &err,
        Code::Unavailable,
        &["storage unavailable"],
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    let err = items
        .delete(pb::DeleteRequest {
            collection: "c".into(),
            ids: vec!["i1".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert_eq!(metric(&app, "likeness_storage_writable").await, 0.0);
    assert_eq!(metric(&app, "likeness_storage_failures_total").await, 1.0);

    // Reads go on, from what was acknowledged; the failed batch shows nowhere.
    assert_eq!(health(&server.url(), "likeness.v1.Items").await, 1);
    assert_all_there(&mut items, &acked, "during the failure").await;
    assert_eq!(count(&mut colls, "c").await, 200);
    let unacked = get(&mut items, "c", vec!["i200".into(), "i209".into()], true).await;
    assert!(unacked.is_empty(), "a failed write reads back: {unacked:?}");
    for n in [200, 205, 209] {
        let hit = nearest(&mut items, n).await;
        assert!(
            hit.distance > 1e-6,
            "search finds the failed write's vector {n} ({hit:?})"
        );
    }
    assert_eq!(nearest(&mut items, 0).await.id, "i0");
    assert!(nearest(&mut items, 0).await.distance < 1e-6);

    // The storage recovers: writes resume by themselves.
    app.registry().inject_storage_fault(false);
    wait_writable(&app).await;
    assert_eq!(metric(&app, "likeness_storage_writable").await, 1.0);
    upsert(&mut items, 400..450).await.unwrap();
    acked.extend(400..450);
    // A failed write's outcome is unknown to its client, as after a timeout: sled may
    // have written the batch after all (an injected fault leaves it in sled's memory,
    // which the reopen flushes). Whole or not at all, and the index follows the store.
    let failed: Vec<String> = (200..210).map(|n| format!("i{n}")).collect();
    let back = get(&mut items, "c", failed, true).await;
    let i0: usize = get(&mut items, "c", vec!["i0".into()], false).await[0].metadata["n"]
        .parse()
        .unwrap();
    if back.is_empty() {
        assert_eq!(i0, 0, "i0's replacement came back without its batch");
    } else {
        assert_eq!(back.len(), 10, "part of the failed batch came back");
        assert_eq!(
            i0, 999,
            "the failed batch came back without i0's replacement"
        );
        acked.extend(200..210);
    }
    // i0 is checked on its own from here: its version is the one the store settled on.
    acked.retain(|n| *n != 0);
    assert_all_there(&mut items, &acked, "after recovery").await;
    eprintln!("the failed batch reached the disk: {}", !back.is_empty());
    let coll = app.registry().collection("c").unwrap();
    assert!(coll.audit_index().unwrap().is_exact(), "index = store");
    assert!(
        get(&mut items, "c", vec!["i300".into()], false)
            .await
            .is_empty()
    );
    drop(coll);
    drop(app);
    server.stop().await;

    // A restart has every acknowledged write.
    let server = TestServer::light_in(dir.path(), |_| {}).await;
    let mut items = server.items().await;
    assert_all_there(&mut items, &acked, "after a restart").await;
    let it = get(&mut items, "c", vec!["i0".into()], true)
        .await
        .remove(0);
    assert_eq!(it.vector, full_item("i0", i0).vector, "i0 after a restart");
    server.stop().await;
}

/// Regression test for issue 8 (disk full), on a real 8 MiB filesystem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_keeps_reads_and_recovers_when_space_returns() {
    let Some(fs) = Tmpfs::mount("8m") else {
        return;
    };
    let data = fs.path.join("data");
    let mut server = TestServer::light_in(&data, |c| c.cache_mb = 8).await;
    let app = server.app().await;
    let mut colls = server.collections().await;
    let mut items = server.items().await;
    create(&mut colls, "c", DIM, pb::Metric::L2).await;
    let mut acked = Vec::new();
    for b in 0..4 {
        upsert(&mut items, b * 50..(b + 1) * 50).await.unwrap();
        acked.extend(b * 50..(b + 1) * 50);
    }
    let filler = fs.fill();
    // Writes go on until sled needs a page the disk does not have.
    let mut failed = None;
    for b in 4..200 {
        match upsert(&mut items, b * 50..(b + 1) * 50).await {
            Ok(()) => acked.extend(b * 50..(b + 1) * 50),
            Err(e) => {
                failed = Some((b, e));
                break;
            }
        }
    }
    let (b, err) = failed.expect("a write failed on the full disk");
    // Whatever sled gave back when its write failed is taken too, so that the storage
    // probe does not find room before the test frees it.
    let filler2 = fs.fill_as("filler2");
    eprintln!("the full disk failed batch {b}: {}", err.message());
    assert_status(
        "full disk",
        &err,
        Code::Unavailable,
        &[
            "storage unavailable",
            "No space left on device",
            "writes resume when the data dir has space",
        ],
    );
    // sled may give space back after its write failed (a truncated log tail), and the
    // storage probe may find it before the filler above took it: then writes have
    // rightly resumed already. Otherwise they are refused at once.
    let mut still_full = !app.registry().storage_writable();
    if still_full {
        match upsert(&mut items, 20_000..20_001).await {
            Err(err) => assert_eq!(err.code(), Code::Unavailable, "{}", err.message()),
            Ok(()) => {
                assert!(app.registry().storage_writable(), "a write while refusing");
                acked.push(20_000);
                still_full = false;
            }
        }
    }
    if !still_full {
        eprintln!("the storage probe found room sled gave back; writes resumed early");
    }

    // Reads go on.
    assert_eq!(health(&server.url(), "likeness.v1.Items").await, 1);
    assert_all_there(&mut items, &acked, "disk full").await;
    let failed_ids: Vec<String> = (b * 50..(b + 1) * 50).map(|n| format!("i{n}")).collect();
    let seen = get(&mut items, "c", failed_ids.clone(), false).await;
    if !app.registry().storage_writable() {
        assert!(seen.is_empty(), "a failed write reads back");
        assert!(nearest(&mut items, b * 50).await.distance > 1e-6);
    } else {
        assert!(
            seen.is_empty() || seen.len() == 50,
            "part of a failed batch"
        );
    }
    assert_eq!(
        nearest(&mut items, acked[7]).await.id,
        format!("i{}", acked[7])
    );

    // Space returns: writes resume by themselves.
    std::fs::remove_file(&filler).unwrap();
    std::fs::remove_file(&filler2).unwrap();
    wait_writable(&app).await;
    upsert(&mut items, 30_000..30_050).await.unwrap();
    acked.extend(30_000..30_050);
    assert_all_there(&mut items, &acked, "space back").await;
    let coll = app.registry().collection("c").unwrap();
    assert!(coll.audit_index().unwrap().is_exact(), "index = store");
    drop(coll);
    drop(app);
    server.stop().await;

    let server = TestServer::light_in(&data, |c| c.cache_mb = 8).await;
    let mut items = server.items().await;
    assert_all_there(&mut items, &acked, "after a restart").await;
    let back = get(&mut items, "c", failed_ids, false).await;
    assert!(
        back.is_empty() || back.len() == 50,
        "the failed batch is whole or absent"
    );
    server.stop().await;
}
