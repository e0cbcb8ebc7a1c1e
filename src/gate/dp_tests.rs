//! Statistical privacy tests. For each mechanism the gate uses — Laplace on counts, Laplace on
//! fixed-point clamped sums, the Gaussian on counts under zCDP (judged as the (ε, δ) debited), the Laplace threshold of partition selection, the bounded mean
//! over blocks of sample-and-aggregate — and for per-person
//! contribution bounding, and the private quantile (exponential-style noisy max over candidates),
//! draw many releases on a pair of neighbouring datasets, estimate the
//! privacy loss, and check it against the ε (and δ) the gate would charge. Each test also runs
//! a deliberately broken twin (half the noise; no bounding; a threshold of 1) through the same
//! check, which must catch it — so a check that could never fail would fail here.
//!
//! The estimate: for an output event S fixed in advance (the upper tail, where neighbouring
//! outputs differ most), ε̂ = ln(P̂[M(x′) ∈ S] / P̂[M(x) ∈ S]), and its lower confidence bound
//! from Wilson intervals on both frequencies. Proper mechanisms must have that bound at or
//! under the claim. The intervals use z = 3.72 (one-sided 99.99 %) rather than 95 %: at 95 % an
//! exact mechanism, whose tail ratio is exactly e^ε, would fail one CI run in forty by design.
//! The broken twins clear the bound by a wide margin all the same.
//!
//! Noise is OpenDP's, drawn by invoking each measurement on a vector of N equal inputs (N
//! independent draws in one call).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Int64Array};
use datafusion::logical_expr::lit;

use super::bound::Counter;
use super::noise::Budget;
use super::noise::Threshold;
use super::{MeasureSpec, calibrate, calibrate_threshold};

fn pure(epsilon: f64) -> Budget {
    Budget::Pure { epsilon }
}

const N: usize = 20_000;
const Z: f64 = 3.72;

/// Wilson interval for `hits` of `N`.
fn wilson(hits: usize) -> (f64, f64) {
    let (n, p, z2) = (N as f64, hits as f64 / N as f64, Z * Z);
    let denominator = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denominator;
    let half = Z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denominator;
    (centre - half, centre + half)
}

/// Lower confidence bound on ln(P[x′ ∈ S] / P[x ∈ S]), S = {y ≥ cut}.
fn epsilon_lower_bound(neighbour: &[i64], base: &[i64], cut: i64) -> f64 {
    approximate_epsilon_lower_bound(neighbour, base, cut, 0.0)
}

/// Lower confidence bound on ln((P[x′ ∈ S] − δ) / P[x ∈ S]), S = {y ≥ cut}: an (ε, δ)-DP
/// mechanism keeps it at or under ε for every S.
fn approximate_epsilon_lower_bound(neighbour: &[i64], base: &[i64], cut: i64, delta: f64) -> f64 {
    let hits = |v: &[i64]| v.iter().filter(|y| **y >= cut).count();
    let (neighbour_low, _) = wilson(hits(neighbour));
    let (_, base_high) = wilson(hits(base));
    ((neighbour_low - delta).max(0.0) / base_high).ln()
}

/// Laplace on a count: neighbours differ by one row.
#[test]
fn counts_spend_no_more_than_claimed_and_half_the_noise_is_caught() {
    let claim = 0.5;
    let proper = calibrate(&MeasureSpec::Rows, pure(claim), 1).unwrap();
    let broken = calibrate(&MeasureSpec::Rows, pure(2.0 * claim), 1).unwrap(); // half the scale
    for (c, should_pass) in [(&proper, true), (&broken, false)] {
        let base = c.invoke(&vec![1000; N]).unwrap();
        let neighbour = c.invoke(&vec![1001; N]).unwrap();
        let eps = epsilon_lower_bound(&neighbour, &base, 1001);
        assert_eq!(
            eps <= proper.loss,
            should_pass,
            "scale {}: ε lower bound {eps} against the claim {}",
            c.scale,
            proper.loss
        );
    }
}

