"""Loaders into the canonical InteractionLog: MovieLens directories, generic CSV/Parquet, synthetic.

Bad rows are counted per reason and skipped; every valid row is kept. Parsing is vectorised
(pandas' coercing converters), so a bad row costs nothing extra and never raises.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from recupdate_workloads.data.synthetic import SyntheticSpec, SyntheticStream
from recupdate_workloads.data.types import Catalogue, Cluster, InteractionLog

BAD_REASONS = ("missing_field", "bad_timestamp", "unknown_item", "negative_weight", "bad_weight")


@dataclass
class LoadReport:
    """What a loader read: rows kept and rows skipped per reason."""

    rows_read: int = 0
    rows_kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        bad = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"read {self.rows_read} rows, kept {self.rows_kept}, skipped: {bad}"


@dataclass
class Dataset:
    """A loaded log with its catalogue and the report of what was skipped."""

    log: InteractionLog
    report: LoadReport
    name: str

    @property
    def catalogue(self) -> Catalogue:
        return self.log.catalogue


def _parse_ts(col: pd.Series) -> pd.Series:
    """Unix seconds from integers or ISO-8601 strings; NaN where unparseable."""
    num = pd.to_numeric(col, errors="coerce")
    text = col.where(num.isna() & col.notna())
    if text.notna().any():
        parsed = pd.to_datetime(text, errors="coerce", utc=True, format="ISO8601")
        secs = (parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
        num = num.fillna(secs.astype("float64"))
    return num


def frame_to_log(
    frame: pd.DataFrame,
    item_cluster: dict[str, int],
    catalogue: Catalogue,
    columns: dict[str, str] | None = None,
    default_weight: float = 1.0,
) -> tuple[InteractionLog, LoadReport]:
    """Validate raw rows (any dtype) into a log. `columns` maps canonical names (user, item, ts, weight)
    to the frame's own column names. Items are external ids (strings); users may be anything hashable."""
    cols = {"user": "user", "item": "item", "ts": "ts", "weight": "weight"} | (columns or {})
    report = LoadReport(rows_read=len(frame))
    user = frame[cols["user"]]
    item = frame[cols["item"]].astype("string").str.strip()
    ts = _parse_ts(frame[cols["ts"]])
    has_weight = cols["weight"] in frame.columns
    weight = pd.to_numeric(frame[cols["weight"]], errors="coerce") if has_weight else None

    missing = user.isna() | item.isna() | (item == "") | frame[cols["ts"]].isna()
    if has_weight:
        missing |= frame[cols["weight"]].isna()
    bad = missing.to_numpy(copy=True)
    report.skipped["missing_field"] += int(bad.sum())

    def skip(mask: pd.Series | np.ndarray, reason: str) -> None:
        m = np.asarray(mask, dtype=bool) & ~bad
        report.skipped[reason] += int(m.sum())
        bad[m] = True

    skip(ts.isna(), "bad_timestamp")
    if weight is not None:
        skip(weight.isna(), "bad_weight")
        skip(weight < 0, "negative_weight")
    mapped = item.map(item_cluster)
    skip(mapped.isna(), "unknown_item")
    report.skipped = Counter({k: v for k, v in report.skipped.items() if v})

    ok = ~bad
    # Dense item ids in first-seen order of the catalogue mapping.
    item_ids = {name: i for i, name in enumerate(item_cluster)}
    item_cluster_arr = np.fromiter(item_cluster.values(), dtype=np.int32, count=len(item_cluster))
    user_codes, _ = pd.factorize(user[ok])
    log = InteractionLog(
        user=np.asarray(user_codes, dtype=np.int64),
        item=item[ok].map(item_ids).to_numpy(dtype=np.int64),
        ts=ts[ok].to_numpy(dtype=np.int64),
        weight=(weight[ok] if weight is not None else pd.Series(default_weight, index=frame.index[ok])).to_numpy(
            dtype=np.float32
        ),
        item_cluster=item_cluster_arr,
        catalogue=catalogue,
    )
    report.rows_kept = len(log)
    return log, report


def _read_table(path: Path) -> pd.DataFrame:
    if path.suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    # Everything as text: typing happens in frame_to_log, where bad values are counted, not raised.
    return pd.read_csv(path, dtype=str, keep_default_na=True, on_bad_lines="skip", engine="c")


_NO_GENRE = "(no genres listed)"


