//! The binary as a client: collections, bulk upsert from .npy/JSONL/CSV, search, get,
//! delete, and errors that print the status and exit non-zero.

mod common;

use std::process::Command;

use common::*;

async fn cli(url: &str, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_likeness"));
    cmd.arg("--addr").arg(url).args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_subcommands_round_trip() {
    let (server, dir) = TestServer::start().await;
    let url = server.url();
    let (ok, out, err) = cli(
        &url,
        &[
            "collections",
            "create",
            "cli",
            "--dimension",
            "4",
            "--metric",
            "l2",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("cli\tdimension=4\tmetric=l2"), "{out}");

    // .npy with a labels file: 300 rows.
    let (vectors, clusters) = clustered(300, 4, 3, 0.1, 5);
    let flat: Vec<f32> = vectors.iter().flatten().copied().collect();
    let npy = dir.path().join("v.npy");
    std::fs::write(&npy, likeness::cli::load::write_npy(300, 4, &flat)).unwrap();
    let labels = dir.path().join("labels.txt");
    let text: Vec<String> = clusters.iter().map(|c| format!("k{c}")).collect();
    std::fs::write(&labels, text.join("\n")).unwrap();
    let (ok, out, err) = cli(
        &url,
        &[
            "upsert",
            "-c",
            "cli",
            npy.to_str().unwrap(),
            "--labels",
            labels.to_str().unwrap(),
            "--id-prefix",
            "n",
            "--batch",
            "64",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("upserted 300 items"), "{out}");
    assert!(out.contains("items/s"), "reports throughput: {out}");

    let jsonl = dir.path().join("v.jsonl");
    std::fs::write(
        &jsonl,
        "{\"id\":\"j1\",\"label\":\"json\",\"metadata\":{\"src\":\"jsonl\"},\"vector\":[100,0,0,0]}\n\n{\"id\":\"j2\",\"vector\":[0,100,0,0]}\n",
    )
    .unwrap();
    let (ok, out, err) = cli(&url, &["upsert", "-c", "cli", jsonl.to_str().unwrap()]).await;
    assert!(ok, "{err}");
    assert!(out.contains("upserted 2 items"), "{out}");

    let csv = dir.path().join("v.csv");
    std::fs::write(&csv, "id,label,a,b,c,d\nc1,csv,0,0,100,0\n").unwrap();
    let (ok, out, err) = cli(&url, &["upsert", "-c", "cli", csv.to_str().unwrap()]).await;
    assert!(ok, "{err}");
    assert!(out.contains("upserted 1 items"), "{out}");

    let (ok, out, _) = cli(&url, &["collections", "list"]).await;
    assert!(ok);
    assert!(out.contains("count=303"), "{out}");

    let (ok, out, err) = cli(
        &url,
        &["search", "-c", "cli", "--vector", "99,1,0,0", "-k", "2"],
    )
    .await;
    assert!(ok, "{err}");
    let first = out.lines().nth(1).unwrap();
    assert!(first.contains("\tj1\tjson\tsrc=jsonl"), "{out}");

    let (ok, out, err) = cli(
        &url,
        &[
            "search", "-c", "cli", "--id", "n0", "-k", "5", "--label", "k0", "--label", "k1",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let rows: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(rows.len(), 5, "{out}");
    assert!(
        rows.iter()
            .all(|r| r.contains("\tk0") || r.contains("\tk1")),
        "{out}"
    );
    assert!(rows.iter().all(|r| !r.contains("\tn0\t")), "{out}");

    let (ok, out, err) = cli(
        &url,
        &["get", "-c", "cli", "c1", "missing", "--with-vectors"],
    )
    .await;
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["id"], "c1");
    assert_eq!(v["vector"][2], 100.0);

    let (ok, out, _) = cli(&url, &["delete", "-c", "cli", "c1", "j2", "ghost"]).await;
    assert!(ok);
    assert!(out.contains("deleted 2 items"), "{out}");

    // Errors: the status message on stderr, a non-zero exit.
    let (ok, _, err) = cli(&url, &["search", "-c", "nope", "--vector", "1,2,3,4"]).await;
    assert!(!ok);
    assert!(
        err.contains("NotFound") && err.contains("\"nope\""),
        "{err}"
    );
    let (ok, _, err) = cli(&url, &["search", "-c", "cli", "--vector", "1,2"]).await;
    assert!(!ok);
    assert!(
        err.contains("InvalidArgument") && err.contains("query.vector"),
        "{err}"
    );
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"id\":\"x\",\"vector\":[1,2]}\n").unwrap();
    let (ok, _, err) = cli(&url, &["upsert", "-c", "cli", bad.to_str().unwrap()]).await;
    assert!(!ok);
    assert!(err.contains("items[0].vector"), "{err}");

    let (ok, out, _) = cli(&url, &["collections", "delete", "cli"]).await;
    assert!(ok);
    assert!(out.contains("301 items"), "{out}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_takes_flag_over_env_over_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("likeness.toml");
    std::fs::write(&file, "max_k = 5\nmax_batch = 3\n").unwrap();
    let data = dir.path().join("data");
    let file_arg = file.to_str().unwrap();
    // File says max_k 5 and max_batch 3; env says max_k 7; the flag says max_batch 4.
    let daemon = spawn_daemon(
        &data,
        &["--config", file_arg, "--max-batch", "4"],
        &[("LIKENESS_MAX_K", "7"), ("LIKENESS_MAX_BATCH", "2")],
    );
    let url = format!("http://{}", daemon.addr);
    wait_serving(&url).await;
    let (ok, _, err) = cli(&url, &["collections", "create", "cfg", "--dimension", "2"]).await;
    assert!(ok, "{err}");
    let csv = dir.path().join("five.csv");
    std::fs::write(&csv, "id,a,b\nq,1,0\nr,0,1\ns,1,1\nt,2,1\nu,1,2\n").unwrap();
    // Batches of 4 pass (flag beats env's 2 and the file's 3), 5 do not.
    let (ok, _, err) = cli(
        &url,
        &["upsert", "-c", "cfg", csv.to_str().unwrap(), "--batch", "4"],
    )
    .await;
    assert!(ok, "{err}");
    let (ok, _, err) = cli(
        &url,
        &["upsert", "-c", "cfg", csv.to_str().unwrap(), "--batch", "5"],
    )
    .await;
    assert!(!ok);
    assert!(err.contains("at most 4"), "{err}");
    // k = 7 passes (env beats the file's 5), 8 does not.
    let (ok, _, err) = cli(&url, &["search", "-c", "cfg", "--id", "q", "-k", "7"]).await;
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&url, &["search", "-c", "cfg", "--id", "q", "-k", "8"]).await;
    assert!(!ok);
    assert!(err.contains("limit of 7"), "{err}");
    assert!(data.join("store").exists(), "--data-dir was used");
    drop(daemon);
}
