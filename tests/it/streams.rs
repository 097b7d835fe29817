//! UpsertStream is a core transaction (issue 7, hole 2): a client that cancels part-way
//! and a shutdown whose grace runs out with the stream still open both leave nothing of
//! the stream behind, over the wire and after a restart.

use std::time::{Duration, Instant};

use crate::common::*;
use likeness::grpc::pb;
use tokio_stream::wrappers::ReceiverStream;

/// 100 committed items b0..b99; then a stream message that replaces b0..b9 and adds
/// s0..s49.
/// Something that serves likeness.v1 at a URL: an in-process server or a daemon.
trait Served {
    fn url(&self) -> String;
}

impl Served for TestServer {
    fn url(&self) -> String {
        TestServer::url(self)
    }
}

struct Remote(String);

impl Served for Remote {
    fn url(&self) -> String {
        self.0.clone()
    }
}

async fn items_client(
    s: &impl Served,
) -> likeness::grpc::pb::items_client::ItemsClient<tonic::transport::Channel> {
    likeness::grpc::pb::items_client::ItemsClient::new(channel(&s.url()).await)
}

async fn colls_client(
    s: &impl Served,
) -> likeness::grpc::pb::collections_client::CollectionsClient<tonic::transport::Channel> {
    likeness::grpc::pb::collections_client::CollectionsClient::new(channel(&s.url()).await)
}

async fn base_and_open_stream(
    server: &impl Served,
) -> (tokio::sync::mpsc::Sender<pb::UpsertRequest>, Client) {
    let mut c = colls_client(server).await;
    create(&mut c, "s", 2, pb::Metric::L2).await;
    let mut items = items_client(server).await;
    items
        .upsert(pb::UpsertRequest {
            collection: "s".into(),
            items: (0..100)
                .map(|i| item(&format!("b{i}"), "base", vec![1.0, i as f32]))
                .collect(),
        })
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let call = Client::start(server.url(), rx);
    let mut msg: Vec<pb::Item> = (0..10)
        .map(|i| item(&format!("b{i}"), "stream", vec![9.0, i as f32]))
        .collect();
    msg.extend((0..50).map(|i| item(&format!("s{i}"), "stream", vec![2.0, i as f32])));
    tx.send(pb::UpsertRequest {
        collection: "s".into(),
        items: msg,
    })
    .await
    .unwrap();
    // The message is applied (visible) before the stream ends.
    wait_for(server, "the staged message to be visible", |n, _| n == 150).await;
    (tx, call)
}

/// A streaming client on a thread and runtime of its own: `go_away` drops its runtime,
/// and with it the connection, as a client process that dies or is killed would.
struct Client {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Client {
    fn start(url: String, rx: tokio::sync::mpsc::Receiver<pb::UpsertRequest>) -> Client {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut items =
                    likeness::grpc::pb::items_client::ItemsClient::new(channel(&url).await);
                tokio::select! {
                    _ = items.upsert_stream(ReceiverStream::new(rx)) => {}
                    _ = stopped => {}
                }
            });
            drop(rt);
        });
        Client {
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn go_away(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.thread.take().unwrap().join().unwrap();
    }
}

