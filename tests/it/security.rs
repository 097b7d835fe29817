//! TLS, mutual TLS, certificate reload and bearer tokens (issue 8, security), each
//! against a real server; the certificates are made here, by rcgen, for every test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use likeness::cli::ConnectArgs;
use likeness::grpc::client::Channel;
use likeness::grpc::pb;
use likeness::grpc::pb::collections_client::CollectionsClient;
use likeness::grpc::pb::items_client::ItemsClient;
use likeness::grpc::pb::miner_client::MinerClient;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::common::*;

const READ_TOKEN: &str = "r3ad-t0ken-5f1c2e";
const WRITE_TOKEN: &str = "wr1te-t0ken-9a7d04";

/// A certificate authority made for one test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// A certificate for 127.0.0.1 and localhost, for a server or a client:
    /// (certificate PEM, key PEM).
    fn issue(&self, name: &str, usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes the CA's certificate, and a server certificate with its key, into `dir`
    /// under `name`: (ca, cert, key).
    fn write_server(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
        let (cert, key) = self.issue(name, ExtendedKeyUsagePurpose::ServerAuth);
        (
            write(dir, &format!("{name}-ca.pem"), &self.issuer.pem()),
            write(dir, &format!("{name}.pem"), &cert),
            write(dir, &format!("{name}.key"), &key),
        )
    }

    /// A client certificate and key in `dir`: the connection flags that present them.
    fn write_client(&self, dir: &Path, name: &str, ca: &Path) -> ConnectArgs {
        let (cert, key) = self.issue(name, ExtendedKeyUsagePurpose::ClientAuth);
        ConnectArgs {
            tls_ca: Some(ca.to_path_buf()),
            tls_cert: Some(write(dir, &format!("{name}.pem"), &cert)),
            tls_key: Some(write(dir, &format!("{name}.key"), &key)),
            token: None,
        }
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn trusting(ca: &Path) -> ConnectArgs {
    ConnectArgs {
        tls_ca: Some(ca.to_path_buf()),
        ..Default::default()
    }
}

fn with_token(token: &str) -> ConnectArgs {
    ConnectArgs {
        token: Some(token.into()),
        ..Default::default()
    }
}

/// Waits until `service` is SERVING, asked over a connection made with `conn`.
async fn wait_for(url: &str, conn: &ConnectArgs, service: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(ch) = conn.connect(url).await {
            let r = HealthClient::new(ch)
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await;
            if r.is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32) {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{service} at {url} never became SERVING"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A ListCollections over a new connection made with `conn`: Ok, or why not.
async fn list_over(url: &str, conn: &ConnectArgs) -> Result<usize, String> {
    let ch = conn.connect(url).await?;
    list_on(&ch).await
}

async fn list_on(ch: &Channel) -> Result<usize, String> {
    CollectionsClient::new(ch.clone())
        .list_collections(pb::ListCollectionsRequest {})
        .await
        .map(|r| r.into_inner().collections.len())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

/// A plaintext client: connecting and calling must fail somewhere.
async fn plaintext_list(url: &str) -> Result<usize, String> {
    let ch = tonic::transport::Channel::from_shared(url.to_string())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    CollectionsClient::new(ch)
        .list_collections(pb::ListCollectionsRequest {})
        .await
        .map(|r| r.into_inner().collections.len())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

#[tokio::test]
async fn tls_serves_clients_that_trust_its_ca_and_refuses_plaintext_and_other_cas() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = Ca::new("likeness test CA").write_server(dir.path(), "server");
    let (other_ca, ..) = Ca::new("some other CA").write_server(dir.path(), "other");
    let server = TestServer::light_recovering(&dir.path().join("data"), |c| {
        c.tls_cert = Some(cert.clone());
        c.tls_key = Some(key.clone());
    })
    .await;
    let url = server.url();
    wait_for(&url, &trusting(&ca), "likeness.v1.Items").await;

    // A client that connects and never says a word holds up no one else's handshake.
    let silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let started = std::time::Instant::now();
    assert_eq!(list_over(&url, &trusting(&ca)).await, Ok(0));
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(silent);

    // https:// in the address works as well as --tls-ca with http://.
    let https = url.replace("http://", "https://");
    assert_eq!(list_over(&https, &trusting(&ca)).await, Ok(0));

    let plain = plaintext_list(&url).await;
    assert!(plain.is_err(), "a plaintext client was served: {plain:?}");
    let wrong = list_over(&url, &trusting(&other_ca)).await;
    assert!(wrong.is_err(), "a client trusting another CA connected");
    assert!(
        wrong.unwrap_err().contains("certificate"),
        "the error says why"
    );
    server.stop().await;
}

#[tokio::test]
async fn mutual_tls_serves_only_clients_with_a_certificate_from_its_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = Ca::new("server CA").write_server(dir.path(), "server");
    let clients_ca = Ca::new("clients CA");
    let clients_ca_pem = write(dir.path(), "clients-ca.pem", &clients_ca.issuer.pem());
    let good = clients_ca.write_client(dir.path(), "good-client", &ca);
    let stranger = Ca::new("stranger CA").write_client(dir.path(), "stranger", &ca);
    let server = TestServer::light_recovering(&dir.path().join("data"), |c| {
        c.tls_cert = Some(cert.clone());
        c.tls_key = Some(key.clone());
        c.tls_client_ca = Some(clients_ca_pem.clone());
    })
    .await;
    let url = server.url();
    wait_for(&url, &good, "likeness.v1.Items").await;

    assert_eq!(list_over(&url, &good).await, Ok(0));
    let anonymous = list_over(&url, &trusting(&ca)).await;
    assert!(anonymous.is_err(), "served a client without a certificate");
    let other = list_over(&url, &stranger).await;
    assert!(
        other.is_err(),
        "served a client certificate from another CA"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_reload_serves_new_connections_the_new_certificate_and_keeps_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_a, cert, key) = Ca::new("CA A").write_server(dir.path(), "server");
    let server = TestServer::light_recovering(&dir.path().join("data"), |c| {
        c.tls_cert = Some(cert.clone());
        c.tls_key = Some(key.clone());
    })
    .await;
    let url = server.url();
    wait_for(&url, &trusting(&ca_a), "likeness.v1.Items").await;
    let before = trusting(&ca_a).connect(&url).await.unwrap();
    assert_eq!(list_on(&before).await, Ok(0));

    // Certificate B, from another CA, written over the same files (as a Secret update
    // or cert-manager does), then the reload.
    let (ca_b, cert_b, key_b) = Ca::new("CA B").write_server(dir.path(), "next");
    std::fs::copy(&cert_b, &cert).unwrap();
    std::fs::copy(&key_b, &key).unwrap();
    server.reloader.reload().unwrap();

    assert_eq!(list_over(&url, &trusting(&ca_b)).await, Ok(0));
    let old_ca = list_over(&url, &trusting(&ca_a)).await;
    assert!(old_ca.is_err(), "a new connection still got certificate A");
    // The connection made before the reload keeps working (it would fail to reconnect,
    // since it trusts only CA A).
    assert_eq!(list_on(&before).await, Ok(0));

    // A broken file: the reload fails, says which file, and B stays in force.
    std::fs::write(&cert, "not a certificate").unwrap();
    let err = server.reloader.reload().unwrap_err();
    assert!(
        err.contains("--tls-cert") && err.contains("server.pem"),
        "{err}"
    );
    assert_eq!(list_over(&url, &trusting(&ca_b)).await, Ok(0));
    std::fs::remove_file(&key).unwrap();
    let err = server.reloader.reload().unwrap_err();
    assert!(err.contains("--tls-"), "{err}");
    assert_eq!(list_over(&url, &trusting(&ca_b)).await, Ok(0));
    server.stop().await;
}

fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    r.map_or_else(|s| s.code(), |_| Code::Ok)
}

/// Every kind of call with `token` (or none): the codes, in a fixed order.
async fn calls_with(url: &str, token: Option<&str>) -> Vec<(&'static str, Code)> {
    let conn = token.map(with_token).unwrap_or_default();
    let ch = conn.connect(url).await.unwrap();
    let mut colls = CollectionsClient::new(ch.clone());
    let mut items = ItemsClient::new(ch.clone());
    let mut miner = MinerClient::new(ch.clone());
    let vectors = [[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]];
    let batch: Vec<pb::Item> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| item(&format!("i{i}"), &format!("l{}", i / 2), v.to_vec()))
        .collect();
    let upsert = pb::UpsertRequest {
        collection: "sec".into(),
        items: batch,
    };
    let mine = pb::MineRequest {
        collection: "sec".into(),
        strategy: pb::Strategy::Hard as i32,
        batch_size: 8,
        seed: 7,
        ..Default::default()
    };
    let mut out = vec![];
    let create = colls
        .create_collection(pb::CreateCollectionRequest {
            name: "scratch".into(),
            dimension: 2,
            metric: pb::Metric::Cosine as i32,
            ..Default::default()
        })
        .await;
    out.push(("CreateCollection", code(create)));
    let list = colls.list_collections(pb::ListCollectionsRequest {}).await;
    out.push(("ListCollections", code(list)));
    let get = colls
        .get_collection(pb::GetCollectionRequest { name: "sec".into() })
        .await;
    out.push(("GetCollection", code(get)));
    out.push(("Upsert", code(items.upsert(upsert.clone()).await)));
    let stream = items.upsert_stream(tokio_stream::iter(vec![upsert])).await;
    out.push(("UpsertStream", code(stream)));
    let got = items
        .get(pb::GetRequest {
            collection: "sec".into(),
            ids: vec!["i0".into()],
            ..Default::default()
        })
        .await;
    out.push(("Get", code(got)));
    let search = items
        .search(pb::SearchRequest {
            collection: "sec".into(),
            query: vector_query(vec![1.0, 0.0]),
            k: 2,
            ..Default::default()
        })
        .await;
    out.push(("Search", code(search)));
    let mined = match miner.mine_triplets(mine).await {
        Ok(r) => {
            let mut s = r.into_inner();
            let mut end = Code::Ok;
            loop {
                match s.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        end = e.code();
                        break;
                    }
                }
            }
            end
        }
        Err(s) => s.code(),
    };
    out.push(("MineTriplets", mined));
    // A Session is a read; a step that writes its vectors back is a write.
    for (name, write_back) in [("Session", false), ("SessionWriteBack", true)] {
        let step = pb::MineStep {
            step: 1,
            request: Some(pb::MineRequest {
                collection: "sec".into(),
                strategy: pb::Strategy::Hard as i32,
                ..Default::default()
            }),
            anchors: vec![pb::StepAnchor {
                id: "i0".into(),
                label: String::new(),
                vector: vec![1.0, 0.05],
            }],
            write_back,
        };
        let answer = match miner.session(tokio_stream::iter(vec![step])).await {
            Ok(r) => match r.into_inner().message().await {
                Ok(_) => Code::Ok,
                Err(e) => e.code(),
            },
            Err(s) => s.code(),
        };
        out.push((name, answer));
    }
    let calibrate = items
        .calibrate(pb::CalibrateRequest {
            collection: "sec".into(),
            pairs: 4,
            seed: 1,
        })
        .await;
    out.push(("Calibrate", code(calibrate)));
    let delete = items
        .delete(pb::DeleteRequest {
            collection: "sec".into(),
            ids: vec!["i3".into()],
        })
        .await;
    out.push(("Delete", code(delete)));
    let drop_scratch = colls
        .delete_collection(pb::DeleteCollectionRequest {
            name: "scratch".into(),
        })
        .await;
    out.push(("DeleteCollection", code(drop_scratch)));
    out
}

