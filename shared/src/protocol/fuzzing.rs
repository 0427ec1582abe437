//! The bodies of the fuzz targets in `fuzz/fuzz_targets/`, one function per decoder. They live
//! here so that `cargo fuzz` and plain `cargo test` (`shared/tests/fuzz_corpus.rs`, which replays
//! the committed corpus and every regression) run the same checks. Not part of the API.
//!
//! Each function takes arbitrary bytes, may refuse them (any `Err` is fine) and panics only when
//! a decoder breaks a promise: a panic inside a decoder, or a decoded value that does not survive
//! encode → decode → encode byte for byte, or one that breaks an invariant the decoder claims to
//! check.

use std::sync::OnceLock;

use serde::Serialize;

use super::adapter_blob::{decode_adapter, encode_adapter};
use super::auth::{PLAN_LABEL, Signed, SigningKey};
use super::frame::{self, FrameHeader, HEADER_LEN};
use super::message::{Plan, Request, Response};
use super::{MAX_REQUEST_FRAME, MAX_RESPONSE_FRAME};

/// A fixed Ed25519 key for the signed-plan target (the fuzzer needs the same key on every run to
/// reproduce a finding): ring's PKCS#8 v2 document for the seed SHA-256("fedtune fuzz key").
pub const FUZZ_KEY_PKCS8: [u8; 85] = [
    0x30, 0x53, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
    0xcc, 0x2b, 0x42, 0xa5, 0xc4, 0xd7, 0x5e, 0xd1, 0x46, 0x12, 0x6f, 0x1b, 0x62, 0xe4, 0x57, 0x81,
    0x57, 0x62, 0xa4, 0x4e, 0x6e, 0x04, 0xde, 0x20, 0xee, 0x11, 0xeb, 0x13, 0x7c, 0x0c, 0x64, 0xfa,
    0xa1, 0x23, 0x03, 0x21, 0x00, 0xd9, 0x7b, 0xaa, 0x69, 0xdd, 0xb7, 0xf1, 0xcf, 0x55, 0x11, 0x95,
    0xc4, 0xbf, 0xf0, 0xfe, 0xe1, 0xf7, 0xc9, 0x39, 0xa3, 0x68, 0x00, 0xa4, 0xeb, 0xbe, 0x32, 0xa3,
    0x8d, 0x57, 0x52, 0x45, 0x32,
];

/// The fixed key of [`signed_plan`] (parsed once: the target runs millions of times).
pub fn fuzz_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| {
        SigningKey::from_pkcs8(&FUZZ_KEY_PKCS8).expect("the fixed fuzz key is a valid PKCS#8 key")
    })
}

/// Checks the header parser against `frame::decode`'s verdict on a whole frame: a frame that
/// decodes has a header that parses and declares exactly the bytes after it.
fn check_header(data: &[u8], limit: usize, decoded: bool) {
    let Some(header) = data.first_chunk::<HEADER_LEN>() else {
        assert!(!decoded, "a frame shorter than its header decoded");
        return;
    };
    match FrameHeader::parse(header, limit) {
        Ok(h) => {
            assert!(h.len as usize <= limit, "header over the limit parsed");
            if decoded {
                assert_eq!(h.len as usize, data.len() - HEADER_LEN);
            }
        }
        Err(_) => assert!(!decoded, "a frame whose header is refused decoded"),
    }
}

/// Encodes a decoded message again, decodes that, and checks the second encoding is the first:
/// whatever a peer accepts, it can send back unchanged, within the same limit.
fn frame_round_trip<T: Serialize + serde::de::DeserializeOwned>(
    message: &T,
    original_len: usize,
    limit: usize,
) {
    let once = frame::encode(message).expect("a decoded message encodes");
    assert!(
        once.len() <= original_len,
        "re-encoding grew the frame from {original_len} to {} bytes",
        once.len()
    );
    let again: T = frame::decode(&once, limit).expect("a re-encoded message decodes");
    let twice = frame::encode(&again).expect("a decoded message encodes");
    assert_eq!(once, twice, "encode → decode → encode changed the bytes");
}