/// The Gaussian under zCDP, judged as the (ε, δ) the ledger debits for it: a count with 20
/// rows per person (Δ = 20) at ρ = 0.125 gets σ = Δ/√(2ρ) = 40; the neighbour adds a person's
/// 20 rows. δ is large (0.01) so that ε is small enough for the half-noise twin (σ = 20) to
/// show a larger tail ratio at an event frequent enough to measure: S = {y ≥ base + 50}.
#[test]
fn gaussian_counts_keep_the_epsilon_delta_debited_and_half_the_noise_is_caught() {
    let (rho, delta, k) = (0.125, 0.01, 20u64);
    let budget = Budget::Concentrated { rho, delta };
    let proper = calibrate(&MeasureSpec::Rows, budget, k).unwrap();
    let broken = calibrate(&MeasureSpec::Rows, budget.with_amount(4.0 * rho), k).unwrap();
    assert!((proper.scale - 40.0).abs() < 1e-3, "{}", proper.scale);
    assert!((broken.scale - 20.0).abs() < 1e-3, "{}", broken.scale);
    assert!(proper.loss <= rho && proper.loss > 0.999 * rho);
    let claim = super::noise::epsilon_of_rho(proper.loss, 0.0, delta).unwrap();
    // OpenDP's conversion: tighter than the classic ρ + 2√(ρ·ln 1/δ) = 1.64, never tighter
    // than the Gaussian's exact curve (0.92 at this δ).
    let classic = rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt();
    assert!(claim > 0.9 && claim < classic, "{claim} against {classic}");
    let (base, neighbour) = (1000i64, 1020i64);
    for (c, should_pass) in [(&proper, true), (&broken, false)] {
        let eps = approximate_epsilon_lower_bound(
            &c.invoke(&vec![neighbour; N]).unwrap(),
            &c.invoke(&vec![base; N]).unwrap(),
            base + 50,
            delta,
        );
        assert_eq!(
            eps <= claim,
            should_pass,
            "σ {}: ε lower bound {eps} against the claim {claim}",
            c.scale
        );
    }
}

/// Laplace on a clamped fixed-point sum, and on a sum of squared deviations (variances):
/// neighbours differ by one row at the upper bound.
#[test]
fn sums_spend_no_more_than_claimed_and_half_the_noise_is_caught() {
    let fp = 2f64.powi(23);
    sums_check(MeasureSpec::ClampedSum {
        expr: lit(0.0),
        column: "fare".into(),
        lo: 0.0,
        hi: 100.0,
        shift: 0.0,
        fixed_point: fp,
        squared: false,
    });
    sums_check(MeasureSpec::ClampedSum {
        expr: lit(0.0),
        column: "fare".into(),
        lo: 0.0,
        hi: 100.0,
        shift: 50.0,
        fixed_point: 2f64.powi(18),
        squared: true,
    });
}

fn sums_check(spec: MeasureSpec) {
    let claim = 0.5;
    let (_, top) = spec.fixed_point_bounds();
    let proper = calibrate(&spec, pure(claim), 1).unwrap();
    let broken = calibrate(&spec, pure(2.0 * claim), 1).unwrap();
    let base_sum = 1000 * top;
    for (c, should_pass) in [(&proper, true), (&broken, false)] {
        let base = c.invoke(&vec![base_sum; N]).unwrap();
        let neighbour = c.invoke(&vec![base_sum + top; N]).unwrap();
        let eps = epsilon_lower_bound(&neighbour, &base, base_sum + top);
        assert_eq!(
            eps <= proper.loss,
            should_pass,
            "ε lower bound {eps} against the claim {}",
            proper.loss
        );
    }
}

