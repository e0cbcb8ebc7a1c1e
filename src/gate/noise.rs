//! The noise: every mechanism the gate adds to an aggregate, each built by OpenDP and
//! calibrated by OpenDP's maps — Laplace (pure ε-DP) or Gaussian (ρ-zCDP) on integer counts and
//! fixed-point sums, the Laplace threshold that chooses group keys, and the conversion of a
//! release's ρ into the (ε, δ) the ledger debits.

use std::collections::HashMap;

use opendp::combinators::{make_fix_delta, make_zCDP_to_approxDP};
use opendp::core::{Function, Measurement, PrivacyMap, Transformation};
use opendp::domains::{AtomDomain, MapDomain, VectorDomain};
use opendp::measurements::{
    make_gaussian, make_gaussian_threshold, make_laplace, make_laplace_threshold,
};
use opendp::measures::{Approximate, MaxDivergence, ZeroConcentratedDivergence};
use opendp::metrics::{
    AbsoluteDistance, L0PInfDistance, L1Distance, L01InfDistance, L2Distance, L02InfDistance,
    SymmetricDistance,
};

use super::{GateError, MeasureSpec};

/// The privacy measure a query's budget is in, and so the noise it gets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Budget {
    /// Pure ε-DP: Laplace noise.
    Pure { epsilon: f64 },
    /// ρ-zCDP: Gaussian noise; the ledger debits the (ε, δ) that ρ converts to at `delta`.
    Concentrated { rho: f64, delta: f64 },
}

impl Budget {
    /// The budget in its own measure (ε or ρ).
    pub fn amount(self) -> f64 {
        match self {
            Budget::Pure { epsilon } => epsilon,
            Budget::Concentrated { rho, .. } => rho,
        }
    }

    /// The same kind of budget, of another amount.
    pub fn with_amount(self, amount: f64) -> Self {
        match self {
            Budget::Pure { .. } => Budget::Pure { epsilon: amount },
            Budget::Concentrated { delta, .. } => Budget::Concentrated { rho: amount, delta },
        }
    }
}

type LaplaceMeasurement =
    Measurement<VectorDomain<AtomDomain<i64>>, L1Distance<i64>, MaxDivergence, Vec<i64>>;
type GaussianMeasurement = Measurement<
    VectorDomain<AtomDomain<i64>>,
    L2Distance<i64>,
    ZeroConcentratedDivergence,
    Vec<i64>,
>;

/// A noise mechanism over the integer vector of one measure's values, one per group.
#[derive(Clone)]
enum Noise {
    Laplace(LaplaceMeasurement),
    Gaussian(GaussianMeasurement),
}

impl Noise {
    /// OpenDP's mechanism of `kind` at `scale`: the one place each is built.
    fn build(gaussian: bool, scale: f64) -> opendp::error::Fallible<Self> {
        let domain = VectorDomain::new(AtomDomain::<i64>::default());
        Ok(if gaussian {
            Noise::Gaussian(make_gaussian(
                domain,
                L2Distance::<i64>::default(),
                scale,
                None,
            )?)
        } else {
            Noise::Laplace(make_laplace(
                domain,
                L1Distance::<i64>::default(),
                scale,
                None,
            )?)
        })
    }

    /// The privacy loss at `d_in` (the vector's L1 or L2 distance), in the mechanism's measure.
    fn map(&self, d_in: i64) -> opendp::error::Fallible<f64> {
        match self {
            Noise::Laplace(m) => m.map(&d_in),
            Noise::Gaussian(m) => m.map(&d_in),
        }
    }

    fn invoke(&self, values: &Vec<i64>) -> opendp::error::Fallible<Vec<i64>> {
        match self {
            Noise::Laplace(m) => m.invoke(values),
            Noise::Gaussian(m) => m.invoke(values),
        }
    }
}

/// One noisy measurement's calibration, all from OpenDP.
pub(super) struct Calibrated {
    noise: Noise,
    /// The noise scale in fixed-point units (Laplace b, or the Gaussian's σ).
    pub scale: f64,
    /// What the measurement spends, in the budget's measure: ε, or ρ.
    pub loss: f64,
}

