//! Hostile input against the real daemon on loopback QUIC: every refusal carries the exact
//! [`ErrorCode`] the protocol promises, is counted in the metrics, and leaves the server serving.
//!
//! - Framing (raw bytes on a stream opened with `Connection::quic().open_bi()`): garbage without
//!   the `FT` magic, a header declaring a body over `MAX_REQUEST_FRAME` (answered at once, with
//!   the stream still open, so the body is neither awaited nor allocated), a body cut short, a
//!   foreign protocol version (answered in the server's own version), a body that is not a
//!   `Request`, a `Request` followed by trailing bytes, and a forged length inside the body.
//! - FedKSeed reports from an enrolled, authenticated device that holds a verified plan: NaN and
//!   infinite gradients, a seed index `>= K`, zero samples, a norm over
//!   `validation.max_update_norm` (all `Invalid`); a replayed report (accepted once, then
//!   `duplicate: true`, stored once); reports for a round that is not open or for another run
//!   (`WrongRound`); a report from an enrolled device that got no plan (`NotSelected`).
//! - A report on a connection that never authenticated (`Unauthenticated`).
//! - A flood of 200 garbage streams on one connection, after which a real client is served.
//!
//! - Per-step values (`step_grads`) in a run without FedKSeed-Pro (`Invalid`), and sample counts
//!   large enough to overflow a round's total (refused; the round is never left closing).

use std::time::Duration;

use fedtune_client::connection::Connection;
use fedtune_client::state::StateDir;
use fedtune_server::config::ServerConfig;
use fedtune_server::rounds::Phase;
use fedtune_shared::protocol::auth::PLAN_LABEL;
use fedtune_shared::protocol::frame::{self, HEADER_LEN, MAGIC};
use fedtune_shared::protocol::{
    BlobRef, Capabilities, DeviceId, Digest, EnrollRequest, ErrorCode, LocalStats,
    MAX_REQUEST_FRAME, MAX_RESPONSE_FRAME, PROTOCOL_VERSION, Plan, PollRequest, Report,
    ReportPayload, Request, Response, SigningKey, Task,
};
use fedtune_shared::transport::TransportError;
use fedtune_shared::transport::stream::read_message;
use fedtune_shared::zo::round::{ClientReport, ZoServer};
use fedtune_tests::network::*;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How long the server may take to answer one stream on loopback before the test calls it hung.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// A daemon on loopback with its folders.
struct Harness {
    dir: tempfile::TempDir,
    model: std::path::PathBuf,
    server: TestServer,
}

impl Harness {
    /// A FedKSeed daemon with `clients` per round (and as many plan slots), one round, and
    /// `max_norm` as the report norm bound.
    fn start(clients: usize, max_norm: Option<f64>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let model = tiny_model_folder(dir.path(), 5);
        let mut config: ServerConfig =
            server_config(&dir.path().join("server"), &model, clients, 1);
        config.validation.max_update_norm = max_norm;
        let server = TestServer::start(config);
        Self { dir, model, server }
    }

    /// A new connection trusting the server's pinned certificate.
    async fn connect(&self) -> Connection {
        let identity = self.server.identity();
        let cert = identity.certificate_der().expect("certificate");
        Connection::open(identity.address, &cert)
            .await
            .expect("connect")
    }

    /// Enrolls a device through the real client SDK; returns its id and key.
    async fn enroll_client(&self, name: &str) -> (DeviceId, SigningKey) {
        let state = self.dir.path().join(name);
        let (mut sdk, _handle) = client(
            self.server.identity(),
            &state,
            &self.model,
            counting(0..2, 8),
        );
        let id = sdk.enroll(TOKEN).await.expect("enroll");
        let key = StateDir::open(&state)
            .expect("state dir")
            .device_key()
            .expect("device key");
        assert_eq!(key.public_key().device_id(), id);
        (id, key)
    }