#[tokio::test]
async fn tokens_decide_who_may_call_what_and_health_and_reflection_need_none() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = write(
        dir.path(),
        "tokens",
        &format!("# who may call\nread {READ_TOKEN}\nwrite {WRITE_TOKEN}\n"),
    );
    let mut server = TestServer::light_recovering(&dir.path().join("data"), |c| {
        c.tokens_file = Some(tokens.clone());
    })
    .await;
    let url = server.url();
    // Health needs no token.
    wait_for(&url, &ConnectArgs::default(), "likeness.v1.Items").await;
    let app = server.app().await;
    {
        // Four items in two labels, for the reads (and the miner) to find.
        let ch = with_token(WRITE_TOKEN).connect(&url).await.unwrap();
        CollectionsClient::new(ch.clone())
            .create_collection(pb::CreateCollectionRequest {
                name: "sec".into(),
                dimension: 2,
                metric: pb::Metric::Cosine as i32,
                ..Default::default()
            })
            .await
            .unwrap();
        let vectors = [[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]];
        let batch = vectors
            .iter()
            .enumerate()
            .map(|(i, v)| item(&format!("i{i}"), &format!("l{}", i / 2), v.to_vec()))
            .collect();
        ItemsClient::new(ch)
            .upsert(pb::UpsertRequest {
                collection: "sec".into(),
                items: batch,
            })
            .await
            .unwrap();
    }

    for token in [None, Some("not-a-token"), Some(&READ_TOKEN[1..])] {
        for (method, code) in calls_with(&url, token).await {
            assert_eq!(code, Code::Unauthenticated, "{method} with {token:?}");
        }
    }
    let read = calls_with(&url, Some(READ_TOKEN)).await;
    for (method, code) in &read {
        let writes = [
            "CreateCollection",
            "Upsert",
            "UpsertStream",
            "SessionWriteBack",
            "Calibrate",
            "Delete",
            "DeleteCollection",
        ];
        let want = if writes.contains(method) {
            Code::PermissionDenied
        } else {
            Code::Ok
        };
        assert_eq!(*code, want, "{method} with the read token");
    }
    for (method, code) in calls_with(&url, Some(WRITE_TOKEN)).await {
        // Calibrate on four items may well have too few pairs: anything but a refusal.
        if method == "Calibrate" {
            assert!(
                ![Code::Unauthenticated, Code::PermissionDenied].contains(&code),
                "{code:?}"
            );
        } else {
            assert_eq!(code, Code::Ok, "{method} with the write token");
        }
    }

    // Reflection needs no token either.
    {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        let ch = ConnectArgs::default().connect(&url).await.unwrap();
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = ServerReflectionClient::new(ch)
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        assert!(stream.message().await.unwrap().is_some());
    }

    // Refusals are counted by code, like any other outcome.
    let search = app.metrics().rpc("/likeness.v1.Items/Search");
    let count = |c: Code| search.codes[c as usize].load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(count(Code::Unauthenticated), 3);
    let upsert = app.metrics().rpc("/likeness.v1.Items/Upsert");
    assert_eq!(
        upsert.codes[Code::PermissionDenied as usize].load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // A reload takes the read token away; a broken file keeps the tokens in force.
    std::fs::write(&tokens, format!("write {WRITE_TOKEN}\n")).unwrap();
    server.reloader.reload().unwrap();
    assert!(
        list_over(&url, &with_token(READ_TOKEN))
            .await
            .unwrap_err()
            .contains("Unauthenticated")
    );
    std::fs::write(&tokens, format!("write {WRITE_TOKEN}\nread\n")).unwrap();
    let err = server.reloader.reload().unwrap_err();
    assert!(err.contains("line 2"), "{err}");
    assert_eq!(list_over(&url, &with_token(WRITE_TOKEN)).await, Ok(1));
    server.stop().await;
}