/// The sensitivity of the sum or count we run, from OpenDP's stability map, then the noise
/// scale that spends at most `budget` by OpenDP's privacy map of the mechanism.
///
/// `rows_per_unit` is how many rows one privacy unit can change after contribution bounding
/// (1 for row-level data): the symmetric distance fed to the stability map. The map bounds
/// the change of one group's value when all those rows fall in it; spread over several
/// groups, the changes add up to no more (the maps are linear in rows), so the number bounds
/// the L1 distance of the vector over groups, and the L2 distance, which is never larger.
pub(super) fn calibrate(
    spec: &MeasureSpec,
    budget: Budget,
    rows_per_unit: u64,
) -> Result<Calibrated, GateError> {
    let rows = u32::try_from(rows_per_unit)
        .map_err(|_| GateError::Mechanism("the per-person row bound is too large".into()))?;
    let d_in: i64 = match spec {
        MeasureSpec::Distinct { .. } => {
            let t: Transformation<_, SymmetricDistance, AtomDomain<i64>, AbsoluteDistance<i64>> =
                opendp::transformations::make_count_distinct::<i64, i64>(
                    VectorDomain::new(AtomDomain::default()),
                    SymmetricDistance,
                )?;
            t.map(&rows)?
        }
        MeasureSpec::Rows | MeasureSpec::NonNull { .. } => {
            let t: Transformation<_, SymmetricDistance, AtomDomain<i64>, AbsoluteDistance<i64>> =
                opendp::transformations::make_count::<i64, i64>(
                    VectorDomain::new(AtomDomain::default()),
                    SymmetricDistance,
                )?;
            t.map(&rows)?
        }
        MeasureSpec::Quantile { .. } => {
            return Err(GateError::Mechanism(
                "a quantile is calibrated by quantile::calibrate".into(),
            ));
        }
        MeasureSpec::ClampedSum { .. } => {
            let (lo, hi) = spec.fixed_point_bounds();
            let t = opendp::transformations::make_sum::<SymmetricDistance, i64>(
                VectorDomain::new(AtomDomain::new_closed((lo, hi))?),
                SymmetricDistance,
            )?;
            t.map(&rows)?
        }
    };
    // OpenDP's maps: ε = Δ₁/b for Laplace, ρ = (Δ₂/σ)²/2 for the Gaussian. Start there; should
    // the map itself say more (rounding), widen to fit.
    let (gaussian, mut scale) = match budget {
        Budget::Pure { epsilon } => (false, d_in as f64 / epsilon),
        Budget::Concentrated { rho, .. } => (true, d_in as f64 / (2.0 * rho).sqrt()),
    };
    scale = scale.max(f64::MIN_POSITIVE);
    for _ in 0..16 {
        let noise = Noise::build(gaussian, scale)?;
        let spent = noise.map(d_in)?;
        if spent <= budget.amount() {
            return Ok(Calibrated {
                noise,
                scale,
                loss: spent,
            });
        }
        scale *= 1.0 + 1e-9;
    }
    Err(GateError::Mechanism(
        "could not fit the noise scale under the requested budget".into(),
    ))
}

/// The ε a release that spends `rho` (its measurements' ρ added up: zCDP composes by
/// addition) and `fixed_delta` besides (a Gaussian threshold's) costs at `delta` in all, by
/// OpenDP's conversion from zCDP to approximate DP.
pub(super) fn epsilon_of_rho(rho: f64, fixed_delta: f64, delta: f64) -> Result<f64, GateError> {
    // The release's composition as one measurement whose privacy map is that sum, for
    // OpenDP's conversion and its choice of the tightest ε at the δ left over.
    let composed = Measurement::new(
        AtomDomain::<i64>::default(),
        AbsoluteDistance::<i64>::default(),
        Approximate(ZeroConcentratedDivergence),
        Function::new(|x: &i64| *x),
        PrivacyMap::new(move |_: &i64| (rho, fixed_delta)),
    )?;
    let approximate = make_fix_delta(&make_zCDP_to_approxDP(composed)?, delta)?;
    let (epsilon, spent_delta) = approximate.map(&1)?;
    if spent_delta > delta {
        return Err(GateError::Mechanism(
            "OpenDP's conversion of ρ spends more δ than requested".into(),
        ));
    }
    Ok(epsilon)
}

/// The 95 % half-width of the noise a measurement adds, in its scale's units: b·ln 20 for
/// Laplace (P(|X| > t) = e^(−t/b)), 1.96·σ for the Gaussian.
pub(super) fn ci95(budget: Budget, scale: f64) -> f64 {
    match budget {
        Budget::Pure { .. } => scale * 20f64.ln(),
        Budget::Concentrated { .. } => scale * 1.959_963_984_540_054,
    }
}

/// Groups from which noise is drawn on both cores. OpenDP's exact samplers take ~15 µs a draw,
/// so thousands of groups cost more than the aggregate that produced them.
const PARALLEL_DRAWS: usize = 1024;

