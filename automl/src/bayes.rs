//! Bayesian optimisation: a Gaussian process on the unit cube (Matérn 5/2 kernel, one length
//! scale chosen by marginal likelihood from a small grid, the observations standardised, a small
//! noise term) and expected improvement maximised over random candidates. Trials still running
//! count as observed at the model's own mean (the "kriging believer"), so concurrent proposals
//! spread out instead of piling onto one point.
//!
//! No crate does this small job without pulling a linear-algebra stack; the n ≤ a few hundred
//! trials of a search need only a Cholesky factorisation, written here.

use crate::rng::Rng;

/// Candidates scored by expected improvement per proposal.
const CANDIDATES: usize = 2000;
/// Observation noise (on the standardised scale): keeps the factorisation stable.
const NOISE: f64 = 1e-3;
/// Length scales tried when fitting (unit cube).
const LENGTH_SCALES: [f64; 6] = [0.05, 0.1, 0.2, 0.35, 0.6, 1.0];

fn matern52(a: &[f64], b: &[f64], l: f64) -> f64 {
    let r = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt()
        / l;
    let s = 5f64.sqrt() * r;
    (1.0 + s + s * s / 3.0) * (-s).exp()
}

/// Lower-triangular `L` with `L Lᵀ = A` (`A` n×n row-major, symmetric positive definite).
fn cholesky(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum();
            if i == j {
                let d = a[i * n + i] - s;
                if d <= 0.0 {
                    return None;
                }
                l[i * n + i] = d.sqrt();
            } else {
                l[i * n + j] = (a[i * n + j] - s) / l[j * n + j];
            }
        }
    }
    Some(l)
}

/// Solves `L x = b` (forward) then, with `transpose`, `Lᵀ x = b` (backward).
fn solve_lower(l: &[f64], n: usize, b: &[f64], transpose: bool) -> Vec<f64> {
    let mut x = b.to_vec();
    if !transpose {
        for i in 0..n {
            let s: f64 = (0..i).map(|k| l[i * n + k] * x[k]).sum();
            x[i] = (x[i] - s) / l[i * n + i];
        }
    } else {
        for i in (0..n).rev() {
            let s: f64 = (i + 1..n).map(|k| l[k * n + i] * x[k]).sum();
            x[i] = (x[i] - s) / l[i * n + i];
        }
    }
    x
}

/// A fitted Gaussian process.
pub struct Gp {
    xs: Vec<Vec<f64>>,
    l_chol: Vec<f64>,
    alpha: Vec<f64>,
    length: f64,
    mean: f64,
    std: f64,
}

impl Gp {
    /// Fits observations `ys` (to maximise) at `xs`; `None` when there are none.
    pub fn fit(xs: &[Vec<f64>], ys: &[f64]) -> Option<Gp> {
        let n = xs.len();
        if n == 0 {
            return None;
        }
        let mean = ys.iter().sum::<f64>() / n as f64;
        let var = ys.iter().map(|y| (y - mean) * (y - mean)).sum::<f64>() / n as f64;
        let std = if var > 1e-24 { var.sqrt() } else { 1.0 };
        let z: Vec<f64> = ys.iter().map(|y| (y - mean) / std).collect();
        let mut best: Option<(f64, Gp)> = None;
        for &length in &LENGTH_SCALES {
            let mut k = vec![0.0; n * n];
            for i in 0..n {
                for j in 0..n {
                    k[i * n + j] =
                        matern52(&xs[i], &xs[j], length) + if i == j { NOISE } else { 0.0 };
                }
            }
            let Some(l) = cholesky(&k, n) else { continue };
            let alpha = solve_lower(&l, n, &solve_lower(&l, n, &z, false), true);
            // Log marginal likelihood up to a constant: −½ zᵀα − Σ ln Lᵢᵢ.
            let fit: f64 = z.iter().zip(&alpha).map(|(a, b)| a * b).sum::<f64>();
            let logdet: f64 = (0..n).map(|i| l[i * n + i].ln()).sum();
            let lml = -0.5 * fit - logdet;
            if best.as_ref().is_none_or(|(b, _)| lml > *b) {
                best = Some((
                    lml,
                    Gp {
                        xs: xs.to_vec(),
                        l_chol: l,
                        alpha,
                        length,
                        mean,
                        std,
                    },
                ));
            }
        }
        best.map(|(_, g)| g)
    }