/// Target `request`: a frame as the server reads it from a device (untrusted).
pub fn request(data: &[u8]) {
    let decoded = frame::decode::<Request>(data, MAX_REQUEST_FRAME);
    check_header(data, MAX_REQUEST_FRAME, decoded.is_ok());
    if let Ok(request) = decoded {
        frame_round_trip(&request, data.len(), MAX_REQUEST_FRAME);
    }
}

/// Target `response`: a frame as a device reads it from the server.
pub fn response(data: &[u8]) {
    let decoded = frame::decode::<Response>(data, MAX_RESPONSE_FRAME);
    check_header(data, MAX_RESPONSE_FRAME, decoded.is_ok());
    if let Ok(response) = decoded {
        frame_round_trip(&response, data.len(), MAX_RESPONSE_FRAME);
    }
}

/// Target `adapter_blob`: an uploaded or downloaded adapter. A decoded adapter must be
/// consistent (every factor as long as its declared shape, every value finite) and survive
/// encode → decode → encode byte for byte.
pub fn adapter_blob(data: &[u8]) {
    let Ok(adapter) = decode_adapter(data) else {
        return;
    };
    for (layer, f) in &adapter.layers {
        assert_eq!(f.rank, adapter.rank, "layer {layer:?}: rank differs");
        let a = f.rank.checked_mul(f.d_in);
        let b = f.d_out.checked_mul(f.rank);
        assert_eq!(a, Some(f.a.len()), "layer {layer:?}: A is not rank × d_in");
        assert_eq!(b, Some(f.b.len()), "layer {layer:?}: B is not d_out × rank");
        assert!(f.a.iter().chain(&f.b).all(|v| v.is_finite()));
    }
    let once = encode_adapter(&adapter);
    let again = decode_adapter(&once).expect("a re-encoded adapter decodes");
    let twice = encode_adapter(&again);
    assert_eq!(once, twice, "encode → decode → encode changed the bytes");
}

/// Target `signed_plan`: bytes read as a [`Signed<Plan>`] body, verified with the fixed key
/// (refused, short of forging Ed25519); then the same signed bytes signed properly with that key,
/// so that the plan decoder behind the signature check is reached too.
pub fn signed_plan(data: &[u8]) {
    let key = fuzz_key();
    let public = key.public_key();
    let Ok(signed) = frame::decode_body::<Signed<Plan>>(data) else {
        return;
    };
    if let Ok(plan) = signed.verify(&public, PLAN_LABEL) {
        // Only reachable with a valid signature by the fixed key (a committed seed).
        plan_round_trip(key, &plan);
    }
    // The same body, signed by the fixed key.
    let mut signed = signed;
    let body = std::mem::take(signed.body_mut());
    let signature = key.sign(PLAN_LABEL, &body);
    let resigned = bincode::serde::encode_to_vec((&body, &signature), bincode::config::standard())
        .expect("two byte strings encode");
    let resigned: Signed<Plan> =
        frame::decode_body(&resigned).expect("a Signed is its body and its signature");
    if let Ok(plan) = resigned.verify(&public, PLAN_LABEL) {
        plan_round_trip(key, &plan);
    }
}

fn plan_round_trip(key: &SigningKey, plan: &Plan) {
    let public = key.public_key();
    let once = key.sign_value(PLAN_LABEL, plan).expect("a plan encodes");
    let again = once
        .verify(&public, PLAN_LABEL)
        .expect("a signed plan verifies");
    let twice = key.sign_value(PLAN_LABEL, &again).expect("a plan encodes");
    let bytes = |s: &Signed<Plan>| frame::encode(s).expect("a signed plan encodes");
    assert_eq!(
        bytes(&once),
        bytes(&twice),
        "encode → decode → encode changed the bytes"
    );
}
