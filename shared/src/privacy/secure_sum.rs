//! An in-process driver of one secure-aggregation session: a [`SecAggServer`] and N
//! [`SecAggClient`]s exchanging their messages in memory, with chosen clients dropping out at
//! chosen phases. Tests, `fedtune bench privacy` and the simulation harness use it; it also
//! measures what the protocol costs (bytes each client sends and receives as the wire format
//! encodes them, and the time spent in the server's and the clients' machines).

use std::collections::BTreeSet;
use std::time::Instant;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::Serialize;

use super::secagg::{ClientId, SecAggClient, SecAggConfig, SecAggError, SecAggServer, SecureSum};

/// Who drops out of a session, and when.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dropouts {
    /// Clients that share keys, then vanish before sending their masked input: their updates
    /// are left out and their pairwise masks are removed from their neighbours' inputs.
    pub before_input: BTreeSet<ClientId>,
    /// Clients that send their masked input, then vanish before revealing shares: their
    /// updates are in the sum; their neighbours reveal enough shares without them.
    pub before_unmask: BTreeSet<ClientId>,
}

/// What one session gave and cost.
#[derive(Debug, Clone, PartialEq)]
pub struct SecureSumRun {
    /// The server's result.
    pub result: SecureSum,
    /// Mean bytes a client that finished the session sent, over all four phases.
    pub upload_bytes_per_client: f64,
    /// Mean bytes such a client received.
    pub download_bytes_per_client: f64,
    /// Seconds spent in the server's machine (summing, unmasking), over the whole session.
    pub server_s: f64,
    /// Mean seconds spent in one client's machine (sharing, masking).
    pub client_s: f64,
}

fn size<T: Serialize>(m: &T) -> usize {
    crate::zo::round::wire_size(m)
}

/// Runs one session in which client `i` (id `i`) contributes `inputs[i]`; client secrets come
/// from `seed` (a simulation: a device uses [`super::secagg::os_seed`]).
///
/// # Errors
///
/// Any [`SecAggError`] of the machines, e.g. when drop-outs leave a neighbourhood below its
/// threshold.
pub fn run_secure_sum(
    config: &SecAggConfig,
    inputs: &[Vec<f32>],
    dropouts: &Dropouts,
    seed: u64,
) -> Result<SecureSumRun, SecAggError> {
    let n = inputs.len();
    let mut up = vec![0usize; n];
    let mut down = vec![0usize; n];
    let mut client_s = vec![0.0f64; n];
    let mut server_s = 0.0f64;
    let mut seeds = ChaCha20Rng::seed_from_u64(seed);
    let mut server = SecAggServer::new(*config);
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = [0u8; 32];
        seeds.fill_bytes(&mut s);
        let t = Instant::now();
        let (client, advert) = SecAggClient::new(*config, i as ClientId, s);
        client_s[i] += t.elapsed().as_secs_f64();
        up[i] += size(&advert);
        let t = Instant::now();
        server.handle_advertisement(advert)?;
        server_s += t.elapsed().as_secs_f64();
        clients.push(client);
    }
    let t = Instant::now();
    let neighbour_keys = server.close_advertisements()?;
    server_s += t.elapsed().as_secs_f64();
    for (id, msg) in neighbour_keys {
        let i = id as usize;
        down[i] += size(&msg);
        let t = Instant::now();
        let bundle = clients[i].handle_neighbour_keys(msg)?;
        client_s[i] += t.elapsed().as_secs_f64();
        up[i] += size(&bundle);
        let t = Instant::now();
        server.handle_share_bundle(bundle)?;
        server_s += t.elapsed().as_secs_f64();
    }
    let t = Instant::now();
    let forwarded = server.close_share_bundles()?;
    server_s += t.elapsed().as_secs_f64();
    for (id, msg) in forwarded {
        let i = id as usize;
        if dropouts.before_input.contains(&id) {
            continue;
        }
        down[i] += size(&msg);
        let t = Instant::now();
        let masked = clients[i].handle_forwarded_shares(msg, &inputs[i])?;
        client_s[i] += t.elapsed().as_secs_f64();
        up[i] += size(&masked);
        let t = Instant::now();
        server.handle_masked_input(masked)?;
        server_s += t.elapsed().as_secs_f64();
    }
    let t = Instant::now();
    let requests = server.close_masked_inputs()?;
    server_s += t.elapsed().as_secs_f64();
    let mut finished = 0usize;
    let (mut up_total, mut down_total, mut client_total) = (0usize, 0usize, 0.0f64);
    for (id, msg) in requests {
        let i = id as usize;
        if dropouts.before_unmask.contains(&id) {
            continue;
        }
        down[i] += size(&msg);
        let t = Instant::now();
        let response = clients[i].handle_unmask_request(msg)?;
        client_s[i] += t.elapsed().as_secs_f64();
        up[i] += size(&response);
        let t = Instant::now();
        server.handle_unmask_response(response)?;
        server_s += t.elapsed().as_secs_f64();
        finished += 1;
        up_total += up[i];
        down_total += down[i];
        client_total += client_s[i];
    }
    let t = Instant::now();
    let result = server.finish()?;
    server_s += t.elapsed().as_secs_f64();
    let per = finished.max(1) as f64;
    Ok(SecureSumRun {
        result,
        upload_bytes_per_client: up_total as f64 / per,
        download_bytes_per_client: down_total as f64 / per,
        server_s,
        client_s: client_total / per,
    })
}