#[tokio::test]
async fn embed_only_mode_honours_tls_and_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = Ca::new("embed CA").write_server(dir.path(), "server");
    let tokens = write(dir.path(), "tokens", &format!("read {READ_TOKEN}\n"));
    let server = TestServer::light_recovering(&dir.path().join("data"), |c| {
        c.embed_only = true;
        c.tls_cert = Some(cert.clone());
        c.tls_key = Some(key.clone());
        c.tokens_file = Some(tokens.clone());
    })
    .await;
    let url = server.url();
    wait_for(&url, &trusting(&ca), "likeness.v1.Embedder").await;
    let models = |conn: ConnectArgs| {
        let url = url.clone();
        async move {
            let ch = conn.connect(&url).await?;
            likeness::grpc::pb::models_client::ModelsClient::new(ch)
                .list_models(pb::ListModelsRequest {})
                .await
                .map(|r| r.into_inner().models.len())
                .map_err(|s| format!("{:?}", s.code()))
        }
    };
    let read = ConnectArgs {
        token: Some(READ_TOKEN.into()),
        ..trusting(&ca)
    };
    assert!(models(read).await.unwrap() > 0);
    assert_eq!(models(trusting(&ca)).await.unwrap_err(), "Unauthenticated");
    assert!(plaintext_list(&url).await.is_err());
    server.stop().await;
}

