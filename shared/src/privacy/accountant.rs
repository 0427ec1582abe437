//! A privacy accountant: Rényi differential privacy (RDP) of the subsampled Gaussian mechanism,
//! composed over rounds and converted to (ε, δ).
//!
//! One round samples each client with probability `q` and adds Gaussian noise of `z` times the
//! clipping norm to the sum. Its RDP at order `α` is `log(A_α) / (α − 1)` with `A_α` from
//! Mironov, Talwar and Zhang 2019 ("Rényi Differential Privacy of the Sampled Gaussian
//! Mechanism"): a finite binomial sum for integer `α` (their Theorem 9 / eq. 3), and for
//! fractional `α` the two convergent series with `erfc` terms of their section 3.3; this is
//! the computation of TensorFlow Privacy's `rdp_accountant`. RDP composes by addition over
//! rounds; `(ε, δ)` follows by minimising over the orders either Mironov 2017's classic
//! conversion `ε = RDP(α) + log(1/δ)/(α − 1)` or the tighter one of Balle et al. 2020 /
//! Canonne, Kamath and Steinke 2020:
//! `ε = RDP(α) + log((α − 1)/α) − (log δ + log α)/(α − 1)`.
//!
//! No maintained Rust crate offers this, hence the implementation; the tests check it against
//! TensorFlow Privacy's published numbers.

use serde::{Deserialize, Serialize};

/// The orders TensorFlow Privacy's `compute_dp_sgd_privacy` used: 1.1, 1.2, …, 10.9, 12, …, 63.
pub fn default_orders() -> Vec<f64> {
    (1..100)
        .map(|x| 1.0 + f64::from(x) / 10.0)
        .chain((12..64).map(f64::from))
        .collect()
}

/// `log(exp(a) + exp(b))` without overflow.
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// `log(exp(a) − exp(b))` for `a ≥ b`.
fn log_sub(a: f64, b: f64) -> f64 {
    if b == f64::NEG_INFINITY {
        return a;
    }
    if a <= b {
        return f64::NEG_INFINITY;
    }
    a + (-(b - a).exp()).ln_1p()
}

/// `log(erfc(x))`, with the asymptotic expansion where `erfc` underflows.
fn log_erfc(x: f64) -> f64 {
    if x < 25.0 {
        libm::erfc(x).ln()
    } else {
        let r = 1.0 / (x * x);
        -x * x - x.ln() - 0.5 * std::f64::consts::PI.ln()
            + (1.0 - 0.5 * r + 0.75 * r * r - 1.875 * r * r * r).ln()
    }
}

/// `ln Γ`-free `ln C(n, k)` for integer `n`.
fn log_binomial(n: u64, k: u64) -> f64 {
    (1..=k).map(|i| ((n - k + i) as f64 / i as f64).ln()).sum()
}

/// `log A_α` for an integer order.
fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    (0..=alpha).fold(f64::NEG_INFINITY, |acc, i| {
        let i_f = i as f64;
        let term = log_binomial(alpha, i)
            + i_f * q.ln()
            + (alpha - i) as f64 * (1.0 - q).ln()
            + (i_f * i_f - i_f) / (2.0 * sigma * sigma);
        log_add(acc, term)
    })
}

/// `log A_α` for a fractional order.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let mut coef = 1.0f64; // C(α, i), built up term by term; its sign alternates past i > α.
    let mut i = 0u32;
    loop {
        let i_f = f64::from(i);
        let j = alpha - i_f;
        let log_coef = coef.abs().ln();
        let log_t0 = log_coef + i_f * q.ln() + j * (1.0 - q).ln();
        let log_t1 = log_coef + j * q.ln() + i_f * (1.0 - q).ln();
        let sqrt2s = std::f64::consts::SQRT_2 * sigma;
        let log_e0 = 0.5f64.ln() + log_erfc((i_f - z0) / sqrt2s);
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / sqrt2s);
        let log_s0 = log_t0 + (i_f * i_f - i_f) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        if coef > 0.0 {
            log_a0 = log_add(log_a0, log_s0);
            log_a1 = log_add(log_a1, log_s1);
        } else {
            log_a0 = log_sub(log_a0, log_s0);
            log_a1 = log_sub(log_a1, log_s1);
        }
        coef *= (alpha - i_f) / (i_f + 1.0);
        i += 1;
        if log_s0.max(log_s1) < -30.0 || i > 10_000 {
            break;
        }
    }
    log_add(log_a0, log_a1)
}

