"""`recupdate ingest SOURCE --schema NAME`: load interactions and the catalogue into a policy's schema.

For backfills and for users without a cluster: the same sources as spec.data (docs/data.md), on any DSN or the
embedded store, through the same sync step a job runs first (store/sync.py): exactly once (a file once, a query
after its watermark, an event id once), in one transaction, bad rows counted per reason and skipped. Running it
twice on the same input adds nothing the second time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from recupdate_workloads.contract.env import DSN_ENV, SOURCE_DSN_ENV

_USAGE_SOURCES = (
    "SOURCE: synthetic, movielens:PATH, postgres (drain the inbox tables), sql (--query), or a Parquet/CSV file "
    "or directory: a path, file://PATH or s3://BUCKET/PREFIX"
)


def configure(p: argparse.ArgumentParser) -> None:
    p.description = (p.description or "") + ". " + _USAGE_SOURCES
    p.add_argument("source", nargs="?", default=None, help="the interactions source URI (default: the policy's)")
    p.add_argument("--schema", default=None, help="the policy's store schema (default: the policy's, with -f)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--dsn", default=None, help=f"PostgreSQL DSN of the store (default: ${DSN_ENV})")
    where.add_argument("--store-dir", default=None, help="embedded PostgreSQL directory (default .recupdate/pg)")
    p.add_argument("-f", "--policy", default=None, help="take spec.data (and the schema) from this policy YAML")
    p.add_argument("--items", default=None, help="items -> clusters source URI (file, directory, sql, postgres)")
    p.add_argument("--clusters", default=None, help="clusters (name, keywords) source URI")
    p.add_argument("--format", default=None, choices=["auto", "parquet", "csv"], help="file format (default auto)")
    p.add_argument("--columns", default=None, metavar="MAP",
                   help="interactions columns: user=COL,item=COL,ts=COL,weight=COL,event_id=COL")  # fmt: skip
    p.add_argument("--item-columns", default=None, metavar="MAP", help="items columns: item=COL,cluster=COL")
    p.add_argument("--cluster-columns", default=None, metavar="MAP", help="cluster=COL,name=COL,keywords=COL")
    p.add_argument("--query", default=None, help="SOURCE sql: the interactions query")
    p.add_argument("--watermark", default=None, help="SOURCE sql: the query's watermark column")
    p.add_argument("--items-query", default=None, help="--items sql: the items query")
    p.add_argument("--clusters-query", default=None, help="--clusters sql: the clusters query")
    p.add_argument(
        "--source-dsn", default=None, help=f"DSN of the user's PostgreSQL for sql (default: ${SOURCE_DSN_ENV})"
    )
    p.add_argument("--s3-endpoint", default=None, help="host[:port] of an S3-compatible server")
    p.add_argument("--s3-scheme", default=None, choices=["https", "http"], help="scheme of --s3-endpoint")
    p.add_argument("--s3-region", default=None, help="bucket region")
    p.add_argument("--no-embed", dest="embed", action="store_false",
                   help="do not embed new clusters (faster; evidence borrowing then has no neighbours for them)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")


def _mapping(text: str | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{flag}: expected NAME=COLUMN pairs separated by commas, got {part!r}")
        out[key.strip()] = value.strip()
    return out


def data_section(args: argparse.Namespace) -> tuple[dict[str, Any], str | None]:
    """spec.data as the command line and the policy file give it (camelCase), and the schema."""
    data: dict[str, Any] = {}
    schema = args.schema
    if args.policy:
        import yaml

        doc = yaml.safe_load(Path(args.policy).read_text()) or {}
        spec = doc.get("spec") or {}
        data = dict(spec.get("data") or {})
        if schema is None:
            from recupdate_workloads.contract.registry import default_schema

            schema = (spec.get("store") or {}).get("schema") or default_schema((doc.get("metadata") or {})["name"])
    if args.source:
        data["interactions"] = args.source
    for key in ("items", "clusters", "format"):
        if getattr(args, key):
            data[key] = getattr(args, key)
    renames = {"event_id": "eventId"}
    if args.columns:
        data["columns"] = {renames.get(k, k): v for k, v in _mapping(args.columns, "--columns").items()}
    if args.item_columns:
        data["itemColumns"] = _mapping(args.item_columns, "--item-columns")
    if args.cluster_columns:
        data["clusterColumns"] = _mapping(args.cluster_columns, "--cluster-columns")
    sql = dict(data.get("sql") or {})
    if args.query:
        sql["interactions"] = {"query": args.query, "watermark": args.watermark or ""}
    if args.items_query:
        sql["items"] = {"query": args.items_query}
    if args.clusters_query:
        sql["clusters"] = {"query": args.clusters_query}
    if sql:
        data["sql"] = sql
    s3 = dict(data.get("objectStorage") or {})
    for flag, key in (("s3_endpoint", "endpoint"), ("s3_scheme", "scheme"), ("s3_region", "region")):
        if getattr(args, flag):
            s3[key] = getattr(args, flag)
    if s3:
        data["objectStorage"] = s3
    if not data.get("interactions"):
        raise ValueError("name a SOURCE (or a policy with -f)")
    return data, schema


def run(args: argparse.Namespace) -> int:
    import os

    from recupdate_workloads.data.errors import DataError
    from recupdate_workloads.data.sources import DataConfig
    from recupdate_workloads.store.db import open_store
    from recupdate_workloads.store.sync import sync

    try:
        data, schema = data_section(args)
    except (ValueError, OSError, KeyError) as exc:
        print(f"recupdate ingest: {exc}", file=sys.stderr)
        return 2
    if not schema:
        print("recupdate ingest: --schema is required (or a policy with -f)", file=sys.stderr)
        return 2
    if args.source_dsn:
        os.environ[SOURCE_DSN_ENV] = args.source_dsn
    cfg = DataConfig.parse(data)
    bar = None
    if not args.json and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(unit=" rows", unit_scale=True, desc="ingest", file=sys.stderr)
    try:
        with open_store(schema, dsn=args.dsn, data_dir=args.store_dir) as store:
            report = sync(store, cfg, live_synthetic=False, embed=args.embed, progress=bar.update if bar else None)
    except (DataError, ValueError) as exc:
        print(f"recupdate ingest: {exc} (nothing was ingested)", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"recupdate ingest: {type(exc).__name__}: {exc} (nothing was ingested)", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        i, c = report.interactions, report.catalogue
        out = {"new": i.new, "duplicate": i.duplicate, "skipped": dict(sorted(i.skipped.items()))}
        print(json.dumps(out | {"clusters": c.clusters, "items": c.items}))
    else:
        print(f"recupdate ingest into schema {schema}: {report.summary()}")
    return 0
