//! Quantiles per group — `MEDIAN(x)`, `PERCENTILE_CONT(x, q)` — by OpenDP's
//! `make_private_quantile`: candidates evenly spaced over the column's public bounds, each
//! scored by how far it is from splitting the group's clamped values at *q*, and one picked
//! by OpenDP's noisy max (permute-and-flip). Pure ε-DP.
//!
//! The data never chooses a candidate set or a bound: both come from the catalogue or the
//! query. Groups are disjoint and the mechanism's ε is linear in the number of rows changed,
//! so a person whose *k* rows fall in several groups costs at most ε(*k*) over all of them —
//! one measurement's share, as for the counts and sums beside it.

use opendp::combinators::make_pureDP_to_zCDP;
use opendp::core::Measurement;
use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::make_private_quantile;
use opendp::measures::MaxDivergence;
use opendp::metrics::SymmetricDistance;

use super::GateError;
use super::noise::Budget;

/// How many candidates span the bounds: the release is one of them, so its resolution is
/// (hi − lo) / 1023.
pub(super) const CANDIDATES: usize = 1024;

type QuantileMeasurement =
    Measurement<VectorDomain<AtomDomain<f64>>, SymmetricDistance, MaxDivergence, f64>;

/// One quantile measurement, calibrated before any data is read.
pub(super) struct QuantileMechanism {
    measurement: QuantileMeasurement,
    /// The noise scale in rank units (OpenDP's `scale`: rows of the group, not values).
    pub scale: f64,
    /// What the whole measurement spends in the budget's measure (ε, or ρ), from OpenDP's
    /// privacy map at d_in = k.
    pub loss: f64,
    lo: f64,
    hi: f64,
}

impl std::fmt::Debug for QuantileMechanism {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantileMechanism")
            .field("scale", &self.scale)
            .field("loss", &self.loss)
            .finish_non_exhaustive()
    }
}

/// The candidates over [lo, hi], strictly increasing (a very narrow range may give fewer).
fn candidates(lo: f64, hi: f64) -> Vec<f64> {
    let mut c: Vec<f64> = (0..CANDIDATES)
        .map(|i| lo + (hi - lo) * i as f64 / (CANDIDATES - 1) as f64)
        .map(|v| v.clamp(lo, hi))
        .collect();
    c.dedup();
    c
}

/// The quantile `q` of values clamped to [lo, hi], for ε at most `epsilon` when one privacy
/// unit changes at most `rows_per_unit` rows: the smallest scale whose OpenDP privacy map
/// stays within `epsilon`.
pub(super) fn calibrate(
    lo: f64,
    hi: f64,
    q: f64,
    budget: Budget,
    rows_per_unit: u64,
) -> Result<QuantileMechanism, GateError> {
    calibrate_over(candidates(lo, hi), lo, hi, q, budget, rows_per_unit)
}

/// As [`calibrate`], over the given candidates (strictly increasing, inside [lo, hi]).
pub(super) fn calibrate_over(
    candidates: Vec<f64>,
    lo: f64,
    hi: f64,
    q: f64,
    budget: Budget,
    rows_per_unit: u64,
) -> Result<QuantileMechanism, GateError> {
    let rows = u32::try_from(rows_per_unit)
        .map_err(|_| GateError::Mechanism("the per-person row bound is too large".into()))?;
    let build = |scale: f64| {
        make_private_quantile(
            VectorDomain::new(AtomDomain::<f64>::new_non_nan()),
            SymmetricDistance,
            MaxDivergence,
            candidates.clone(),
            q,
            scale,
        )
    };
    // The mechanism is pure ε-DP; under a ρ budget its loss is OpenDP's conversion to zCDP
    // (ρ = ε²/2), so it is fitted to ε = √(2ρ).
    let (target, epsilon, power) = match budget {
        Budget::Pure { epsilon } => (epsilon, epsilon, 1.0),
        Budget::Concentrated { rho, .. } => (rho, (2.0 * rho).sqrt(), 0.5),
    };
    let spend = |m: &QuantileMeasurement| match budget {
        Budget::Pure { .. } => m.map(&rows),
        Budget::Concentrated { .. } => make_pureDP_to_zCDP(m.clone())?.map(&rows),
    };
    // OpenDP's map for an unsized input: ε = 2·d·max(q, 1 − q) / scale (q rounded to a
    // fraction). Start there; should the map itself say more (rounding), widen to fit.
    let mut scale = (2.0 * f64::from(rows) * q.max(1.0 - q) / epsilon).max(f64::MIN_POSITIVE);
    for _ in 0..16 {
        let m = build(scale)?;
        let spent = spend(&m)?;
        if spent <= target {
            return Ok(QuantileMechanism {
                measurement: m,
                scale,
                loss: spent,
                lo,
                hi,
            });
        }
        scale *= (spent / target).powf(power) * (1.0 + 1e-12);
    }
    Err(GateError::Mechanism(
        "the quantile's noise could not be calibrated".into(),
    ))
}

