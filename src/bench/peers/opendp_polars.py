"""OpenDP (Polars API) peer for the shared benchmark questions Q1-Q4 of shared/bench/WORKLOADS.md.

Runs each question through OpenDP's Polars front end (dp.Context.compositor, context.query(),
.release().collect()) on a trips Parquet file, computes the exact answer with plain Polars,
and prints one JSON line per question: query, system, rows, runs, epsilon, delta, groups
(released; median over runs), wall_s (median of one release, from pl.scan_parquet to the
collected frame, including OpenDP's calibration search), mae (measure -> mean absolute error
over released groups and runs) and notes (the OpenDP expressions and options used, and the
noise scales OpenDP chose).

Needs: pip install opendp==0.16.0 polars==1.36.1   (polars 2.x does not load opendp 0.16's plugin)

Usage: python3 src/bench/peers/opendp_polars.py --data FILE.parquet --query Q1|Q2|Q3|Q4|all [--runs N]
"""

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import opendp.prelude as dp
import polars as pl

dp.enable_features("contrib")

FARE_BOUNDS = (0.0, 100.0)
# Public keys (Q1-Q3) are given as a key set joined with with_keys, OpenDP's public key-set join,
# rather than Margin(invariant="keys"), which OpenDP documents as weakening the guarantee; the
# noise is the same either way and every key in the set is released.
DISTRICTS = pl.LazyFrame({"district": [f"D{i:02d}" for i in range(1, 17)]})
DISTRICT_HOURS = DISTRICTS.join(pl.LazyFrame({"hour": pl.Series(range(24), dtype=pl.Int32)}), how="cross")
CLAMPED_FARE = pl.col("fare").clip(*FARE_BOUNDS)

# Shared by Q1 and Q2: one query, two aggregates, one pass. OpenDP calibrates one global scale so
# that the whole query spends ε = 1.0 and derives each aggregate's scale from it. That splits Q1
# exactly 0.5/0.5, but not Q2: the truncated count gets ~0.50 at 1M rows and ~0.62 at 10M (the
# float sum's rounding term grows with max_length). Not forced even: Q2's error is truncation bias.
DISTRICT_AGGS_NOTE = (
    "group_by('district').agg(dp.len(signed=True).alias('trips'), "
    "pl.col('fare').dp.sum((0.0, 100.0)).alias('fare_sum')).with_keys(<16 public districts>) "
    "(a public key-set join, not Margin invariant='keys'); "
    "budget split by the one global scale OpenDP calibrates over both aggregates, not forced to 0.5/0.5 "
    "(exactly even for Q1; uneven for Q2, compare the scales)"
)


@dataclass
class Question:
    keys: list[str]
    measures: list[str]
    epsilon: float
    delta: float | None
    notes: str
    # (path, rows) -> an OpenDP query over a fresh pl.scan_parquet(path), ready to release.
    build: Callable[[str, int], object]
    # the whole file -> the exact answer with the same key and measure columns.
    exact: Callable[[pl.LazyFrame], pl.DataFrame]


def context(path: str, unit, loss, margins=None):
    """A compositor for one query spending the whole budget, over a lazy scan of the file."""
    return dp.Context.compositor(
        data=pl.scan_parquet(path),
        privacy_unit=unit,
        privacy_loss=loss,
        split_evenly_over=1,
        margins=margins,
    )


def district_margin(rows: int):
    # max_length: the file's row count, a public bound; max_groups: the 16 public districts.
    return [dp.polars.Margin(by=["district"], max_length=rows, max_groups=16)]


def district_aggs(query):
    aggs = [dp.len(signed=True).alias("trips"), pl.col("fare").dp.sum(FARE_BOUNDS).alias("fare_sum")]
    return query.group_by("district").agg(*aggs).with_keys(DISTRICTS)


def exact_districts(lf: pl.LazyFrame) -> pl.DataFrame:
    aggs = [pl.len().alias("trips"), CLAMPED_FARE.sum().alias("fare_sum")]
    return lf.group_by("district").agg(*aggs).collect()


def q1(path: str, rows: int):
    """Per district: count and clamped fare sum, one row is the privacy unit."""
    ctx = context(path, dp.unit_of(contributions=1), dp.loss_of(epsilon=1.0), district_margin(rows))
    return district_aggs(ctx.query())


def q2(path: str, rows: int):
    """As Q1, one person (person_id) is the privacy unit, truncated to 10 rows per person."""
    unit = dp.unit_of(contributions=1, identifier="person_id")
    ctx = context(path, unit, dp.loss_of(epsilon=1.0), district_margin(rows))
    return district_aggs(ctx.query().truncate_per_group(10))


def q3(path: str, rows: int):
    """Mean clamped fare per (district, hour), one row is the privacy unit."""
    margin = dp.polars.Margin(by=["district", "hour"], max_length=rows, max_groups=384)
    ctx = context(path, dp.unit_of(contributions=1), dp.loss_of(epsilon=1.0), [margin])
    mean = pl.col("fare").dp.mean(FARE_BOUNDS).alias("mean_fare")
    return ctx.query().group_by("district", "hour").agg(mean).with_keys(DISTRICT_HOURS)