    /// A new connection on which `device` has proved its key.
    async fn authenticated(&self, device: DeviceId, key: &SigningKey) -> Connection {
        let connection = self.connect().await;
        connection
            .authenticate(device, key)
            .await
            .expect("authenticate");
        connection
    }

    /// Polls and verifies the signed plan with the pinned plan key.
    async fn plan(&self, connection: &Connection, device: DeviceId) -> Plan {
        let response = connection
            .request(&Request::Poll(PollRequest { last_seen_round: 0 }))
            .await
            .expect("poll");
        let Response::Plan(signed) = response else {
            panic!("expected a plan, got {response:?}");
        };
        let key = self.server.identity().signing_key().expect("signing key");
        let plan: Plan = signed.verify(&key, PLAN_LABEL).expect("plan signature");
        assert_eq!(plan.device, device);
        plan
    }

    /// The value of the refusal counter of `reason` (0 while it has never moved).
    fn refused(&self, reason: &str) -> u64 {
        counter(
            &self.server.core.metrics().render(),
            &format!("fedtune_refused_total{{reason=\"{reason}\"}}"),
        )
    }

    /// The value of the invalid-report counter of `kind` (0 while it has never moved).
    fn invalid(&self, kind: &str) -> u64 {
        counter(
            &self.server.core.metrics().render(),
            &format!("fedtune_invalid_reports_total{{kind=\"{kind}\"}}"),
        )
    }

    /// Checks that the server still serves: a well-formed enrollment on `connection` succeeds,
    /// and on a new connection that device authenticates and gets a plan.
    async fn assert_serves(&self, connection: &Connection) {
        let key = SigningKey::generate().expect("key");
        let device = key.public_key().device_id();
        let response = connection
            .request(&enroll_request(&key))
            .await
            .expect("a well-formed enrollment after hostile input");
        assert!(
            matches!(response, Response::Enrolled { device: d } if d == device),
            "{response:?}"
        );
        let fresh = self.authenticated(device, &key).await;
        self.plan(&fresh, device).await;
        fresh.close().await;
    }
}

/// The value of the sample `series` (name with labels) in a Prometheus text exposition.
fn counter(text: &str, series: &str) -> u64 {
    text.lines()
        .filter_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .filter_map(|value| value.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .next()
        .unwrap_or(0)
}

fn enroll_request(key: &SigningKey) -> Request {
    Request::Enroll(EnrollRequest {
        token: TOKEN.into(),
        public_key: key.public_key(),
        capabilities: Capabilities {
            platform: "hostile-test".into(),
            backend: "cpu".into(),
            memory_bytes: 0,
            base_model: Digest([0; 32]),
        },
    })
}

/// A frame header with any version and declared length.
fn header(version: u16, len: u32) -> Vec<u8> {
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&version.to_le_bytes());
    bytes.extend_from_slice(&len.to_le_bytes());
    bytes
}

/// A well-formed header of this protocol version around `body`.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut bytes = header(PROTOCOL_VERSION, body.len() as u32);
    bytes.extend_from_slice(body);
    bytes
}

/// The encoded body of a message (a frame without its header).
fn body_of(request: &Request) -> Vec<u8> {
    frame::encode(request).expect("encode")[HEADER_LEN..].to_vec()
}

/// Writes `bytes` on a new stream (then finishes it when `finish`), and reads the answer with
/// the normal reader. The send half stays open until the answer is in.
async fn raw_exchange(connection: &Connection, bytes: &[u8], finish: bool) -> Response {
    let (mut send, mut recv) = connection.quic().open_bi().await.expect("open stream");
    // The server may answer after the header and stop reading; a refused write is its right.
    let _ = send.write_all(bytes).await;
    if finish {
        let _ = send.finish();
    }
    tokio::time::timeout(
        ANSWER_TIMEOUT,
        read_message::<Response>(&mut recv, MAX_RESPONSE_FRAME),
    )
    .await
    .expect("the server did not answer the stream")
    .expect("the answer is a valid frame in our version")
}

