#!/usr/bin/env python3
"""Reads sluice's tables with a Delta reader that is not delta-rs, and prints what it sees.

    python3 scripts/independent_read.py LAKE_ROOT

deltalake2db replays the Delta log and reads checkpoints itself, then hands DuckDB the live
Parquet files. The queries below run on `enriched_posts` and `enriched_posts_dead_letters`
under LAKE_ROOT. The output is JSON: `[[name, sql, rows], ...]`, each row an object of
column -> value. tests/trino.rs runs the same SQL through `sluice sql` and compares.

Needs: pip install deltalake2db==1.2.2 duckdb==1.4.1 pytz (scripts/compat.sh installs them).
"""

import datetime
import decimal
import json
import sys

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


def plain(value):
    """A JSON value for what DuckDB returned."""
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    return value


def main(root):
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    for table in ("enriched_posts", "enriched_posts_dead_letters"):
        deltalake2db.duckdb_create_view_for_delta(con, f"{root}/{table}", table)
    results = []
    for name, sql in QUERIES.items():
        sql = " ".join(sql.split())
        cursor = con.execute(sql)
        columns = [d[0] for d in cursor.description]
        rows = [dict(zip(columns, map(plain, row))) for row in cursor.fetchall()]
        results.append([name, sql, rows])
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
