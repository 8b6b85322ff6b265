#!/usr/bin/env python3
"""Reads sluice's tables with a Delta reader that is not delta-rs, and prints what it sees.

    python3 scripts/independent_read.py LAKE_ROOT
    python3 scripts/independent_read.py --ledger [--s3-endpoint URL] LAKE_ROOT

--ledger runs the LEDGER queries instead: per Kafka partition, the offsets each table holds,
and the offsets held by both (there must be none). With --s3-endpoint, LAKE_ROOT is an
s3://bucket/prefix URL: the two tables' objects are copied to a temporary folder first (boto3,
credentials from the environment) and read there, because DuckDB reads S3 only through an
extension it downloads at run time.

deltalake2db replays the Delta log and reads checkpoints itself, then hands DuckDB the live
Parquet files. The queries below run on `enriched_posts` and `enriched_posts_dead_letters`
under LAKE_ROOT. The output is JSON: `[[name, sql, rows], ...]`, each row an object of
column -> value. tests/trino.rs runs the same SQL through `sluice sql` and compares.

Needs: pip install deltalake2db==1.2.2 duckdb==1.4.1 pytz (scripts/compat.sh installs them).
"""

import argparse
import datetime
import decimal
import json
import os
import sys
import tempfile

import duckdb
import deltalake2db
from deltalake2db import duckdb as delta_duckdb

# deltalake2db 1.2.2 converts partition values from strings, but DuckDB hands it date
# partition values already parsed: pass those through instead of failing on them.
_to_python = delta_duckdb._partition_value_to_python
delta_duckdb._partition_value_to_python = lambda value, type_name: (
    _to_python(value, type_name) if value is None or isinstance(value, str) else value
)

QUERIES = {
    "rows per day": """
        SELECT CAST(event_date AS VARCHAR) AS day, COUNT(*) AS posts,
               COUNT(DISTINCT post_id) AS distinct_posts, SUM(like_count) AS likes,
               SUM(array_length(embedding)) AS embedding_values,
               SUM(array_length(entities)) AS entities
        FROM enriched_posts GROUP BY event_date ORDER BY day""",
    "labels": """
        SELECT sentiment, category, COUNT(*) AS posts, AVG(toxicity) AS mean_toxicity,
               SUM(toxicity_labels.insult) AS insult
        FROM enriched_posts GROUP BY sentiment, category
        ORDER BY sentiment NULLS LAST, category NULLS LAST""",
    "offsets": """
        SELECT kafka_topic, kafka_partition, COUNT(*) AS posts,
               COUNT(DISTINCT kafka_offset) AS distinct_offsets,
               MIN(kafka_offset) AS first_offset, MAX(kafka_offset) AS last_offset,
               EXTRACT(EPOCH FROM MIN(created_at)) AS first_created,
               EXTRACT(EPOCH FROM MAX(created_at)) AS last_created
        FROM enriched_posts GROUP BY kafka_topic, kafka_partition
        ORDER BY kafka_topic, kafka_partition""",
    "dead letters": """
        SELECT reason, COUNT(*) AS letters, SUM(payload_bytes) AS bytes
        FROM enriched_posts_dead_letters GROUP BY reason ORDER BY reason""",
}


def offsets_per_partition(table):
    """How many messages of each Kafka partition `table` holds, and which offsets."""
    return f"""
        SELECT kafka_topic, kafka_partition, COUNT(*) AS messages,
               COUNT(DISTINCT kafka_offset) AS distinct_offsets,
               MIN(kafka_offset) AS first_offset, MAX(kafka_offset) AS last_offset
        FROM {table} GROUP BY kafka_topic, kafka_partition
        ORDER BY kafka_topic, kafka_partition"""


LEDGER = {
    "rows": offsets_per_partition("enriched_posts"),
    "dead letters": offsets_per_partition("enriched_posts_dead_letters"),
    "in both": """
        SELECT COUNT(*) AS offsets
        FROM enriched_posts p JOIN enriched_posts_dead_letters d
          ON p.kafka_topic = d.kafka_topic AND p.kafka_partition = d.kafka_partition
         AND p.kafka_offset = d.kafka_offset""",
}

TABLES = ("enriched_posts", "enriched_posts_dead_letters")


def copy_from_s3(endpoint, root, dest):
    """Copies every object of the tables under the s3:// root into dest."""
    import boto3

    bucket, _, prefix = root.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    s3 = boto3.client("s3", endpoint_url=endpoint)
    for table in TABLES:
        table_prefix = f"{prefix}/{table}/" if prefix else f"{table}/"
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=table_prefix):
            for obj in page.get("Contents", []):
                target = os.path.join(dest, table, obj["Key"][len(table_prefix):])
                os.makedirs(os.path.dirname(target), exist_ok=True)
                s3.download_file(bucket, obj["Key"], target)


def plain(value):
    """A JSON value for what DuckDB returned."""
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    return value


def main(root, queries):
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    for table in TABLES:
        deltalake2db.duckdb_create_view_for_delta(con, f"{root}/{table}", table)
    results = []
    for name, sql in queries.items():
        sql = " ".join(sql.split())
        cursor = con.execute(sql)
        columns = [d[0] for d in cursor.description]
        rows = [dict(zip(columns, map(plain, row))) for row in cursor.fetchall()]
        results.append([name, sql, rows])
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(usage=__doc__)
    parser.add_argument("--ledger", action="store_true")
    parser.add_argument("--s3-endpoint")
    parser.add_argument("root")
    args = parser.parse_args()
    queries = LEDGER if args.ledger else QUERIES
    if args.s3_endpoint:
        with tempfile.TemporaryDirectory() as local:
            copy_from_s3(args.s3_endpoint, args.root, local)
            main(local, queries)
    else:
        main(args.root, queries)