/// Runs `theirs` on a second core while `mine` runs on this one.
fn on_two_cores<A, B: Send>(
    mine: impl FnOnce() -> A,
    theirs: impl FnOnce() -> B + Send,
) -> Result<(A, B), GateError> {
    std::thread::scope(|scope| {
        let handle = scope.spawn(theirs);
        let mine = mine();
        let theirs = handle
            .join()
            .map_err(|_| GateError::Mechanism("a noise thread failed".into()))?;
        Ok((mine, theirs))
    })
}

// From `PARALLEL_DRAWS` groups up, noise is drawn on both cores: each group gets independent
// noise (and, under a threshold, its own keep-or-drop), so two instances of the same mechanism
// (built with the same arguments) over two halves give the same distribution as one call over
// everything, at the same ε and δ.

impl Calibrated {
    /// The measurement applied to `values`, on this core (tests draw N at once).
    #[cfg(test)]
    pub(super) fn invoke(&self, values: &Vec<i64>) -> opendp::error::Fallible<Vec<i64>> {
        self.noise.invoke(values)
    }

    /// The measurement applied to `values`.
    pub(super) fn draw(&self, values: &[i64]) -> Result<Vec<i64>, GateError> {
        if values.len() < PARALLEL_DRAWS {
            return Ok(self.noise.invoke(&values.to_vec())?);
        }
        let (left, right) = values.split_at(values.len() / 2);
        // OpenDP's measurements are not Send: the other core builds the same mechanism.
        let (gaussian, scale) = (matches!(self.noise, Noise::Gaussian(_)), self.scale);
        let (mine, theirs) = on_two_cores(
            || self.noise.invoke(&left.to_vec()),
            move || Noise::build(gaussian, scale)?.invoke(&right.to_vec()),
        )?;
        let mut out = mine?;
        out.extend(theirs?);
        Ok(out)
    }
}

impl Threshold {
    /// The threshold mechanism applied to `counts`, on this core (tests draw N at once).
    #[cfg(test)]
    pub(super) fn invoke(
        &self,
        counts: &HashMap<String, i64>,
    ) -> opendp::error::Fallible<HashMap<String, i64>> {
        self.noise.invoke(counts)
    }

    /// A threshold mechanism of either kind at a given scale and threshold, priced at nothing
    /// (a broken twin for the statistical tests).
    #[cfg(test)]
    pub(super) fn for_tests(gaussian: bool, scale: f64, threshold: i64) -> Self {
        Threshold {
            noise: ThresholdNoise::build(gaussian, scale, threshold).expect("a mechanism"),
            scale,
            threshold,
            loss: 0.0,
            delta: 0.0,
        }
    }

    /// Whether the noise is Gaussian (the budget is ρ).
    pub(super) fn gaussian(&self) -> bool {
        matches!(self.noise, ThresholdNoise::Gaussian(_))
    }

    /// The threshold mechanism applied to `counts`.
    pub(super) fn draw(
        &self,
        counts: HashMap<String, i64>,
    ) -> Result<HashMap<String, i64>, GateError> {
        if counts.len() < PARALLEL_DRAWS {
            return Ok(self.noise.invoke(&counts)?);
        }
        let mut i = 0usize;
        let (left, right): (HashMap<_, _>, HashMap<_, _>) = counts.into_iter().partition(|_| {
            i += 1;
            i % 2 == 0
        });
        let (gaussian, scale, threshold) = (self.gaussian(), self.scale, self.threshold);
        let (mine, theirs) = on_two_cores(
            || self.noise.invoke(&left),
            move || ThresholdNoise::build(gaussian, scale, threshold)?.invoke(&right),
        )?;
        let mut out = mine?;
        out.extend(theirs?);
        Ok(out)
    }
}

type ThresholdMeasurement = Measurement<
    MapDomain<AtomDomain<String>, AtomDomain<i64>>,
    L01InfDistance<AbsoluteDistance<i64>>,
    Approximate<MaxDivergence>,
    HashMap<String, i64>,
>;

type GaussianThresholdMeasurement = Measurement<
    MapDomain<AtomDomain<String>, AtomDomain<i64>>,
    L02InfDistance<AbsoluteDistance<i64>>,
    Approximate<ZeroConcentratedDivergence>,
    HashMap<String, i64>,
>;

/// A threshold mechanism of either kind.
enum ThresholdNoise {
    Laplace(ThresholdMeasurement),
    Gaussian(GaussianThresholdMeasurement),
}