/// The code of an error response.
#[track_caller]
fn code_of(response: &Response) -> ErrorCode {
    match response {
        Response::Error(e) => e.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

/// The code of a refused `Connection::request`.
#[track_caller]
fn refusal(result: Result<Response, TransportError>) -> ErrorCode {
    match result {
        Err(TransportError::Refused(e)) => e.code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A FedKSeed report of `round` in `run_id`, consistent in itself.
fn fedkseed_report(run_id: u64, round: u64, seed_grads: Vec<(u32, f32)>, samples: u64) -> Report {
    Report {
        run_id,
        round,
        stats: LocalStats {
            samples,
            mean_loss: 3.5,
            first_loss: 3.6,
            loss_after: 3.5,
            wall_s: 0.25,
            peak_rss_bytes: None,
        },
        payload: ReportPayload::FedKSeed(ClientReport {
            round,
            seed_grads,
            step_grads: Vec::new(),
            samples,
        }),
    }
}

/// [`fedkseed_report`] as a request.
fn report(run_id: u64, round: u64, seed_grads: Vec<(u32, f32)>, samples: u64) -> Request {
    Request::Report(fedkseed_report(run_id, round, seed_grads, samples))
}

/// [`fedkseed_report`] changed by `edit`, as a request.
fn edited(run_id: u64, round: u64, edit: impl FnOnce(&mut Report, &mut ClientReport)) -> Request {
    let mut outer = fedkseed_report(run_id, round, vec![(3, 0.5)], 3);
    let ReportPayload::FedKSeed(mut inner) = outer.payload.clone() else {
        unreachable!("fedkseed_report builds a FedKSeed payload");
    };
    edit(&mut outer, &mut inner);
    outer.payload = ReportPayload::FedKSeed(inner);
    Request::Report(outer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_without_magic_is_malformed() {
    let h = Harness::start(50, None);
    let connection = h.connect().await;
    let response = raw_exchange(&connection, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", true).await;
    assert_eq!(code_of(&response), ErrorCode::Malformed);
    // Fewer bytes than a header, too.
    let response = raw_exchange(&connection, b"FT\x01", true).await;
    assert_eq!(code_of(&response), ErrorCode::Malformed);
    assert_eq!(h.refused("Malformed"), 2);
    h.assert_serves(&connection).await;
    connection.close().await;
    h.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_is_refused_before_the_body() {
    let h = Harness::start(50, None);
    let connection = h.connect().await;
    // One byte over the limit, header only, stream finished.
    let over = MAX_REQUEST_FRAME as u32 + 1;
    let response = raw_exchange(&connection, &header(PROTOCOL_VERSION, over), true).await;
    assert_eq!(code_of(&response), ErrorCode::TooLarge);
    // 4 GiB declared, the stream left open: an answer before any body byte shows that the server
    // neither waits for the body nor sizes a buffer for it (waiting would hang, reading to the
    // end would make it `Malformed`).
    let response = raw_exchange(&connection, &header(PROTOCOL_VERSION, u32::MAX), false).await;
    assert_eq!(code_of(&response), ErrorCode::TooLarge);
    assert_eq!(h.refused("TooLarge"), 2);
    // Exactly the limit is allowed: the header passes and the missing body is a truncation.
    let at_limit = MAX_REQUEST_FRAME as u32;
    let response = raw_exchange(&connection, &header(PROTOCOL_VERSION, at_limit), true).await;
    assert_eq!(code_of(&response), ErrorCode::Malformed);
    assert_eq!(h.refused("TooLarge"), 2);
    h.assert_serves(&connection).await;
    connection.close().await;
    h.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_body_is_malformed() {
    let h = Harness::start(50, None);
    let connection = h.connect().await;
    let mut bytes = header(PROTOCOL_VERSION, 100);
    bytes.extend_from_slice(&[7u8; 10]);
    let response = raw_exchange(&connection, &bytes, true).await;
    assert_eq!(code_of(&response), ErrorCode::Malformed);
    // A header cut short.
    let response = raw_exchange(&connection, &header(PROTOCOL_VERSION, 100)[..5], true).await;
    assert_eq!(code_of(&response), ErrorCode::Malformed);
    assert_eq!(h.refused("Malformed"), 2);
    h.assert_serves(&connection).await;
    connection.close().await;
    h.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_version_is_answered_in_the_servers_version() {
    let h = Harness::start(50, None);
    let connection = h.connect().await;
    let body = body_of(&Request::Poll(PollRequest { last_seen_round: 0 }));
    for version in [PROTOCOL_VERSION + 1, 0, u16::MAX] {
        let mut bytes = header(version, body.len() as u32);
        bytes.extend_from_slice(&body);
        // `raw_exchange` reads with the normal reader, which refuses any frame not in our
        // version: the answer is in the server's version.
        let response = raw_exchange(&connection, &bytes, true).await;
        assert_eq!(code_of(&response), ErrorCode::VersionMismatch, "{version}");
    }
    // The version is checked before the length: a foreign header declaring 4 GiB is a version
    // mismatch, answered at once.
    let response = raw_exchange(&connection, &header(PROTOCOL_VERSION + 1, u32::MAX), false).await;
    assert_eq!(code_of(&response), ErrorCode::VersionMismatch);
    assert_eq!(h.refused("VersionMismatch"), 4);
    h.assert_serves(&connection).await;
    connection.close().await;
    h.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_exactly_a_request_is_malformed() {
    let h = Harness::start(50, None);
    let connection = h.connect().await;

    // Random bytes of the declared length; the first byte is a variant index no `Request` has.
    let mut body = vec![0u8; 64];
    ChaCha8Rng::seed_from_u64(7).fill_bytes(&mut body);
    body[0] = 200;
    let response = raw_exchange(&connection, &framed(&body), true).await;
    assert_eq!(code_of(&response), ErrorCode::Malformed);

    // A valid request followed by trailing bytes inside the declared length.
    let mut body = body_of(&Request::Poll(PollRequest { last_seen_round: 0 }));
    body.extend_from_slice(&[0, 0, 0]);
    let response = raw_exchange(&connection, &framed(&body), true).await;
    assert_eq!(code_of(&response), ErrorCode::Malformed);

    // An enrollment whose token claims 2^40 bytes in a small body: refused, not allocated.
    let mut body = vec![0u8]; // Request::Enroll
    body.push(253); // varint: a u64 length follows
    body.extend_from_slice(&(1u64 << 40).to_le_bytes());
    body.extend_from_slice(b"token");
    let response = raw_exchange(&connection, &framed(&body), true).await;
    assert_eq!(code_of(&response), ErrorCode::Malformed);

    // An empty body.
    let response = raw_exchange(&connection, &framed(&[]), true).await;
    assert_eq!(code_of(&response), ErrorCode::Malformed);

    assert_eq!(h.refused("Malformed"), 4);
    h.assert_serves(&connection).await;
    connection.close().await;
    h.server.stop().await;
}

/// A server of 3 devices per round with the norm bound 10, one device holding a verified plan
/// of round 1 on an authenticated connection.
struct WithPlan {
    h: Harness,
    device: DeviceId,
    key: SigningKey,
    connection: Connection,
    plan: Plan,
    k: u32,
}

impl WithPlan {
    async fn start() -> Self {
        let h = Harness::start(3, Some(10.0));
        let (device, key) = h.enroll_client("device").await;
        let connection = h.authenticated(device, &key).await;
        let plan = h.plan(&connection, device).await;
        assert_eq!(plan.run_id, h.server.core.run_id());
        assert_eq!(plan.round, 1);
        let Task::FedKSeed { plan: inner, .. } = &plan.task else {
            panic!("expected a FedKSeed task, got {:?}", plan.task);
        };
        let k = inner.config.k;
        assert_eq!(k, fedkseed_run().k);
        Self {
            h,
            device,
            key,
            connection,
            plan,
            k,
        }
    }

    /// A report that passes validation.
    fn valid(&self) -> Request {
        report(
            self.plan.run_id,
            self.plan.round,
            vec![(0, 0.5), (self.k - 1, -0.25)],
            3,
        )
    }

    /// The server still serves this device: a new poll returns its plan again (a device with a
    /// plan and no report keeps its slot).
    async fn assert_still_planned(&self) {
        let again = self.h.plan(&self.connection, self.device).await;
        assert_eq!(again.round, self.plan.round);
        assert_eq!(again.run_id, self.plan.run_id);
    }

    async fn stop(self) {
        self.connection.close().await;
        self.h.server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedkseed_reports_that_fail_validation_are_invalid() {
    let s = WithPlan::start().await;
    let (run, round, k) = (s.plan.run_id, s.plan.round, s.k);
    let cases = [
        (
            "NaN",
            report(run, round, vec![(3, f32::NAN)], 3),
            "not_finite",
        ),
        (
            "Inf",
            report(run, round, vec![(3, f32::INFINITY)], 3),
            "not_finite",
        ),
        (
            "seed >= K",
            report(run, round, vec![(k, 0.5)], 3),
            "seed_range",
        ),
        (
            "no samples",
            report(run, round, vec![(3, 0.5)], 0),
            "no_samples",
        ),
        ("norm", report(run, round, vec![(3, 1e6)], 3), "norm"),
        (
            "more samples than a round has",
            report(run, round, vec![(3, 0.5)], 4),
            "samples",
        ),
        // Beyond the list: the other checks of the FedKSeed validation.
        (
            "inner round differs",
            edited(run, round, |_, inner| inner.round = round + 1),
            "wrong_round",
        ),
        (
            "samples disagree",
            edited(run, round, |outer, _| outer.stats.samples = 9),
            "inconsistent",
        ),
        (
            "seed twice",
            edited(run, round, |_, inner| {
                inner.seed_grads = vec![(3, 0.5), (3, 0.5)]
            }),
            "duplicate_seed",
        ),
        (
            "NaN loss",
            edited(run, round, |outer, _| outer.stats.mean_loss = f32::NAN),
            "not_finite",
        ),
        (
            "LoRA payload",
            Request::Report(Report {
                payload: ReportPayload::Lora {
                    adapter: BlobRef {
                        digest: Digest([1; 32]),
                        len: 16,
                    },
                    rank: 4,
                },
                ..fedkseed_report(run, round, vec![(3, 0.5)], 3)
            }),
            "payload",
        ),
    ];
    for (what, request, kind) in cases {
        let (invalid, by_kind) = (s.h.refused("Invalid"), s.h.invalid(kind));
        let code = refusal(s.connection.request(&request).await);
        assert_eq!(code, ErrorCode::Invalid, "{what}");
        assert_eq!(s.h.refused("Invalid"), invalid + 1, "{what}");
        assert_eq!(s.h.invalid(kind), by_kind + 1, "{what}");
        s.assert_still_planned().await;
    }
    assert_eq!(s.h.server.core.store().report_count(round).unwrap(), 0);
    assert_eq!(
        counter(
            &s.h.server.core.metrics().render(),
            "fedtune_reports_accepted_total"
        ),
        0
    );
    // The refusals cost the device nothing: its valid report is then accepted.
    let response = s.connection.request(&s.valid()).await.unwrap();
    assert!(
        matches!(response, Response::Accepted { round: r, duplicate: false } if r == round),
        "{response:?}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_report_is_accepted_once_and_stored_once() {
    let s = WithPlan::start().await;
    let round = s.plan.round;
    let valid = s.valid();
    let first = s.connection.request(&valid).await.unwrap();
    assert!(
        matches!(first, Response::Accepted { round: r, duplicate: false } if r == round),
        "{first:?}"
    );
    let stored = s.h.server.core.store().reports(round).unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].0, s.device.0);

    // The same bytes again, on the same connection and (a resend after a lost acknowledgement)
    // on a new one.
    let again = s.connection.request(&valid).await.unwrap();
    assert!(
        matches!(again, Response::Accepted { round: r, duplicate: true } if r == round),
        "{again:?}"
    );
    let other = s.h.authenticated(s.device, &s.key).await;
    let again = other.request(&valid).await.unwrap();
    assert!(
        matches!(again, Response::Accepted { round: r, duplicate: true } if r == round),
        "{again:?}"
    );
    other.close().await;

    // Stored once, counted once; the round (3 per round) stays open.
    assert_eq!(s.h.server.core.store().reports(round).unwrap(), stored);
    assert_eq!(s.h.server.core.store().report_count(round).unwrap(), 1);
    let text = s.h.server.core.metrics().render();
    assert_eq!(counter(&text, "fedtune_reports_accepted_total"), 1);
    assert_eq!(counter(&text, "fedtune_rounds_completed_total"), 0);
    assert_eq!(s.h.server.core.round().0, round);
    // Still serving: the device that reported is told to wait.
    let response = s
        .connection
        .request(&Request::Poll(PollRequest { last_seen_round: 0 }))
        .await
        .unwrap();
    assert!(matches!(response, Response::Wait { .. }), "{response:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_for_another_round_run_or_device_are_refused() {
    let s = WithPlan::start().await;
    let (run, round) = (s.plan.run_id, s.plan.round);
    let grads = || vec![(1, 0.5)];

    // A round that is not open: one far ahead, and round 0 (never a round).
    for bad in [round + 5, 0] {
        let wrong = s.h.refused("WrongRound");
        let code = refusal(s.connection.request(&report(run, bad, grads(), 3)).await);
        assert_eq!(code, ErrorCode::WrongRound, "round {bad}");
        assert_eq!(s.h.refused("WrongRound"), wrong + 1);
        s.assert_still_planned().await;
    }

    // Another run (e.g. a device holding a plan of a run since reset).
    let wrong = s.h.refused("WrongRound");
    let code = refusal(
        s.connection
            .request(&report(run.wrapping_add(1), round, grads(), 3))
            .await,
    );
    assert_eq!(code, ErrorCode::WrongRound);
    assert_eq!(s.h.refused("WrongRound"), wrong + 1);
    s.assert_still_planned().await;

    // An enrolled, authenticated device that never polled has no plan this round.
    let (second, second_key) = s.h.enroll_client("second").await;
    let other = s.h.authenticated(second, &second_key).await;
    let code = refusal(other.request(&report(run, round, grads(), 3)).await);
    assert_eq!(code, ErrorCode::NotSelected);
    assert_eq!(s.h.refused("NotSelected"), 1);
    // … and once it polls, it gets a plan and its report counts.
    s.h.plan(&other, second).await;
    let response = other
        .request(&report(run, round, grads(), 3))
        .await
        .unwrap();
    assert!(
        matches!(
            response,
            Response::Accepted {
                duplicate: false,
                ..
            }
        ),
        "{response:?}"
    );
    other.close().await;

    assert_eq!(s.h.server.core.store().report_count(round).unwrap(), 1);
    for bad in [0, round + 5] {
        assert_eq!(s.h.server.core.store().report_count(bad).unwrap(), 0);
    }
    // The first device is still served and its valid report is accepted.
    let response = s.connection.request(&s.valid()).await.unwrap();
    assert!(
        matches!(
            response,
            Response::Accepted {
                duplicate: false,
                ..
            }
        ),
        "{response:?}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_without_authentication_is_unauthenticated() {
    let s = WithPlan::start().await;
    let connection = s.h.connect().await;
    let code = refusal(connection.request(&s.valid()).await);
    assert_eq!(code, ErrorCode::Unauthenticated);
    assert_eq!(s.h.refused("Unauthenticated"), 1);
    assert_eq!(
        s.h.server.core.store().report_count(s.plan.round).unwrap(),
        0
    );
    // The same connection, once authenticated, delivers the same report.
    connection.authenticate(s.device, &s.key).await.unwrap();
    let response = connection.request(&s.valid()).await.unwrap();
    assert!(
        matches!(
            response,
            Response::Accepted {
                duplicate: false,
                ..
            }
        ),
        "{response:?}"
    );
    connection.close().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_streams_does_not_stop_the_server() {
    const STREAMS: u64 = 200;
    let h = Harness::start(50, None);
    let connection = h.connect().await;
    let quic = connection.quic().clone();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..STREAMS {
        let quic = quic.clone();
        tasks.spawn(async move {
            let mut garbage = vec![0u8; 32 + (n as usize % 64)];
            ChaCha8Rng::seed_from_u64(n).fill_bytes(&mut garbage);
            garbage[0] = b'X'; // never the magic
            let (mut send, mut recv) = quic.open_bi().await.expect("open stream");
            let _ = send.write_all(&garbage).await;
            let _ = send.finish();
            let response = tokio::time::timeout(
                ANSWER_TIMEOUT,
                read_message::<Response>(&mut recv, MAX_RESPONSE_FRAME),
            )
            .await
            .expect("no answer")
            .expect("a valid answer frame");
            code_of(&response)
        });
    }
    let mut answered = 0;
    while let Some(code) = tasks.join_next().await {
        assert_eq!(code.unwrap(), ErrorCode::Malformed);
        answered += 1;
    }
    assert_eq!(answered, STREAMS);
    assert_eq!(h.refused("Malformed"), STREAMS);

    // The hostile connection itself still works, and a real client is served.
    h.assert_serves(&connection).await;
    let (device, key) = h.enroll_client("good").await;
    let good = h.authenticated(device, &key).await;
    let plan = h.plan(&good, device).await;
    assert_eq!(plan.round, 1);
    good.close().await;
    connection.close().await;
    h.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_grads_outside_fedkseed_pro_are_invalid() {
    let s = WithPlan::start().await;
    assert!(!fedkseed_run().pro);
    let (run, round) = (s.plan.run_id, s.plan.round);
    // An honest device sends no step_grads without Pro, and at most τ with it; these are
    // 200 000 finite values far over the norm bound (10), in a 1 MB frame under the limit.
    let request = edited(run, round, |_, inner| {
        inner.step_grads = (0..200_000u32).map(|i| (i % s.k, 1e30)).collect();
    });
    let code = refusal(s.connection.request(&request).await);
    assert_eq!(code, ErrorCode::Invalid);
    assert_eq!(s.h.server.core.store().report_count(round).unwrap(), 0);
    s.assert_still_planned().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_whose_samples_overflow_the_round_total_do_not_wedge_it() {
    let h = Harness::start(2, None);
    let run = h.server.core.run_id();
    let huge = u64::MAX / 2 + 1;
    let mut connections = Vec::new();
    for name in ["first", "second"] {
        let (device, key) = h.enroll_client(name).await;
        let connection = h.authenticated(device, &key).await;
        h.plan(&connection, device).await;
        // Accepted (samples are the device's word) or refused as implausible; never a server
        // failure.
        match connection
            .request(&report(run, 1, vec![(1, 0.5)], huge))
            .await
        {
            Ok(Response::Accepted { .. }) => {}
            Err(TransportError::Refused(e)) => {
                assert_eq!(e.code, ErrorCode::Invalid, "{name}: {e}")
            }
            other => panic!("{name}: {other:?}"),
        }
        connections.push(connection);
    }
    // The round is not left closing (aggregated, or never closed), and the algorithm's round is
    // the orchestrator's.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while h.server.core.round().1 == Phase::Closing {
        assert!(
            std::time::Instant::now() < deadline,
            "the round is wedged in Closing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let algorithm: ZoServer =
        frame::decode_body(&h.server.core.algorithm_state()).expect("algorithm state");
    assert_eq!(algorithm.round(), h.server.core.round().0);
    for connection in connections {
        connection.close().await;
    }
    h.server.stop().await;
}