#[tokio::test]
async fn a_missing_certificate_or_a_bad_tokens_file_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let start = |tweak: &dyn Fn(&mut likeness::Config)| {
        let mut config = likeness::Config::with_data_dir(dir.path().join("data"));
        config.models.clear();
        tweak(&mut config);
        async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let options = likeness::ServeOptions {
                embedder: Some(likeness::embed::EmbedHandle::new(
                    likeness::embed::fake::FakeEmbedder,
                )),
                ..Default::default()
            };
            likeness::serve_with(listener, config, options, std::future::pending())
                .await
                .unwrap_err()
                .to_string()
        }
    };
    let missing = dir.path().join("nowhere.pem");
    let err = start(&|c| {
        c.tls_cert = Some(missing.clone());
        c.tls_key = Some(missing.clone());
    })
    .await;
    assert!(
        err.contains("--tls-cert") && err.contains("nowhere.pem"),
        "{err}"
    );

    let (_, cert, _) = Ca::new("CA").write_server(dir.path(), "server");
    let err = start(&|c| {
        c.tls_cert = Some(cert.clone());
        c.tls_key = Some(cert.clone());
    })
    .await;
    assert!(err.contains("--tls-key"), "{err}");

    let tokens = write(
        dir.path(),
        "tokens",
        &format!("read {READ_TOKEN}\n{WRITE_TOKEN} write\n"),
    );
    let err = start(&|c| c.tokens_file = Some(tokens.clone())).await;
    assert!(err.contains("tokens") && err.contains("line 2"), "{err}");
    assert!(
        !err.contains(WRITE_TOKEN) && !err.contains(READ_TOKEN),
        "{err}"
    );
}