impl ThresholdNoise {
    /// OpenDP's threshold mechanism on counts per key, Laplace or Gaussian: the one place each
    /// is built.
    fn build(gaussian: bool, scale: f64, threshold: i64) -> opendp::error::Fallible<Self> {
        let domain = MapDomain::new(
            AtomDomain::<String>::default(),
            AtomDomain::<i64>::default(),
        );
        // (l0, l2, l∞) for the Gaussian, (l0, l1, l∞) for Laplace: the same constructor.
        Ok(if gaussian {
            ThresholdNoise::Gaussian(make_gaussian_threshold::<
                _,
                _,
                Approximate<ZeroConcentratedDivergence>,
            >(
                domain,
                L0PInfDistance(AbsoluteDistance::<i64>::default()),
                scale,
                threshold,
                None,
            )?)
        } else {
            ThresholdNoise::Laplace(make_laplace_threshold::<_, _, Approximate<MaxDivergence>>(
                domain,
                L0PInfDistance(AbsoluteDistance::<i64>::default()),
                scale,
                threshold,
                None,
            )?)
        })
    }

    /// (ε or ρ, δ) at `d_in` = (l0, l1 or l2, l∞).
    fn map(&self, d_in: &(u32, i64, i64)) -> opendp::error::Fallible<(f64, f64)> {
        match self {
            ThresholdNoise::Laplace(m) => m.map(d_in),
            ThresholdNoise::Gaussian(m) => m.map(d_in),
        }
    }

    fn invoke(
        &self,
        counts: &HashMap<String, i64>,
    ) -> opendp::error::Fallible<HashMap<String, i64>> {
        match self {
            ThresholdNoise::Laplace(m) => m.invoke(counts),
            ThresholdNoise::Gaussian(m) => m.invoke(counts),
        }
    }
}

/// DP partition selection: OpenDP's threshold mechanism (Laplace under ε, Gaussian under ρ)
/// over the exact row counts of the groups the data has.
pub(super) struct Threshold {
    noise: ThresholdNoise,
    pub scale: f64,
    pub threshold: i64,
    /// What it spends in the budget's measure: ε, or ρ.
    pub loss: f64,
    pub delta: f64,
}