/// The RDP at order `alpha` of one step of the Gaussian mechanism with noise multiplier
/// `sigma`, each record (client) sampled with probability `q`.
pub fn subsampled_gaussian_rdp(q: f64, sigma: f64, alpha: f64) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if sigma <= 0.0 {
        return f64::INFINITY;
    }
    if q >= 1.0 {
        return alpha / (2.0 * sigma * sigma);
    }
    if alpha.is_infinite() {
        return f64::INFINITY;
    }
    let log_a = if alpha.fract() == 0.0 {
        log_a_int(q, sigma, alpha as u64)
    } else {
        log_a_frac(q, sigma, alpha)
    };
    log_a / (alpha - 1.0)
}

/// How RDP becomes (ε, δ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Conversion {
    /// Mironov 2017, Proposition 3: `ε = RDP(α) + log(1/δ)/(α − 1)`.
    Classic,
    /// Balle et al. 2020, Theorem 21 (tighter, the default).
    #[default]
    Improved,
}

/// Accumulated RDP of a run, one value per order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
    steps: u64,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self::new(default_orders())
    }
}

impl RdpAccountant {
    /// An accountant over `orders` (each above 1), with nothing spent.
    pub fn new(orders: Vec<f64>) -> Self {
        let orders: Vec<f64> = orders.into_iter().filter(|a| *a > 1.0).collect();
        let rdp = vec![0.0; orders.len()];
        Self {
            orders,
            rdp,
            steps: 0,
        }
    }

    /// Records `steps` rounds of the Gaussian mechanism with noise multiplier `sigma` and
    /// sampling probability `q`.
    pub fn compose(&mut self, q: f64, sigma: f64, steps: u64) {
        for (r, &alpha) in self.rdp.iter_mut().zip(&self.orders) {
            *r += steps as f64 * subsampled_gaussian_rdp(q, sigma, alpha);
        }
        self.steps += steps;
    }

    /// Rounds recorded.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The smallest ε over the orders for `delta`, and the order that gives it.
    pub fn epsilon(&self, delta: f64, conversion: Conversion) -> (f64, f64) {
        if self.steps == 0 {
            return (0.0, f64::NAN);
        }
        self.orders
            .iter()
            .zip(&self.rdp)
            .map(|(&a, &r)| {
                let eps = match conversion {
                    Conversion::Classic => r - delta.ln() / (a - 1.0),
                    Conversion::Improved => {
                        r + ((a - 1.0) / a).ln() - (delta.ln() + a.ln()) / (a - 1.0)
                    }
                };
                (eps.max(0.0), a)
            })
            .fold((f64::INFINITY, f64::NAN), |best, x| {
                if x.0 < best.0 { x } else { best }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TensorFlow Privacy, `tutorials/README.md` (the MNIST DP-SGD tutorial's table and its
    /// `compute_dp_sgd_privacy.py --N=60000 --batch_size=256 --noise_multiplier=1.1
    /// --epochs=60 --delta=1e-5` example, "eps = 3.01"): N = 60000, batch 256 (q = 256/60000),
    /// steps = ⌈epochs · N / batch⌉, δ = 1e-5, the classic conversion over the default
    /// orders. Published: z = 1.1, 60 epochs → 3.01; z = 1.3, 15 epochs → 1.19;
    /// z = 0.7, 45 epochs → 7.10.
    #[test]
    fn epsilon_matches_tensorflow_privacy_within_one_percent() {
        let q = 256.0 / 60000.0;
        for (sigma, epochs, published) in [(1.1, 60.0, 3.01), (1.3, 15.0, 1.19), (0.7, 45.0, 7.10)]
        {
            let steps = (epochs * 60000.0 / 256.0f64).ceil() as u64;
            let mut accountant = RdpAccountant::default();
            accountant.compose(q, sigma, steps);
            let (eps, order) = accountant.epsilon(1e-5, Conversion::Classic);
            assert!(
                (eps - published).abs() / published < 0.01,
                "z={sigma}, {epochs} epochs: ε = {eps} at order {order}, published {published}"
            );
            let (tighter, _) = accountant.epsilon(1e-5, Conversion::Improved);
            assert!(tighter < eps);
        }
    }

    #[test]
    fn full_batch_is_the_plain_gaussian_mechanism() {
        // q = 1: RDP(α) = α / (2σ²) exactly.
        assert_eq!(subsampled_gaussian_rdp(1.0, 2.0, 3.0), 3.0 / 8.0);
        // Integer and fractional code paths agree around an integer order.
        let a = subsampled_gaussian_rdp(0.01, 1.0, 4.0);
        let b = subsampled_gaussian_rdp(0.01, 1.0, 4.0 + 1e-9);
        assert!((a - b).abs() / a < 1e-4, "{a} vs {b}");
        // More rounds cost more.
        let mut acc = RdpAccountant::default();
        acc.compose(0.01, 1.0, 100);
        let e100 = acc.epsilon(1e-5, Conversion::Improved).0;
        acc.compose(0.01, 1.0, 100);
        assert!(acc.epsilon(1e-5, Conversion::Improved).0 > e100);
    }
}