/// Polls the collection's count and b0's label until `ok` holds (10 s at most).
async fn wait_for(server: &impl Served, what: &str, ok: impl Fn(u64, &str) -> bool) {
    let mut c = colls_client(server).await;
    let mut items = items_client(server).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = count(&mut c, "s").await;
        let label = get(&mut items, "s", vec!["b0".into()], false).await[0]
            .label
            .clone();
        if ok(n, &label) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {n}, {label}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The index holds exactly the store's keys after an undo.
async fn assert_index_exact(server: &mut TestServer) {
    let app = server.app().await;
    let audit = app
        .registry()
        .collection("s")
        .unwrap()
        .audit_index()
        .unwrap();
    assert!(audit.is_exact(), "{audit:?}");
}

async fn assert_base_only(server: &impl Served) {
    let mut c = colls_client(server).await;
    assert_eq!(count(&mut c, "s").await, 100);
    let got = get(
        &mut items_client(server).await,
        "s",
        (0..100)
            .map(|i| format!("b{i}"))
            .chain((0..50).map(|i| format!("s{i}")))
            .collect(),
        true,
    )
    .await;
    assert_eq!(got.len(), 100, "no id of the stream remains");
    for (i, it) in got.iter().enumerate() {
        assert_eq!(it.id, format!("b{i}"));
        assert_eq!(
            (it.label.as_str(), it.vector.as_slice()),
            ("base", &[1.0, i as f32][..])
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_stream_leaves_nothing_behind() {
    let (mut server, _dir) = TestServer::light().await;
    let (tx, call) = base_and_open_stream(&server).await;
    // The client goes away mid-stream without ending it.
    call.go_away();
    wait_for(&server, "the rollback", |n, label| {
        n == 100 && label == "base"
    })
    .await;
    drop(tx);
    assert_base_only(&server).await;
    assert_index_exact(&mut server).await;
    // Durably: a restart (snapshot or not) shows the same.
    let dir = server.dir.clone();
    server.stop().await;
    let server = TestServer::light_in(&dir, |_| {}).await;
    assert_base_only(&server).await;
    server.stop().await;
}

/// The real binary: SIGTERM with a stream still open, a grace period that runs out,
/// and the process gone. The stream's staged message must not survive the restart
/// (before the fix, shutdown flushed it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_a_stream_still_open_leaves_nothing_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = spawn_daemon(dir.path(), &["--shutdown-grace-secs", "1"], &[]);
    let url = format!("http://{}", daemon.addr);
    wait_serving(&url).await;
    let server = Remote(url.clone());
    let (tx, call) = base_and_open_stream(&server).await;
    let pid = daemon.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = daemon.child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(
        daemon
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("rolled back streams still open at shutdown")),
        "the shutdown undid the open stream"
    );
    drop(tx);
    call.go_away();
    let mut daemon = spawn_daemon(dir.path(), &[], &[]);
    let url = format!("http://{}", daemon.addr);
    wait_serving(&url).await;
    assert_base_only(&Remote(url)).await;
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
}

/// Issue 20, fault 4: open streams are bounded (`--max-streams`). Beyond the bound a new
/// stream is RESOURCE_EXHAUSTED naming the setting, unary calls go on, and a stream that
/// closes (or whose client goes away) gives its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_are_bounded_and_give_their_place_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::light_in(dir.path(), |c| c.max_streams = 3).await;
    let app = server.app().await;
    let mut colls = server.collections().await;
    create(&mut colls, "s", 4, pb::Metric::Cosine).await;
    let mut items = server.items().await;

    // Three UpsertStreams held open, each with one message sent.
    let mut open = Vec::new();
    for i in 0..3 {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(pb::UpsertRequest {
            collection: "s".into(),
            items: vec![item(&format!("o{i}"), "a", vec![1.0, 0.0, 0.0, i as f32])],
        })
        .await
        .unwrap();
        let mut client = items.clone();
        let call = tokio::spawn(async move { client.upsert_stream(ReceiverStream::new(rx)).await });
        open.push((tx, call));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.metrics().streams.open() < 3 {
        assert!(Instant::now() < deadline, "three streams never opened");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // A fourth is refused at once, whatever its kind; a unary call is not.
    let (_tx4, rx4) = tokio::sync::mpsc::channel::<pb::UpsertRequest>(1);
    let err = items
        .upsert_stream(ReceiverStream::new(rx4))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("--max-streams"), "{}", err.message());
    let mut miner = pb::miner_client::MinerClient::new(channel(&server.url()).await);
    let err = miner
        .mine_triplets(pb::MineRequest {
            collection: "s".into(),
            strategy: pb::Strategy::Hard as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    items
        .get(pb::GetRequest {
            collection: "s".into(),
            ids: vec!["nope".into()],
            ..Default::default()
        })
        .await
        .unwrap();

    // One closes by committing, one by its client going away: two places come back.
    let (tx, call) = open.pop().unwrap();
    drop(tx);
    call.await.unwrap().unwrap();
    let (tx, call) = open.pop().unwrap();
    call.abort();
    drop(tx);
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.metrics().streams.open() > 1 {
        assert!(
            Instant::now() < deadline,
            "closed streams kept their places"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    drop(tx);
    items
        .upsert_stream(ReceiverStream::new(rx))
        .await
        .expect("a place came back");
    drop(open);
    server.stop().await;
}