def movielens_clusters(genres: pd.Series, mode: str = "pair") -> tuple[list[str], list[tuple[str, ...]]]:
    """Cluster of each movie: its two most specific genres ('pair'), or its most specific one ('genre').

    The most specific genre is the one the fewest movies carry (docs/architecture.md: 173 pair clusters on
    ml-latest-small; single genres are too coarse, full combinations too sparse).
    """
    lists = genres.fillna(_NO_GENRE).str.split("|")
    freq = Counter(g for gs in lists for g in gs)
    take = 2 if mode == "pair" else 1
    names, keywords = [], []
    for gs in lists:
        spec = sorted(set(gs), key=lambda g: (freq[g], g))[:take]
        names.append("|".join(sorted(spec)))
        keywords.append(tuple(g.lower().replace("-", " ") for g in sorted(spec)))
    return names, keywords


def load_movielens(path: str | Path, clusters: str = "pair", min_weight: float = 0.0) -> Dataset:
    """A MovieLens directory (ratings.csv + movies.csv), e.g. ml-latest-small."""
    root = Path(path)
    if not (root / "ratings.csv").exists() or not (root / "movies.csv").exists():
        raise FileNotFoundError(f"{root} is not a MovieLens directory (needs ratings.csv and movies.csv)")
    if clusters not in ("pair", "genre"):
        raise ValueError("clusters must be 'pair' or 'genre'")
    movies = pd.read_csv(root / "movies.csv", dtype=str)
    names, keywords = movielens_clusters(movies["genres"], clusters)
    order = sorted(set(names))
    cid = {n: i for i, n in enumerate(order)}
    kw = dict(zip(names, keywords, strict=True))
    catalogue = Catalogue([Cluster(id=i, name=n, keywords=kw[n]) for i, n in enumerate(order)])
    item_cluster = dict(zip(movies["movieId"].str.strip(), (cid[n] for n in names), strict=True))
    ratings = _read_table(root / "ratings.csv")
    log, report = frame_to_log(
        ratings,
        item_cluster,
        catalogue,
        {"user": "userId", "item": "movieId", "ts": "timestamp", "weight": "rating"},
    )
    return Dataset(log=log, report=report, name=f"movielens:{root.name}")


def load_table(
    interactions: str | Path,
    items: str | Path,
    clusters: str | Path | None = None,
    columns: dict[str, str] | None = None,
) -> Dataset:
    """Generic CSV/Parquet: an interactions file (user, item, ts[, weight] under any column names given by
    `columns`), an items file (item, cluster), and optionally a clusters file (cluster, keywords, with
    keywords separated by ';' or ',')."""
    items_df = _read_table(Path(items))
    if not {"item", "cluster"} <= set(items_df.columns):
        raise ValueError(f"{items}: the items file needs columns 'item' and 'cluster'")
    kw_of: dict[str, tuple[str, ...]] = {}
    if clusters is not None:
        cdf = _read_table(Path(clusters))
        for name, kws in zip(cdf["cluster"].astype(str), cdf.get("keywords", cdf["cluster"]).astype(str), strict=True):
            kw_of[name] = tuple(k.strip() for k in re.split(r"[;,]", kws) if k.strip())
    names = sorted(set(items_df["cluster"].dropna().astype(str)) | set(kw_of))
    catalogue = Catalogue([Cluster(id=i, name=n, keywords=kw_of.get(n, (n,))) for i, n in enumerate(names)])
    cid = {n: i for i, n in enumerate(names)}
    valid = items_df.dropna(subset=["item", "cluster"])
    item_cluster = {str(i).strip(): cid[str(c)] for i, c in zip(valid["item"], valid["cluster"], strict=True)}
    log, report = frame_to_log(_read_table(Path(interactions)), item_cluster, catalogue, columns)
    return Dataset(log=log, report=report, name=f"table:{Path(interactions).name}")


def load_synthetic(spec: SyntheticSpec | None = None) -> Dataset:
    stream = SyntheticStream(spec or SyntheticSpec())
    log = stream.generate()
    return Dataset(log=log, report=LoadReport(rows_read=len(log), rows_kept=len(log)), name="synthetic")


def load(source: str, clusters: str = "pair", synthetic: SyntheticSpec | None = None) -> Dataset:
    """Resolve a data URI: 'synthetic', 'movielens:PATH', or 'table:INTERACTIONS,ITEMS[,CLUSTERS]'."""
    kind, _, rest = source.partition(":")
    if kind == "synthetic":
        return load_synthetic(synthetic)
    if kind == "movielens":
        return load_movielens(rest, clusters=clusters)
    if kind == "table":
        parts = rest.split(",")
        if len(parts) not in (2, 3):
            raise ValueError("table:INTERACTIONS,ITEMS[,CLUSTERS]")
        return load_table(parts[0], parts[1], parts[2] if len(parts) == 3 else None)
    raise ValueError(f"unknown data source {source!r}: use synthetic, movielens:PATH or table:I,ITEMS[,C]")