/// Contribution bounding: the neighbour adds a person with 40 rows, 25 of them in the group
/// measured; after bounding to k = 5 the count moves by at most 5, and the noise is calibrated
/// to 5. The broken twin keeps every row of the person (k = 1000) under the same noise.
#[test]
fn bounded_persons_spend_no_more_than_claimed_and_unbounded_ones_are_caught() {
    let (claim, k) = (0.5, 5u32);
    let noise = calibrate(&MeasureSpec::Rows, pure(claim), u64::from(k)).unwrap();
    let base_count = 1000i64;
    let kept_in_group = |bound: u32| -> i64 {
        let mut counter = Counter::new(bound, Some((42, 42, 40)));
        let person: ArrayRef = Arc::new(Int64Array::from(vec![42i64; 40]));
        counter.add(&person).unwrap();
        let selection = counter.finish().unwrap();
        let person: ArrayRef = Arc::new(Int64Array::from(vec![42i64; 40]));
        let kept = selection
            .keep(&person, &BooleanArray::from(vec![true; 40]))
            .unwrap();
        // Rows 0..25 are in the measured group.
        (0..25).filter(|i| kept.value(*i)).count() as i64
    };
    let base = noise.invoke(&vec![base_count; N]).unwrap();
    for (bound, should_pass) in [(k, true), (1000, false)] {
        let exact: Vec<i64> = (0..N).map(|_| base_count + kept_in_group(bound)).collect();
        assert!(exact.iter().all(|c| c - base_count <= i64::from(bound)));
        let neighbour = noise.invoke(&exact).unwrap();
        let cut = base_count + i64::from(k);
        let eps = epsilon_lower_bound(&neighbour, &base, cut);
        assert_eq!(
            eps <= noise.loss,
            should_pass,
            "bound {bound}: ε lower bound {eps} against the claim {}",
            noise.loss
        );
    }
}

/// P[Poisson(mean) ≥ hits]: how surprising `hits` releases are if each has probability δ.
fn poisson_tail(mean: f64, hits: usize) -> f64 {
    let mut term = (-mean).exp();
    let mut below = 0.0;
    for i in 0..hits {
        below += term;
        term *= mean / (i + 1) as f64;
    }
    (1.0 - below).max(0.0)
}

/// Partition selection, both halves of its (ε, δ) claim. δ: a key that one row brings into
/// being must be released with probability at most δ (the other dataset never releases it);
/// the broken twin thresholds at 1. ε: a key present in both, far above the threshold, as for
/// counts; the broken twin has half the noise.
#[test]
fn partition_selection_keeps_its_delta_and_epsilon_and_low_thresholds_are_caught() {
    let (claim, delta) = (0.5, 1e-6);
    let proper = calibrate_threshold(pure(claim), delta, 1, 1, 0).unwrap();
    delta_check(&proper, &Threshold::for_tests(false, proper.scale, 1));

    let broken = calibrate_threshold(pure(2.0 * claim), delta, 1, 1, 0).unwrap();
    for (t, should_pass) in [(&proper, true), (&broken, false)] {
        let draws = |count: i64| -> Vec<i64> {
            let input: HashMap<String, i64> = (0..N).map(|i| (format!("k{i}"), count)).collect();
            let out = t.invoke(&input).unwrap();
            assert_eq!(out.len(), N, "far above the threshold every key is kept");
            out.into_values().collect()
        };
        let eps = epsilon_lower_bound(&draws(1001), &draws(1000), 1001);
        assert_eq!(
            eps <= proper.loss,
            should_pass,
            "scale {}: ε lower bound {eps} against the claim {}",
            t.scale,
            proper.loss
        );
    }
}

/// Partition selection under ρ (OpenDP's Gaussian threshold), its δ half: a key one row
/// brings into being is released with probability at most δ; the twin at threshold 1 (the
/// least OpenDP allows for one row) is caught.
#[test]
fn gaussian_partition_selection_keeps_its_delta_and_a_low_threshold_is_caught() {
    let delta = 1e-6;
    let budget = Budget::Concentrated { rho: 0.125, delta };
    let proper = calibrate_threshold(budget, delta, 1, 1, 0).unwrap();
    assert!(proper.gaussian() && proper.loss <= 0.125 && proper.delta <= delta);
    assert!(
        (proper.scale - 2.0).abs() < 1e-6,
        "σ = 1/√(2ρ): {}",
        proper.scale
    );
    delta_check(&proper, &Threshold::for_tests(true, proper.scale, 1));
}