    /// Posterior mean and standard deviation at `x` (original scale).
    pub fn predict(&self, x: &[f64]) -> (f64, f64) {
        let n = self.xs.len();
        let k: Vec<f64> = self
            .xs
            .iter()
            .map(|xi| matern52(xi, x, self.length))
            .collect();
        let mu: f64 = k.iter().zip(&self.alpha).map(|(a, b)| a * b).sum();
        let v = solve_lower(&self.l_chol, n, &k, false);
        let var = (1.0 - v.iter().map(|a| a * a).sum::<f64>()).max(1e-12);
        (self.mean + self.std * mu, self.std * var.sqrt())
    }
}

fn normal_pdf(z: f64) -> f64 {
    (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

/// Φ(z) by the Abramowitz–Stegun 7.1.26 erf approximation (|error| < 1.5e-7).
fn normal_cdf(z: f64) -> f64 {
    let x = z / 2f64.sqrt();
    let t = 1.0 / (1.0 + 0.3275911 * x.abs());
    let poly = t
        * (0.254829592
            + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    let erf = 1.0 - poly * (-x * x).exp();
    0.5 * (1.0 + if x >= 0.0 { erf } else { -erf })
}

/// Expected improvement over `best` of a prediction (`mu`, `sigma`), maximising.
pub fn expected_improvement(mu: f64, sigma: f64, best: f64) -> f64 {
    if sigma <= 0.0 {
        return (mu - best).max(0.0);
    }
    let z = (mu - best) / sigma;
    (mu - best) * normal_cdf(z) + sigma * normal_pdf(z)
}

/// The next unit point to try: the expected-improvement maximiser among random candidates,
/// given finished observations (`xs`, `ys`, to maximise) and points still running (`pending`).
pub fn propose(
    xs: &[Vec<f64>],
    ys: &[f64],
    pending: &[Vec<f64>],
    dims: usize,
    rng: &mut Rng,
) -> Vec<f64> {
    let random = |rng: &mut Rng| (0..dims).map(|_| rng.unit()).collect::<Vec<f64>>();
    let Some(gp) = Gp::fit(xs, ys) else {
        return random(rng);
    };
    // Kriging believer: running points observed at the model's mean.
    let (mut all_x, mut all_y) = (xs.to_vec(), ys.to_vec());
    for p in pending {
        all_x.push(p.clone());
        all_y.push(gp.predict(p).0);
    }
    let gp = Gp::fit(&all_x, &all_y).unwrap_or(gp);
    let best = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut top = (f64::NEG_INFINITY, random(rng));
    for _ in 0..CANDIDATES {
        let c = random(rng);
        let (mu, sigma) = gp.predict(&c);
        let ei = expected_improvement(mu, sigma, best);
        if ei > top.0 {
            top = (ei, c);
        }
    }
    top.1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_interpolates_and_is_unsure_far_away() {
        let xs = vec![vec![0.1], vec![0.5], vec![0.9]];
        let ys = vec![1.0, 3.0, 2.0];
        let gp = Gp::fit(&xs, &ys).unwrap();
        for (x, y) in xs.iter().zip(&ys) {
            let (mu, sd) = gp.predict(x);
            assert!((mu - y).abs() < 0.05, "{mu} vs {y}");
            assert!(sd < 0.2);
        }
        let (_, far) = gp.predict(&[0.3]);
        assert!(far > gp.predict(&[0.5]).1);
    }

    #[test]
    fn cdf_and_expected_improvement() {
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_cdf(1.96) - 0.975).abs() < 1e-4);
        assert!(expected_improvement(1.0, 1.0, 0.0) > expected_improvement(0.0, 1.0, 0.0));
        assert!(expected_improvement(0.0, 2.0, 0.0) > expected_improvement(0.0, 1.0, 0.0));
        assert_eq!(expected_improvement(-1.0, 0.0, 0.0), 0.0);
    }

    #[test]
    fn proposals_find_the_peak_of_a_smooth_function_faster_than_chance() {
        // f(x, y) = −(x − 0.7)² − (y − 0.2)²: 12 proposals after 4 random points get within 0.1.
        let f = |p: &[f64]| -(p[0] - 0.7).powi(2) - (p[1] - 0.2).powi(2);
        let mut rng = Rng(7);
        let mut xs: Vec<Vec<f64>> = (0..4).map(|_| vec![rng.unit(), rng.unit()]).collect();
        let mut ys: Vec<f64> = xs.iter().map(|x| f(x)).collect();
        for _ in 0..12 {
            let x = propose(&xs, &ys, &[], 2, &mut rng);
            ys.push(f(&x));
            xs.push(x);
        }
        let best = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        assert!(best > -0.01, "best {best}");
    }
}