/// The CLI as a client of the binary with TLS and tokens on, the plaintext health port
/// beside it, and a SIGHUP that swaps the certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_the_cli_over_tls_with_tokens_and_reloads_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_a, cert, key) = Ca::new("CA A").write_server(dir.path(), "server");
    let tokens = write(
        dir.path(),
        "tokens",
        &format!("read {READ_TOKEN}\nwrite {WRITE_TOKEN}\n"),
    );
    let flags = [
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--tokens-file",
        tokens.to_str().unwrap(),
        "--health-listen",
        "127.0.0.1:0",
        // Everything the daemon logs is checked for the tokens below.
        "--log",
        "debug,ort=warn",
        "--model",
        &format!(
            "fmnist-triplet={}/models/fmnist-triplet/model.toml",
            env!("CARGO_MANIFEST_DIR")
        ),
    ];
    let daemon = spawn_daemon(&dir.path().join("data"), &flags, &[]);
    let url = format!("https://{}", daemon.addr);
    wait_for(&url, &trusting(&ca_a), "likeness.v1.Items").await;

    // Kubelet's probes: plaintext, no token.
    let health = format!("http://{}", health_addr(&daemon));
    assert_eq!(
        check_health(&health, "likeness.v1.Items").await,
        Ok(ServingStatus::Serving as i32)
    );

    let cli = |args: Vec<String>, env: Vec<(&'static str, String)>| async move {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_likeness"));
        cmd.args(args).envs(env);
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let args = |words: &[&str], ca: &Path| -> Vec<String> {
        let mut v: Vec<String> = ["--addr", &url].iter().map(|s| s.to_string()).collect();
        v.extend(words.iter().map(|s| s.to_string()));
        v.extend(["--tls-ca".into(), ca.display().to_string()]);
        v
    };
    let (ok, out) = cli(
        args(
            &[
                "collections",
                "create",
                "sec",
                "--dimension",
                "2",
                "--token",
                WRITE_TOKEN,
            ],
            &ca_a,
        ),
        vec![],
    )
    .await;
    assert!(ok, "{out}");
    // The token from the environment, as the docs advise.
    let (ok, out) = cli(
        args(&["collections", "list"], &ca_a),
        vec![("LIKENESS_TOKEN", READ_TOKEN.into())],
    )
    .await;
    assert!(ok && out.contains("sec\tdimension=2"), "{out}");
    let (ok, out) = cli(
        args(
            &["collections", "delete", "sec", "--token", READ_TOKEN],
            &ca_a,
        ),
        vec![],
    )
    .await;
    assert!(!ok && out.contains("PermissionDenied"), "{out}");
    let (ok, out) = cli(args(&["collections", "list"], &ca_a), vec![]).await;
    assert!(!ok && out.contains("Unauthenticated"), "{out}");

    // SIGHUP: certificate B from another CA takes over for new connections.
    let (ca_b, cert_b, key_b) = Ca::new("CA B").write_server(dir.path(), "next");
    std::fs::copy(&cert_b, &cert).unwrap();
    std::fs::copy(&key_b, &key).unwrap();
    let pid = daemon.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !daemon
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("TLS certificates reloaded"))
    {
        assert!(std::time::Instant::now() < deadline, "no reload logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let read = vec![("LIKENESS_TOKEN", READ_TOKEN.to_string())];
    let (ok, out) = cli(args(&["collections", "list"], &ca_b), read.clone()).await;
    assert!(ok && out.contains("sec"), "{out}");
    let (ok, out) = cli(args(&["collections", "list"], &ca_a), read).await;
    assert!(!ok, "CA A still trusted after the reload: {out}");

    // The refused handshake is logged by the daemon's task, read from its stderr by a
    // thread: it may reach the log a moment after the client gave up.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let log = daemon.log.lock().unwrap().join("\n");
        if log.contains("TLS handshake failed") {
            assert!(!log.contains(READ_TOKEN) && !log.contains(WRITE_TOKEN));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the refused handshake was never logged (debug logs are on)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
