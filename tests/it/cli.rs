//! The binary as a client: collections, bulk upsert from .npy/JSONL/CSV, search, get,
//! delete, embed, classify, verify, and errors that print the status and exit non-zero.

use std::path::Path;

use likeness::grpc::pb;
use likeness::grpc::pb::embedder_client::EmbedderClient;

use crate::common::*;

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

/// What the Embed RPC answers for these images: the reference for `likeness embed`.
async fn embed_rpc(url: &str, images: &[Vec<u8>]) -> Vec<Vec<f32>> {
    EmbedderClient::new(channel(url).await)
        .embed(pb::EmbedRequest {
            model: "fmnist-triplet".into(),
            inputs: images.iter().map(|png| image_input(png)).collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .embeddings
        .into_iter()
        .map(|v| v.values)
        .collect()
}

fn assert_rows_close(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: rows");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = max_diff(g, w);
        assert!(d < 1e-5, "{what}: row {i} differs by {d}");
    }
}

/// JSON lines, parsed.
fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embed_writes_npy_and_jsonl_in_input_order() {
    let (server, dir) = TestServer::start().await;
    let url = server.url();
    let pngs = fixture_pngs("enrol_images.npy");
    // A folder written out of name order, with one BMP and a file that is no image.
    let imgs = dir.path().join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    let bmp = {
        let img = image::load_from_memory(&pngs[2]).unwrap();
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Bmp).unwrap();
        out.into_inner()
    };
    let files: [(&str, &[u8]); 5] = [
        ("img03.png", &pngs[3]),
        ("img01.png", &pngs[1]),
        ("img04.png", &pngs[4]),
        ("img02.bmp", &bmp),
        ("img00.png", &pngs[0]),
    ];
    for (name, bytes) in files {
        std::fs::write(imgs.join(name), bytes).unwrap();
    }
    std::fs::write(imgs.join("notes.txt"), "not an image").unwrap();
    let sorted = vec![
        pngs[0].clone(),
        pngs[1].clone(),
        bmp.clone(),
        pngs[3].clone(),
        pngs[4].clone(),
    ];
    let reference = embed_rpc(&url, &sorted).await;
    assert!(
        max_diff(&reference[0], &reference[1]) > 0.01,
        "distinct images, distinct vectors: the order is checkable"
    );

    // A folder to .npy, two images per call (three Embed calls), the default model.
    let npy = dir.path().join("v.npy");
    let (ok, out, err) = cli(
        &url,
        &[
            "embed",
            path_str(&imgs),
            "--out",
            path_str(&npy),
            "--batch",
            "2",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(
        out.contains("embedded 5 images with fmnist-triplet into"),
        "{out}"
    );
    let (rows, dim, values) =
        likeness::cli::load::parse_npy(&std::fs::read(&npy).unwrap()).unwrap();
    assert_eq!((rows, dim), (5, 64));
    let got: Vec<Vec<f32>> = values.chunks(dim).map(<[f32]>::to_vec).collect();
    assert_rows_close(&got, &reference, ".npy of a folder");
    assert!(!dir.path().join("v.npy.partial").exists());

    // Files to .jsonl keep the order given.
    let jsonl = dir.path().join("v.jsonl");
    let (a, b) = (imgs.join("img04.png"), imgs.join("img00.png"));
    let (ok, _, err) = cli(
        &url,
        &[
            "embed",
            path_str(&a),
            path_str(&b),
            "--model",
            "fmnist-triplet",
            "--out",
            path_str(&jsonl),
        ],
    )
    .await;
    assert!(ok, "{err}");
    let lines = json_lines(&std::fs::read_to_string(&jsonl).unwrap());
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["file"], path_str(&a));
    assert_eq!(lines[1]["file"], path_str(&b));
    let got: Vec<Vec<f32>> = lines.iter().map(|l| floats(&l["vector"])).collect();
    assert_rows_close(
        &got,
        &[reference[4].clone(), reference[0].clone()],
        ".jsonl",
    );

    // No --out: JSON lines on stdout, and nothing else there.
    let (ok, out, err) = cli(&url, &["embed", path_str(&imgs)]).await;
    assert!(ok, "{err}");
    let lines = json_lines(&out);
    let names: Vec<&str> = lines
        .iter()
        .map(|l| l["file"].as_str().unwrap().rsplit('/').next().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "img00.png",
            "img01.png",
            "img02.bmp",
            "img03.png",
            "img04.png"
        ]
    );
    let got: Vec<Vec<f32>> = lines.iter().map(|l| floats(&l["vector"])).collect();
    assert_rows_close(&got, &reference, "stdout");

    // Errors name the file, or print the status; a failed run leaves no file behind.
    let missing = imgs.join("missing.png");
    let (ok, _, err) = cli(&url, &["embed", path_str(&a), path_str(&missing)]).await;
    assert!(!ok);
    assert!(err.contains("missing.png"), "{err}");
    let bad = dir.path().join("bad.npy");
    let notes = imgs.join("notes.txt");
    let (ok, _, err) = cli(
        &url,
        &[
            "embed",
            path_str(&a),
            path_str(&notes),
            "--out",
            path_str(&bad),
        ],
    )
    .await;
    assert!(!ok);
    assert!(
        err.contains("notes.txt") && err.contains("InvalidArgument"),
        "{err}"
    );
    assert!(!bad.exists() && !dir.path().join("bad.npy.partial").exists());
    let (ok, _, err) = cli(&url, &["embed", path_str(&a), "--model", "nope"]).await;
    assert!(!ok);
    assert!(err.contains("NotFound") && err.contains("nope"), "{err}");
    let (ok, _, err) = cli(&url, &["embed", path_str(&a), "--model", "fmnist-pair"]).await;
    assert!(!ok);
    assert!(
        err.contains("InvalidArgument") && err.contains("pair model"),
        "{err}"
    );
    let csv = dir.path().join("v.csv");
    let (ok, _, err) = cli(&url, &["embed", path_str(&a), "--out", path_str(&csv)]).await;
    assert!(!ok);
    assert!(err.contains(".npy or .jsonl"), "{err}");
    assert!(!csv.exists());
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (ok, _, err) = cli(&url, &["embed", path_str(&empty)]).await;
    assert!(!ok);
    assert!(err.contains("no image files"), "{err}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_verify_and_list_a_model_collection() {
    let (server, dir) = TestServer::start().await;
    let url = server.url();
    let (ok, _, err) = cli(
        &url,
        &[
            "collections",
            "create",
            "wardrobe",
            "--model",
            "fmnist-triplet",
            "--pair-model",
            "fmnist-pair",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let (ok, _, err) = cli(
        &url,
        &["collections", "create", "plain", "--dimension", "4"],
    )
    .await;
    assert!(ok, "{err}");
    let (ok, out, err) = cli(&url, &["collections", "list"]).await;
    assert!(ok, "{err}");
    let line = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{name}\t")))
            .unwrap_or_else(|| panic!("no {name} in {out}"))
            .to_string()
    };
    assert!(
        line("wardrobe").contains("\tmodel=fmnist-triplet\tpair_model=fmnist-pair"),
        "{out}"
    );
    assert!(line("plain").contains("\tmodel=-\tpair_model=-"), "{out}");

    // Enrol 400 images of four classes by input.
    let enrol = fixture_pngs("enrol_images.npy");
    let (_, labels) = fixture("enrol_labels.npy");
    let label = |n: usize| format!("{}", labels[n]);
    let mut items = server.items().await;
    items
        .upsert(pb::UpsertRequest {
            collection: "wardrobe".into(),
            items: (0..enrol.len())
                .map(|n| pb::Item {
                    id: format!("e{n}"),
                    label: label(n),
                    input: Some(image_input(&enrol[n])),
                    ..Default::default()
                })
                .collect(),
        })
        .await
        .unwrap();

    // Two enrolled images of different classes, as files.
    let other = (1..enrol.len()).find(|&n| labels[n] != labels[0]).unwrap();
    let a = dir.path().join("a.png");
    let b = dir.path().join("b.png");
    std::fs::write(&a, &enrol[0]).unwrap();
    std::fs::write(&b, &enrol[other]).unwrap();
    let (a, b) = (path_str(&a), path_str(&b));

    // An enrolled image is its own nearest neighbour (distance 0): its label wins.
    let (ok, out, err) = cli(&url, &["classify", "-c", "wardrobe", a, b, "-k", "5"]).await;
    assert!(ok, "{err}");
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 2, "{out}");
    for (line, (file, n)) in lines.iter().zip([(a, 0), (b, other)]) {
        assert_eq!(line["file"], file, "{out}");
        assert_eq!(line["label"], label(n), "{out}");
        let confidence = line["confidence"].as_f64().unwrap();
        assert!(confidence > 0.0 && confidence <= 1.0, "{out}");
        let votes = line["votes"].as_array().unwrap();
        assert_eq!(votes[0]["label"], label(n), "{out}");
        let counted: u64 = votes.iter().map(|v| v["count"].as_u64().unwrap()).sum();
        assert_eq!(counted, 5, "k neighbours vote: {out}");
    }
    // By id: the RPC's answer.
    let (ok, out, err) = cli(
        &url,
        &["classify", "-c", "wardrobe", "--id", "e3", "-k", "5"],
    )
    .await;
    assert!(ok, "{err}");
    let want = items
        .classify(pb::ClassifyRequest {
            collection: "wardrobe".into(),
            query: id_query("e3"),
            k: 5,
        })
        .await
        .unwrap()
        .into_inner();
    let got = &json_lines(&out)[0];
    assert_eq!(got["id"], "e3");
    assert_eq!(got["label"], want.label.as_str());
    assert!((got["confidence"].as_f64().unwrap() as f32 - want.confidence).abs() < 1e-6);

    // An image with itself, and with its own enrolled copy: the same, at distance 0.
    for other_side in [a.to_string(), "id:e0".to_string()] {
        let (ok, out, err) = cli(&url, &["verify", "-c", "wardrobe", a, &other_side]).await;
        assert!(ok, "{err}");
        let v = &json_lines(&out)[0];
        assert_eq!(v["same"], true, "{out}");
        assert!(v["distance"].as_f64().unwrap().abs() < 1e-4, "{out}");
        assert!(v["pair_score"].is_number(), "a pair model scores: {out}");
        assert_eq!(v["b"], other_side.as_str());
    }
    // Two different images: the RPC's answer.
    let (ok, out, err) = cli(&url, &["verify", "-c", "wardrobe", a, b]).await;
    assert!(ok, "{err}");
    let v = &json_lines(&out)[0];
    let want = items
        .verify(pb::VerifyRequest {
            collection: "wardrobe".into(),
            a: input_query(&enrol[0]),
            b: input_query(&enrol[other]),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(want.distance > 0.01, "different images: {want:?}");
    for (field, value) in [
        ("distance", want.distance),
        ("similarity", want.similarity),
        ("probability", want.probability),
        ("pair_score", want.pair_score.unwrap()),
    ] {
        let got = v[field].as_f64().unwrap() as f32;
        assert!((got - value).abs() < 1e-5, "{field}: {got} vs {value}");
    }
    assert_eq!(v["same"], want.same);

    // Errors: the status for an unknown collection, the file's name for a missing file.
    let (ok, _, err) = cli(&url, &["classify", "-c", "nope", a]).await;
    assert!(!ok);
    assert!(
        err.contains("NotFound") && err.contains("\"nope\""),
        "{err}"
    );
    let (ok, _, err) = cli(&url, &["verify", "-c", "nope", a, b]).await;
    assert!(!ok);
    assert!(
        err.contains("NotFound") && err.contains("\"nope\""),
        "{err}"
    );
    let missing = dir.path().join("missing.png");
    let (ok, _, err) = cli(&url, &["classify", "-c", "wardrobe", path_str(&missing)]).await;
    assert!(!ok);
    assert!(err.contains("missing.png"), "{err}");
    let (ok, _, err) = cli(&url, &["verify", "-c", "wardrobe", a, path_str(&missing)]).await;
    assert!(!ok);
    assert!(err.contains("missing.png"), "{err}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mine_writes_triplets_and_pairs_as_json_lines_with_stats() {
    let (server, dir) = TestServer::light().await;
    let url = server.url();
    let mut colls = server.collections().await;
    create(&mut colls, "m", 8, pb::Metric::Cosine).await;
    let mut rng = likeness::rng::Rng::new(5);
    server
        .items()
        .await
        .upsert(pb::UpsertRequest {
            collection: "m".into(),
            items: (0..500)
                .map(|i| {
                    item(
                        &format!("i{i}"),
                        &format!("c{}", i % 5),
                        (0..8).map(|_| rng.normal()).collect(),
                    )
                })
                .collect(),
        })
        .await
        .unwrap();
    let out = dir.path().join("triplets.jsonl");
    let (ok, _, err) = cli(
        &url,
        &[
            "mine",
            "-c",
            "m",
            "--strategy",
            "semi-hard",
            "--margin",
            "0.2",
            "-n",
            "120",
            "--batch",
            "32",
            "--out",
            path_str(&out),
        ],
    )
    .await;
    assert!(ok, "{err}");
    let lines = json_lines(&std::fs::read_to_string(&out).unwrap());
    assert_eq!(lines.len(), 120);
    let label = |id: &serde_json::Value| id.as_str().unwrap()[1..].parse::<usize>().unwrap() % 5;
    for l in &lines {
        assert_eq!(label(&l["anchor"]), label(&l["positive"]), "{l}");
        for n in l["negatives"].as_array().unwrap() {
            assert_ne!(label(&l["anchor"]), label(n), "{l}");
        }
        assert!(l["d_ap"].is_number() && l["fallback"].is_boolean());
    }
    assert!(err.contains("mined 120 triplets"), "{err}");

    // Pairs on standard output, one shard of two.
    let (ok, stdout, err) = cli(
        &url,
        &[
            "mine",
            "-c",
            "m",
            "--strategy",
            "hard",
            "--pairs",
            "--negatives",
            "2",
            "--shard",
            "1/2",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let pairs = json_lines(&stdout);
    assert!(!pairs.is_empty());
    for p in &pairs {
        assert_eq!(
            p["same"].as_bool().unwrap(),
            label(&p["a"]) == label(&p["b"]),
            "{p}"
        );
    }
    assert!(err.contains("pairs from"), "{err}");

    // Batches of neighbouring classes (MineBatches), one line each: one pass covers
    // every item, K of each class.
    let (ok, stdout, err) = cli(
        &url,
        &[
            "mine",
            "-c",
            "m",
            "--batches",
            "--classes",
            "3",
            "--per-class",
            "4",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let batches = json_lines(&stdout);
    let mut seen = std::collections::HashSet::new();
    for b in &batches {
        let classes: Vec<&str> = b["classes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(classes.len(), 3, "{b}");
        let ids = b["ids"].as_array().unwrap();
        assert_eq!(ids.len(), 12, "{b}");
        for (j, id) in ids.iter().enumerate() {
            assert_eq!(format!("c{}", label(id)), classes[j / 4], "{b}");
            seen.insert(id.as_str().unwrap().to_string());
        }
    }
    assert_eq!(seen.len(), 500, "one pass covers every item");
    assert!(err.contains(&format!("{} batches", batches.len())), "{err}");

    // A bad request is the server's status, named.
    let (ok, _, err) = cli(&url, &["mine", "-c", "m", "--margin", "-1"]).await;
    assert!(!ok);
    assert!(
        err.contains("InvalidArgument") && err.contains("margin"),
        "{err}"
    );
    let (ok, _, err) = cli(&url, &["mine", "-c", "m", "--batches", "--classes", "1"]).await;
    assert!(!ok);
    assert!(
        err.contains("InvalidArgument") && err.contains("classes"),
        "{err}"
    );
}