/// A threshold's δ claim: of N keys one row brings into being (each dataset of one row in a
/// fresh key, noised independently), `proper` releases about N·δ at most; `low` is caught.
fn delta_check(proper: &Threshold, low: &Threshold) {
    let fresh: HashMap<String, i64> = (0..N).map(|i| (format!("k{i}"), 1)).collect();
    for (t, should_pass) in [(proper, true), (low, false)] {
        let hits = t.invoke(&fresh).unwrap().len();
        let p = poisson_tail(N as f64 * proper.delta, hits);
        assert_eq!(
            p >= 1e-4,
            should_pass,
            "{hits} of {N} single-row keys released; P = {p} at δ {}",
            proper.delta
        );
    }
}

/// Sample-and-aggregate: OpenDP's bounded mean of 10 block outputs in [0, 1] with Laplace
/// noise. Neighbours differ in one unit, so in one block's output: 0 → 1.
#[test]
fn block_means_spend_no_more_than_claimed_and_half_the_noise_is_caught() {
    let claim = 0.5;
    let (proper, proper_scale) = super::blocks::calibrate(0.0, 1.0, 10, claim).unwrap();
    let (broken, _) = super::blocks::calibrate(0.0, 1.0, 10, 2.0 * claim).unwrap();
    let spent = proper.map(&2).unwrap();
    assert!(spent <= claim, "{spent}");
    let base = vec![0.0; 10];
    let mut neighbour = base.clone();
    neighbour[3] = 1.0;
    for (m, should_pass) in [(&proper, true), (&broken, false)] {
        let draw = |x: &Vec<f64>| -> Vec<i64> {
            // Integers in units of 1e-6 for the shared check: the event is y ≥ 0.1.
            (0..N)
                .map(|_| (m.invoke(x).unwrap() * 1e6).floor() as i64)
                .collect()
        };
        let eps = epsilon_lower_bound(&draw(&neighbour), &draw(&base), 100_000);
        assert_eq!(
            eps <= spent,
            should_pass,
            "ε lower bound {eps} against the claim {spent} (proper scale {proper_scale})"
        );
    }
}

/// The private quantile (median over two candidates, 0 and 1): x′ holds one value at 0.5, so
/// both candidates score alike; x adds a row at −1, which moves candidate 0's score one unit
/// closer and candidate 1's one unit further — the opposite shifts on which the mechanism's
/// ε is tight. P[1 | x′] / P[1 | x] = e^ε; the half-scale twin shows e^{2ε}.
#[test]
fn quantiles_spend_no_more_than_claimed_and_half_the_noise_is_caught() {
    use super::quantile::calibrate_over;
    let claim = 1.0;
    let proper = calibrate_over(vec![0.0, 1.0], -10.0, 10.0, 0.5, pure(claim), 1).unwrap();
    let broken = calibrate_over(vec![0.0, 1.0], -10.0, 10.0, 0.5, pure(2.0 * claim), 1).unwrap();
    for (m, should_pass) in [(&proper, true), (&broken, false)] {
        let draws =
            |data: &[f64]| -> Vec<i64> { (0..N).map(|_| m.draw(data).unwrap() as i64).collect() };
        let with_one = draws(&[0.5]);
        let with_two = draws(&[0.5, -1.0]);
        let eps = epsilon_lower_bound(&with_one, &with_two, 1);
        assert_eq!(
            eps <= proper.loss,
            should_pass,
            "scale {}: ε lower bound {eps} against the claim {}",
            m.scale,
            proper.loss
        );
    }
}
