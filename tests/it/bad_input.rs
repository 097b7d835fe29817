//! A table of bad inputs: each gets the right status with a message naming the field and
//! the item, writes nothing, and the daemon keeps serving.

use crate::common::*;
use likeness::grpc::pb;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_clear_statuses_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::light_in(dir.path(), |c| {
        c.max_message_bytes = 1 << 20;
        c.limits.max_k = 100;
    })
    .await;
    let mut c = server.collections().await;
    create(&mut c, "c", 3, pb::Metric::Cosine).await;
    let mut items = server.items().await;
    items
        .upsert(pb::UpsertRequest {
            collection: "c".into(),
            items: vec![item("seed", "", vec![1.0, 0.0, 0.0])],
        })
        .await
        .unwrap();

    let up = |items: Vec<pb::Item>| pb::UpsertRequest {
        collection: "c".into(),
        items,
    };
    let good = |id: &str| item(id, "", vec![0.0, 1.0, 0.0]);
    let long_id = "x".repeat(257);
    // (case, request, code, substrings the message must contain)
    let upserts: Vec<(&str, pb::UpsertRequest, Code, Vec<&str>)> = vec![
        (
            "wrong dimension",
            up(vec![good("g"), item("w", "", vec![1.0, 2.0])]),
            Code::InvalidArgument,
            vec!["items[1].vector", "\"w\"", "dimension 3"],
        ),
        (
            "NaN",
            up(vec![item("n", "", vec![1.0, f32::NAN, 0.0])]),
            Code::InvalidArgument,
            vec!["items[0].vector[1]", "\"n\""],
        ),
        (
            "Inf",
            up(vec![
                good("g"),
                item("i", "", vec![f32::INFINITY, 0.0, 0.0]),
            ]),
            Code::InvalidArgument,
            vec!["items[1].vector[0]", "\"i\""],
        ),
        (
            "zero vector under cosine",
            up(vec![item("z", "", vec![0.0; 3])]),
            Code::InvalidArgument,
            vec!["items[0].vector", "zeros"],
        ),
        (
            "empty vector",
            up(vec![item("e", "", vec![])]),
            Code::InvalidArgument,
            vec!["items[0].vector", "\"e\""],
        ),
        (
            "empty id",
            up(vec![good("g"), good("")]),
            Code::InvalidArgument,
            vec!["items[1].id", "empty"],
        ),
        (
            "over-long id",
            up(vec![good(&long_id)]),
            Code::InvalidArgument,
            vec!["items[0].id", "257 bytes"],
        ),
        (
            "duplicate ids",
            up(vec![good("d"), good("x"), good("d")]),
            Code::InvalidArgument,
            vec!["items[2].id", "\"d\"", "items[0]"],
        ),
        ("no items", up(vec![]), Code::InvalidArgument, vec!["items"]),
        (
            "unknown collection",
            pb::UpsertRequest {
                collection: "nope".into(),
                items: vec![good("g")],
            },
            Code::NotFound,
            vec!["\"nope\""],
        ),
    ];
    for (case, req, code, needles) in upserts {
        let err = items.upsert(req).await.expect_err(case);
        assert_status(case, &err, code, &needles);
    }
    // The valid items that shared a request with a bad one were not written.
    let got = items
        .get(pb::GetRequest {
            collection: "c".into(),
            ids: vec!["g".into(), "d".into(), "x".into()],
            with_vectors: false,
            with_inputs: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        got.items.is_empty(),
        "a failed request wrote {:?}",
        got.items
    );

    let search = |k: u32, query: Option<pb::Query>, coll: &str| pb::SearchRequest {
        collection: coll.into(),
        query,
        k,
        ..Default::default()
    };
    let searches: Vec<(&str, pb::SearchRequest, Code, Vec<&str>)> = vec![
        (
            "k = 0",
            search(0, vector_query(vec![1.0, 0.0, 0.0]), "c"),
            Code::InvalidArgument,
            vec!["k"],
        ),
        (
            "k over the limit",
            search(101, vector_query(vec![1.0, 0.0, 0.0]), "c"),
            Code::InvalidArgument,
            vec!["k", "100"],
        ),
        (
            "empty query",
            search(5, None, "c"),
            Code::InvalidArgument,
            vec!["query"],
        ),
        (
            "empty query oneof",
            search(5, Some(pb::Query { kind: None }), "c"),
            Code::InvalidArgument,
            vec!["query"],
        ),
        (
            "query wrong dimension",
            search(5, vector_query(vec![1.0]), "c"),
            Code::InvalidArgument,
            vec!["query.vector", "dimension 3"],
        ),
        (
            "query NaN",
            search(5, vector_query(vec![1.0, f32::NAN, 0.0]), "c"),
            Code::InvalidArgument,
            vec!["query.vector[1]"],
        ),
        (
            "query unknown id",
            search(5, id_query("ghost"), "c"),
            Code::NotFound,
            vec!["query.id", "\"ghost\""],
        ),
        (
            "query empty id",
            search(5, id_query(""), "c"),
            Code::InvalidArgument,
            vec!["query.id"],
        ),
        (
            "unknown collection",
            search(5, vector_query(vec![1.0, 0.0, 0.0]), "nope"),
            Code::NotFound,
            vec!["\"nope\""],
        ),
    ];
    for (case, req, code, needles) in searches {
        let err = items.search(req).await.expect_err(case);
        assert_status(case, &err, code, &needles);
    }
    let err = items
        .search_batch(pb::SearchBatchRequest {
            collection: "c".into(),
            queries: vec![
                vector_query(vec![1.0, 0.0, 0.0]).unwrap(),
                vector_query(vec![1.0, 0.0]).unwrap(),
            ],
            k: 3,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("queries[1].vector"),
        "{}",
        err.message()
    );

    // Collections.
    let create_req = |name: &str, dimension: u32, metric: i32| pb::CreateCollectionRequest {
        name: name.into(),
        dimension,
        metric,
        ..Default::default()
    };
    let creates: Vec<(&str, pb::CreateCollectionRequest, Code, Vec<&str>)> = vec![
        (
            "existing name",
            create_req("c", 3, 0),
            Code::AlreadyExists,
            vec!["\"c\""],
        ),
        (
            "bad name",
            create_req("a/b", 3, 0),
            Code::InvalidArgument,
            vec!["name", "'/'"],
        ),
        (
            "empty name",
            create_req("", 3, 0),
            Code::InvalidArgument,
            vec!["name"],
        ),
        (
            "long name",
            create_req(&"n".repeat(65), 3, 0),
            Code::InvalidArgument,
            vec!["name", "64"],
        ),
        (
            "zero dimension",
            create_req("z", 0, 0),
            Code::InvalidArgument,
            vec!["dimension"],
        ),
        (
            "unknown metric",
            create_req("m", 3, 42),
            Code::InvalidArgument,
            vec!["metric", "42"],
        ),
    ];
    for (case, req, code, needles) in creates {
        let err = c.create_collection(req).await.expect_err(case);
        assert_status(case, &err, code, &needles);
    }
    for (case, name) in [("delete unknown", "ghost"), ("get unknown", "ghost")] {
        let err = if case.starts_with("delete") {
            c.delete_collection(pb::DeleteCollectionRequest { name: name.into() })
                .await
                .unwrap_err()
        } else {
            c.get_collection(pb::GetCollectionRequest { name: name.into() })
                .await
                .unwrap_err()
        };
        assert_eq!(err.code(), Code::NotFound, "{case}");
    }
    for (case, ids) in [
        ("get no ids", vec![]),
        ("get empty id", vec!["".to_string()]),
    ] {
        let err = items
            .get(pb::GetRequest {
                collection: "c".into(),
                ids,
                with_vectors: false,
                with_inputs: false,
            })
            .await
            .expect_err(case);
        assert_eq!(err.code(), Code::InvalidArgument, "{case}");
        assert!(err.message().contains("ids"), "{case}: {}", err.message());
    }
    let err = items
        .delete(pb::DeleteRequest {
            collection: "c".into(),
            ids: vec!["ok".into(), "".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("ids[1]"), "{}", err.message());

    // Oversize messages: unary and in a stream.
    let big: Vec<pb::Item> = (0..30_000).map(|i| good(&format!("{i:0>60}"))).collect();
    let err = items.upsert(up(big.clone())).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    let err = items
        .upsert_stream(tokio_stream::iter(vec![up(vec![good("s1")]), up(big)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());

    // Still serving, and the collection holds exactly what was acknowledged.
    let info = c
        .get_collection(pb::GetCollectionRequest { name: "c".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.count, 1);
    let hits = items
        .search(search(10, vector_query(vec![1.0, 0.0, 0.0]), "c"))
        .await
        .unwrap()
        .into_inner()
        .hits;
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].id, "seed");
    server.stop().await;
}