impl QuantileMechanism {
    /// The noisy quantile of one group's values (clamped; NaN and nulls are not values).
    pub(super) fn draw(&self, values: &[f64]) -> Result<f64, GateError> {
        let clamped: Vec<f64> = values
            .iter()
            .filter(|v| !v.is_nan())
            .map(|v| v.clamp(self.lo, self.hi))
            .collect();
        Ok(self.measurement.invoke(&clamped)?)
    }
}

/// The exact quantile `q` of `values` clamped to [lo, hi] (nearest rank), for data released
/// without noise; `None` for a group with no values.
pub(super) fn exact(values: &[f64], lo: f64, hi: f64, q: f64) -> Option<f64> {
    let mut v: Vec<f64> = values
        .iter()
        .filter(|v| !v.is_nan())
        .map(|v| v.clamp(lo, hi))
        .collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * (v.len() - 1) as f64).round() as usize).min(v.len() - 1);
    Some(v[rank])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pure(epsilon: f64) -> Budget {
        Budget::Pure { epsilon }
    }

    #[test]
    fn calibration_spends_at_most_its_share_and_scales_with_k() {
        for (q, eps, k) in [
            (0.5, 1.0, 1u64),
            (0.9, 0.3, 1),
            (0.5, 1.0, 10),
            (0.1, 2.0, 5),
        ] {
            let m = calibrate(0.0, 100.0, q, pure(eps), k).unwrap();
            assert!(
                m.loss <= eps && m.loss > eps * 0.999,
                "{q} {eps} {k}: {m:?}"
            );
            // Under ρ = ε²/2 the same mechanism, at the same scale (OpenDP's conversion).
            let rho = eps * eps / 2.0;
            let z = calibrate(0.0, 100.0, q, Budget::Concentrated { rho, delta: 1e-6 }, k);
            let z = z.unwrap();
            assert!(
                z.loss <= rho && z.loss > rho * 0.999,
                "{q} {rho} {k}: {z:?}"
            );
            assert!(
                (z.scale / m.scale - 1.0).abs() < 1e-3,
                "{} {}",
                z.scale,
                m.scale
            );
        }
        let one = calibrate(0.0, 100.0, 0.5, pure(1.0), 1).unwrap();
        let ten = calibrate(0.0, 100.0, 0.5, pure(1.0), 10).unwrap();
        assert!((ten.scale / one.scale - 10.0).abs() < 1e-6);
    }

    #[test]
    fn a_large_group_gets_close_to_its_median_and_values_stay_in_bounds() {
        let m = calibrate(0.0, 100.0, 0.5, pure(1.0), 1).unwrap();
        // 201 values 0..=200 (half outside the bounds): the clamped median is 100.
        let values: Vec<f64> = (0..=200).map(f64::from).collect();
        assert_eq!(exact(&values, 0.0, 100.0, 0.5), Some(100.0));
        let wide: Vec<f64> = (0..20_000).map(|i| f64::from(i % 100)).collect();
        for _ in 0..20 {
            let got = m.draw(&wide).unwrap();
            assert!((got - 49.5).abs() < 2.0, "{got}");
            let any = m.draw(&[f64::NAN, -1e300, 1e300]).unwrap();
            assert!((0.0..=100.0).contains(&any));
        }
        assert_eq!(exact(&[], 0.0, 1.0, 0.5), None);
    }
}
