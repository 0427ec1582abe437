//! What an app controls and sees: the training policy (no training while the device is not
//! charging), pause, resume and stop, progress events; resumable uploads; the daemon's metrics
//! endpoint.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use fedtune_client::connection::Connection;
use fedtune_client::{ChargingUnmeteredIdle, DeviceConditions, Event, Outcome};
use fedtune_shared::protocol::blob::model_digest;
use fedtune_shared::protocol::{Digest, ErrorCode, Request, Response};
use fedtune_shared::transport::TransportError;
use fedtune_shared::transport::stream::{read_message, write_message};
use fedtune_tests::network::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn next_matching(
    rx: &mpsc::Receiver<Event>,
    want: impl Fn(&Event) -> bool,
    seen: &mut Vec<Event>,
) {
    let start = Instant::now();
    loop {
        match rx.try_recv() {
            Ok(e) => {
                let hit = want(&e);
                seen.push(e);
                if hit {
                    return;
                }
            }
            Err(mpsc::TryRecvError::Empty) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(e) => panic!("{e}"),
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "event never came; saw {seen:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_pause_resume_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_folder(dir.path(), 5);
    let server = TestServer::start(server_config(&dir.path().join("server"), &model, 1, 5));
    let (tx, rx) = mpsc::channel();
    let mut config = client_config(
        server.identity(),
        &dir.path().join("device"),
        model_digest(&model).unwrap(),
        Some(tx),
    );
    config.policy = std::sync::Arc::new(ChargingUnmeteredIdle::default());
    let (mut client, handle) = fedtune_client::Client::new(
        config,
        load_model(&model),
        fedtune_client::trainer::TrainingData {
            sequences: counting(0..4, 10),
            ..Default::default()
        },
    )
    .unwrap();
    client.enroll(TOKEN).await.unwrap();
    let unplugged = DeviceConditions {
        charging: false,
        ..DeviceConditions::default()
    };
    handle.set_conditions(unplugged);
    let run = tokio::spawn(async move { client.run().await });
    let mut seen = Vec::new();

    // Unplugged: the SDK defers and the server sees nothing.
    next_matching(
        &rx,
        |e| matches!(e, Event::Deferred { reason } if reason == "not charging"),
        &mut seen,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    seen.extend(rx.try_iter());
    assert!(
        !seen.iter().any(|e| matches!(e, Event::PlanReceived { .. })),
        "trained while unplugged: {seen:?}"
    );
    assert_eq!(server.core.store().report_count(1).unwrap(), 0);

    // Plugged in: it trains and reports.
    handle.set_conditions(DeviceConditions::default());
    next_matching(
        &rx,
        |e| matches!(e, Event::Reported { round: 1, .. }),
        &mut seen,
    )
    .await;
    // Every local step of round 1 was reported, in order, with its loss, before the report.
    let steps: Vec<(usize, usize, Option<f32>)> = seen
        .iter()
        .filter_map(|e| match e {
            Event::Training {
                round: 1,
                step,
                steps,
                loss,
            } => Some((*step, *steps, *loss)),
            _ => None,
        })
        .collect();
    let planned = steps.first().map(|s| s.1).expect("no training progress");
    assert!(planned > 0);
    assert_eq!(
        steps.iter().map(|s| s.0).collect::<Vec<_>>(),
        (1..=planned).collect::<Vec<_>>(),
        "{steps:?}"
    );
    assert!(
        steps
            .iter()
            .all(|s| s.1 == planned && s.2.is_some_and(f32::is_finite))
    );
    let position = |want: &dyn Fn(&Event) -> bool| seen.iter().position(|e| want(e));
    assert!(
        position(&|e| matches!(e, Event::Training { round: 1, .. }))
            < position(&|e| matches!(e, Event::ReportReady { round: 1 })),
        "progress comes before the report"
    );

    // Paused: no new round starts until resumed.
    handle.pause();
    next_matching(&rx, |e| matches!(e, Event::Paused), &mut seen).await;
    let round_at_pause = server.core.round().0;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        server.core.round().0,
        round_at_pause,
        "work went on while paused"
    );
    handle.resume();
    next_matching(
        &rx,
        |e| matches!(e, Event::Reported { round, .. } if *round > 1),
        &mut seen,
    )
    .await;

    handle.stop();
    assert_eq!(run.await.unwrap().unwrap(), Outcome::Stopped);
    assert!(server.core.round().0 <= 5, "the run should not be over");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_upload_resumes_where_the_server_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_folder(dir.path(), 5);
    let mut config = server_config(&dir.path().join("server"), &model, 1, 1);
    config.validation.max_upload_bytes = 1 << 20;
    let server = TestServer::start(config);
    let identity = server.identity();
    let (mut client, _) = client(
        identity.clone(),
        &dir.path().join("device"),
        &model,
        counting(0..2, 8),
    );
    let device = client.enroll(TOKEN).await.unwrap();
    let key = fedtune_client::state::StateDir::open(&dir.path().join("device"))
        .unwrap()
        .device_key()
        .unwrap();
    let connection = Connection::open(identity.address, &identity.certificate_der().unwrap())
        .await
        .unwrap();
    connection.authenticate(device, &key).await.unwrap();

    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let digest = Digest::of(&bytes);
    // The first 100 000 bytes arrive, then the stream ends (the app was killed mid-upload).
    let (mut send, mut recv) = connection.quic().open_bi().await.unwrap();
    write_message(
        &mut send,
        &Request::Upload {
            digest,
            total: bytes.len() as u64,
            offset: 0,
        },
    )
    .await
    .unwrap();
    send.write_all(&bytes[..100_000]).await.unwrap();
    send.finish().unwrap();
    let answer: Response = read_message(&mut recv, 1 << 20).await.unwrap();
    assert!(
        matches!(answer, Response::UploadOffset { offset: 100_000 }),
        "{answer:?}"
    );

    // A restarted device asks where to resume and sends only the rest.
    let status = connection
        .request(&Request::UploadStatus { digest })
        .await
        .unwrap();
    assert!(
        matches!(status, Response::UploadOffset { offset: 100_000 }),
        "{status:?}"
    );
    let wrong_offset = connection.upload(digest, &bytes, 5).await.unwrap();
    assert!(
        matches!(wrong_offset, Response::UploadOffset { offset: 100_000 }),
        "{wrong_offset:?}"
    );
    let done = connection.upload(digest, &bytes, 100_000).await.unwrap();
    assert!(
        matches!(done, Response::Uploaded { digest: d } if d == digest),
        "{done:?}"
    );
    let status = connection
        .request(&Request::UploadStatus { digest })
        .await
        .unwrap();
    assert!(matches!(status, Response::UploadOffset { offset } if offset == bytes.len() as u64));

    // Bytes that do not match their digest are discarded; an upload over the limit is refused.
    let forged = Digest::of(b"something else");
    let err = connection.upload(forged, &bytes, 0).await.unwrap_err();
    assert!(
        matches!(err, TransportError::Refused(ref e) if e.code == ErrorCode::BadBlob),
        "{err}"
    );
    let status = connection
        .request(&Request::UploadStatus { digest: forged })
        .await
        .unwrap();
    assert!(
        matches!(status, Response::UploadOffset { offset: 0 }),
        "{status:?}"
    );
    let huge = vec![0u8; (1 << 20) + 1];
    let err = connection
        .upload(Digest::of(&huge), &huge, 0)
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransportError::Refused(ref e) if e.code == ErrorCode::TooLarge),
        "{err}"
    );
    connection.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_prometheus_text() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_folder(dir.path(), 5);
    let server = TestServer::start(server_config(&dir.path().join("server"), &model, 1, 1));
    let (mut client, _) = client(
        server.identity(),
        &dir.path().join("device"),
        &model,
        counting(0..2, 8),
    );
    client.enroll(TOKEN).await.unwrap();
    assert_eq!(
        client.run().await.unwrap(),
        Outcome::Finished { last_round: 1 }
    );

    let endpoint = fedtune_server::metrics::serve(
        "127.0.0.1:0".parse().unwrap(),
        server.core.metrics().clone(),
    )
    .await
    .unwrap();
    let addr = endpoint.local_addr();
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut page = String::new();
    socket.read_to_string(&mut page).await.unwrap();
    assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
    for line in [
        "fedtune_rounds_completed_total 1",
        "fedtune_reports_accepted_total 1",
        "fedtune_enrollments_total 1",
        "# TYPE fedtune_connections gauge",
        "# TYPE fedtune_aggregation_seconds gauge",
        "# TYPE fedtune_bytes_in counter",
    ] {
        assert!(page.contains(line), "missing `{line}` in\n{page}");
    }
    // Stopped, the endpoint gives its port back.
    endpoint.stop().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    tokio::net::TcpListener::bind(addr)
        .await
        .expect("the port is free again");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_server_address_is_a_typed_error_not_a_retry_loop() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_folder(dir.path(), 5);
    let server = TestServer::start(server_config(&dir.path().join("server"), &model, 1, 1));
    let mut identity = server.identity();
    identity.address = "0.0.0.0:0".parse().unwrap();
    let (mut client, _) = client(
        identity,
        &dir.path().join("device"),
        &model,
        counting(0..2, 8),
    );
    let err = client.enroll(TOKEN).await.unwrap_err();
    assert!(
        matches!(
            err,
            fedtune_client::ClientError::Transport(TransportError::BadAddress(_))
        ),
        "{err}"
    );
    server.stop().await;
}