/// The noise scale that spends at most the `budget` share and the smallest threshold (never
/// below the minimum group size) that spends at most `delta`, both by OpenDP's privacy map of
/// the threshold mechanism at `d_in` = (groups one unit can touch, rows it can add in all,
/// rows it can add to one group) = (g, k, k) after contribution bounding (g = k without a
/// group bound). Under ρ the rows it can add in all are an L2 distance, which k bounds too.
pub(super) fn calibrate_threshold(
    budget: Budget,
    delta: f64,
    rows_per_unit: u64,
    groups_per_unit: u64,
    min_group: u64,
) -> Result<Threshold, GateError> {
    let too_large =
        |_| GateError::Mechanism("the per-person row or group bound is too large".into());
    let k = u32::try_from(rows_per_unit).map_err(too_large)?;
    let g = u32::try_from(groups_per_unit.min(rows_per_unit)).map_err(too_large)?;
    let d_in = (g, i64::from(k), i64::from(k));
    let (gaussian, target, mut scale) = match budget {
        Budget::Pure { epsilon } => (false, epsilon, f64::from(k) / epsilon),
        Budget::Concentrated { rho, .. } => (true, rho, f64::from(k) / (2.0 * rho).sqrt()),
    };
    let make = |scale: f64, threshold: i64| ThresholdNoise::build(gaussian, scale, threshold);
    const HIGHEST: i64 = 1 << 40;
    scale = scale.max(f64::MIN_POSITIVE);
    let mut fitted = None;
    for _ in 0..16 {
        if make(scale, HIGHEST)?.map(&d_in)?.0 <= target {
            fitted = Some(scale);
            break;
        }
        scale *= 1.0 + 1e-9;
    }
    let scale = fitted.ok_or_else(|| {
        GateError::Mechanism("could not fit the noise scale under the requested budget".into())
    })?;
    let spends = |t: i64| -> Result<bool, GateError> { Ok(make(scale, t)?.map(&d_in)?.1 <= delta) };
    // OpenDP's maps need a threshold of at least the rows one unit can add to one group.
    let floor = (min_group as i64).max(1).max(i64::from(k));
    // The least threshold whose δ fits (δ falls as the threshold rises): gallop up from the
    // floor to a threshold that fits, then bisect the last step. Thresholds are near the floor
    // or a few dozen scales above it, so this asks OpenDP's map ~2·log₂ of that instead of the
    // ~40 times a bisection of [floor, 2⁴⁰] does (each map builds a mechanism: ~70 µs).
    let (mut lo, mut hi) = (floor, floor);
    let mut step = 1i64;
    while !spends(hi)? {
        if hi == HIGHEST {
            return Err(GateError::Mechanism(
                "no threshold keeps δ under the requested value".into(),
            ));
        }
        lo = hi + 1;
        hi = hi.saturating_add(step).min(HIGHEST);
        step = step.saturating_mul(2);
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if spends(mid)? {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let noise = make(scale, lo)?;
    let (spent, spent_delta) = noise.map(&d_in)?;
    if spent > target || spent_delta > delta {
        return Err(GateError::Mechanism(
            "the threshold mechanism does not fit the requested budget and δ".into(),
        ));
    }
    Ok(Threshold {
        noise,
        scale,
        threshold: lo,
        loss: spent,
        delta: spent_delta,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::logical_expr::lit;

    fn pure(epsilon: f64) -> Budget {
        Budget::Pure { epsilon }
    }

    #[test]
    fn counts_get_scale_one_over_epsilon_from_opendp() {
        let c = calibrate(&MeasureSpec::Rows, pure(0.5), 1).unwrap();
        assert!((c.scale - 2.0).abs() < 1e-6, "{}", c.scale);
        assert!(c.loss <= 0.5 && c.loss > 0.4999, "{}", c.loss);
    }

    #[test]
    fn partition_selection_thresholds_grow_with_smaller_delta_and_larger_k() {
        let t6 = calibrate_threshold(pure(0.5), 1e-6, 1, 1, 0).unwrap();
        let t9 = calibrate_threshold(pure(0.5), 1e-9, 1, 1, 0).unwrap();
        let k10 = calibrate_threshold(pure(0.5), 1e-6, 10, 10, 0).unwrap();
        assert!(
            t6.loss <= 0.5 && t6.delta <= 1e-6,
            "{} {}",
            t6.loss,
            t6.delta
        );
        assert!((t6.scale - 2.0).abs() < 1e-6);
        // δ = P(noise > threshold − 1) ≈ ½·exp(−(t − 1)/b): t ≈ 1 + 2·ln(5·10⁵) ≈ 27.
        assert!((20..40).contains(&t6.threshold), "{}", t6.threshold);
        assert!(t9.threshold > t6.threshold);
        assert!(k10.threshold > 5 * t6.threshold && (k10.scale - 20.0).abs() < 1e-5);
        // At most one group per person (of their ten rows): same ε, so the same scale, but
        // one group's worth of δ: a lower threshold, within ln(10)·scale of it.
        let g1 = calibrate_threshold(pure(0.5), 1e-6, 10, 1, 0).unwrap();
        assert!((g1.scale - k10.scale).abs() < 1e-9 && g1.delta <= 1e-6);
        assert!(
            g1.threshold < k10.threshold,
            "{} {}",
            g1.threshold,
            k10.threshold
        );
        assert!(
            (k10.threshold - g1.threshold) as f64 <= 10f64.ln() * k10.scale + 1.0,
            "{} {}",
            g1.threshold,
            k10.threshold
        );
        // The minimum group size is a floor.
        assert_eq!(
            calibrate_threshold(pure(0.5), 1e-6, 1, 1, 500)
                .unwrap()
                .threshold,
            500
        );
        // Each threshold is the least that fits δ (or the floor): one below it spends more.
        let cases = [
            (&t6, 1e-6, 1, 1),
            (&t9, 1e-9, 1, 1),
            (&k10, 1e-6, 10, 10),
            (&g1, 1e-6, 10, 1),
        ];
        for (t, asked, k, g) in cases {
            let below = ThresholdNoise::build(false, t.scale, t.threshold - 1).unwrap();
            let (_, spent) = below.map(&(g, k, k)).unwrap();
            assert!(spent > asked, "{} spends {spent} below", t.threshold);
        }
        // Released groups are those whose noisy count clears the threshold.
        let counts: HashMap<String, i64> =
            [("big".to_string(), 10_000), ("tiny".to_string(), 1)].into();
        let out = t6.invoke(&counts).unwrap();
        assert!(
            out.contains_key("big") && !out.contains_key("tiny"),
            "{out:?}"
        );
    }

    #[test]
    fn noise_drawn_on_two_cores_keeps_every_group_in_its_place() {
        let c = calibrate(&MeasureSpec::Rows, pure(1.0), 1).unwrap();
        let values: Vec<i64> = (0..3001).map(|i| i * 1_000).collect();
        let noisy = c.draw(&values).unwrap();
        assert_eq!(noisy.len(), values.len());
        // Scale 1: every draw lands within 100 of its own group (miss: e^-100).
        assert!(values.iter().zip(&noisy).all(|(v, n)| (v - n).abs() < 100));
        assert_ne!(values, noisy, "noise was added");

        let t = calibrate_threshold(pure(1.0), 1e-6, 1, 1, 0).unwrap();
        let counts: HashMap<String, i64> = (0..3000)
            .map(|i| (format!("k{i}"), if i % 2 == 0 { 10_000 } else { 0 }))
            .collect();
        let kept = t.draw(counts).unwrap();
        assert_eq!(
            kept.len(),
            1500,
            "the big half, all of it, and nothing else"
        );
        assert!(
            kept.iter().all(|(k, v)| {
                k[1..].parse::<i64>().unwrap() % 2 == 0 && (v - 10_000).abs() < 100
            })
        );
    }

    #[test]
    fn a_person_bound_of_k_rows_multiplies_the_noise_by_k() {
        let one = calibrate(&MeasureSpec::Rows, pure(0.5), 1).unwrap();
        let ten = calibrate(&MeasureSpec::Rows, pure(0.5), 10).unwrap();
        assert!((ten.scale / one.scale - 10.0).abs() < 1e-6, "{}", ten.scale);
        assert!(ten.loss <= 0.5);
    }

    #[test]
    fn sums_take_their_sensitivity_from_the_clamping_bounds() {
        let fp = 2f64.powi(23);
        let spec = MeasureSpec::ClampedSum {
            expr: lit(0.0),
            column: "fare".into(),
            lo: 0.0,
            hi: 100.0,
            shift: 0.0,
            fixed_point: fp,
            squared: false,
        };
        let c = calibrate(&spec, pure(0.5), 1).unwrap();
        // 100 per row, in fixed-point units, over ε = 0.5.
        assert!((c.scale / fp - 200.0).abs() < 1e-3, "{}", c.scale / fp);
        assert!(c.loss <= 0.5);
        // The noise is real: two draws over the same data differ (P(equal) ≈ 1/(2·scale)).
        let a = c.invoke(&vec![0i64; 8]).unwrap();
        let b = c.invoke(&vec![0i64; 8]).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn gaussian_scales_come_from_rho_and_rho_converts_to_an_epsilon_within_known_bounds() {
        let z = |rho| Budget::Concentrated { rho, delta: 1e-6 };
        // σ = Δ/√(2ρ): 1 for a count at ρ ½, ten times that for ten rows per person.
        let c = calibrate(&MeasureSpec::Rows, z(0.5), 1).unwrap();
        assert!((c.scale - 1.0).abs() < 1e-6 && c.loss <= 0.5 && c.loss > 0.4999);
        let ten = calibrate(&MeasureSpec::Rows, z(0.5), 10).unwrap();
        assert!((ten.scale - 10.0).abs() < 1e-5, "{}", ten.scale);
        assert!((ci95(z(0.5), 2.0) - 3.92).abs() < 1e-3);
        // ρ → ε at δ by OpenDP: above ρ, below the classic ρ + 2√(ρ·ln 1/δ), larger for
        // larger ρ or smaller δ.
        let e = epsilon_of_rho(0.5, 0.0, 1e-6).unwrap();
        assert!(e > 0.5 && e < 0.5 + 2.0 * (0.5 * 1e6f64.ln()).sqrt(), "{e}");
        assert!(epsilon_of_rho(1.0, 0.0, 1e-6).unwrap() > e);
        assert!(epsilon_of_rho(0.5, 0.0, 1e-9).unwrap() > e);
        // δ already spent elsewhere (a Gaussian threshold's) leaves less for the conversion.
        assert!(epsilon_of_rho(0.5, 5e-7, 1e-6).unwrap() > e);
        // Gaussian draws on two cores, each group in its place: σ 1, off by 12 has
        // probability ~1e-32.
        let values: Vec<i64> = (0..3001).map(|i| i * 1_000).collect();
        let noisy = c.draw(&values).unwrap();
        assert_eq!(noisy.len(), values.len());
        assert!(values.iter().zip(&noisy).all(|(v, n)| (v - n).abs() < 12));
        assert_ne!(values, noisy, "noise was added");
    }
}