def exact_q3(lf: pl.LazyFrame) -> pl.DataFrame:
    return lf.group_by("district", "hour").agg(CLAMPED_FARE.mean().alias("mean_fare")).collect()


def q4(path: str, _rows: int):
    """Count per cell; cells are private keys, so OpenDP thresholds the noisy counts."""
    ctx = context(path, dp.unit_of(contributions=1), dp.loss_of(epsilon=1.0, delta=1e-6))
    return ctx.query().group_by("cell").agg(dp.len(signed=True).alias("trips"))


def exact_q4(lf: pl.LazyFrame) -> pl.DataFrame:
    return lf.group_by("cell").agg(pl.len().alias("trips")).collect()


QUESTIONS = {
    "Q1": Question(
        keys=["district"], measures=["trips", "fare_sum"], epsilon=1.0, delta=None,
        notes="dp.unit_of(contributions=1); dp.loss_of(epsilon=1.0); "
        "Margin(by=['district'], max_length=<file rows>, max_groups=16), no invariant; "
        + DISTRICT_AGGS_NOTE,
        build=q1, exact=exact_districts,
    ),
    "Q2": Question(
        keys=["district"], measures=["trips", "fare_sum"], epsilon=1.0, delta=None,
        notes="dp.unit_of(contributions=1, identifier='person_id') (one person); dp.loss_of(epsilon=1.0); "
        "Margin(by=['district'], max_length=<file rows>, max_groups=16); "
        "query().truncate_per_group(10) (keep='sample': a random 10 of each person's rows, "
        "OpenDP's per-identifier truncation, so this is the same person-level guarantee); "
        "with_keys is required here: the truncation filter drops invariant='keys' margins; "
        + DISTRICT_AGGS_NOTE
        + "; MAE against the exact answer over ALL rows (the truncation bias counts as error)",
        build=q2, exact=exact_districts,
    ),
    "Q3": Question(
        keys=["district", "hour"], measures=["mean_fare"], epsilon=1.0, delta=None,
        notes="dp.unit_of(contributions=1); dp.loss_of(epsilon=1.0); "
        "Margin(by=['district','hour'], max_length=<file rows>, max_groups=384), no invariant; "
        "group_by('district','hour').agg(pl.col('fare').dp.mean((0.0, 100.0))).with_keys(<384 public keys>): "
        "OpenDP's mean releases a noisy sum and a noisy count and divides them",
        build=q3, exact=exact_q3,
    ),
    "Q4": Question(
        keys=["cell"], measures=["trips"], epsilon=1.0, delta=1e-6,
        notes="dp.unit_of(contributions=1); dp.loss_of(epsilon=1.0, delta=1e-6); no margins (cells are private); "
        "group_by('cell').agg(dp.len(signed=True)); OpenDP's resolve() solves the Laplace scale for epsilon "
        "and then the release threshold for delta (noisy counts below it are dropped); "
        "MAE over the released cells only",
        build=q4, exact=exact_q4,
    ),
}


def summary(query) -> str:
    """The noise OpenDP calibrated for a query (distribution, scale, threshold if any)."""
    table = query.summarize()
    parts = []
    for row in table.iter_rows(named=True):
        part = f"{row['column']} {row['aggregate']}: {row['distribution']} scale {row['scale']:.4g}"
        if row.get("threshold") is not None:
            part += f", threshold {row['threshold']}"
        parts.append(part)
    return "; ".join(parts)


def run(name: str, q: Question, path: str, rows: int, runs: int) -> dict:
    exact = q.exact(pl.scan_parquet(path))
    times, groups = [], []
    errors: dict[str, list[float]] = {m: [] for m in q.measures}
    for _ in range(runs):
        start = time.perf_counter()
        released = q.build(path, rows).release().collect()
        times.append(time.perf_counter() - start)
        groups.append(released.height)
        joined = released.join(exact, on=q.keys, how="inner", suffix="_exact")
        for m in q.measures:
            diff = (joined[m].cast(pl.Float64) - joined[f"{m}_exact"].cast(pl.Float64)).abs()
            errors[m].extend(diff.drop_nulls().to_list())
    return {
        "query": name,
        "system": "opendp-polars",
        "rows": rows,
        "runs": runs,
        "epsilon": q.epsilon,
        "delta": q.delta,
        "groups": statistics.median_low(groups),
        "wall_s": statistics.median(times),
        "mae": {m: sum(e) / len(e) if e else None for m, e in errors.items()},
        "notes": f"{q.notes}; noise: {summary(q.build(path, rows))}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="trips Parquet file")
    parser.add_argument("--query", default="all", choices=[*QUESTIONS, "all"])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rows = pl.scan_parquet(args.data).select(pl.len()).collect().item()
    names = list(QUESTIONS) if args.query == "all" else [args.query]
    for name in names:
        print(json.dumps(run(name, QUESTIONS[name], args.data, rows, args.runs)), flush=True)


if __name__ == "__main__":
    main()
