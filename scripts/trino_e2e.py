"""The Trino suite's checks (scripts/trino-e2e.sh starts the servers and runs this).

Real `sluice run` writers land posts from Apache Kafka in s3:// tables on moto; a real Trino
(delta_lake connector) reads them through two catalogs, one on a Hive Metastore and one on
Trino's file metastore, configured by the catalog files sluice ships. Every check compares what
Trino returns with what `sluice sql` returns on the same table version: the two engines share no
code, so each is the other's oracle.

Environment (set by scripts/trino-e2e.sh): SLUICE_BIN, TRINO_URL, TRINO_CLI (a command line),
KAFKA_BROKERS, S3_ENDPOINT, SLUICE_TRINO_WORK (a scratch folder), SLUICE_REPO.
"""

import base64
import csv
import datetime
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

SLUICE = os.environ["SLUICE_BIN"]
TRINO_URL = os.environ["TRINO_URL"]
TRINO_CLI = shlex.split(os.environ["TRINO_CLI"])
BROKERS = os.environ["KAFKA_BROKERS"]
S3_ENDPOINT = os.environ["S3_ENDPOINT"]
WORK = Path(os.environ["SLUICE_TRINO_WORK"])
REPO = Path(os.environ["SLUICE_REPO"])

CATALOGS = ["delta", "delta_file"]
SCHEMA = "sluice"
TABLE = "enriched_posts"
DEAD = "enriched_posts_dead_letters"
DELETIONS = "enriched_posts_deletions"
# Floats agree to this relative difference (the two engines sum in different orders).
FLOAT_TOLERANCE = 1e-9
# Cosine similarities of the same pairs agree to this absolute difference.
COSINE_TOLERANCE = 1e-6
# How long a writer may take to land what was produced.
CATCH_UP_S = 180


class Failure(Exception):
    """A check did not hold."""


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# Trino over its HTTP protocol: typed columns, and no JVM start per query.


class TrinoError(Exception):
    pass


def trino(sql, catalog="delta", timeout_s=120):
    """Runs one statement; returns (columns as [(name, type)], rows as lists)."""
    request = urllib.request.Request(
        f"{TRINO_URL}/v1/statement",
        data=sql.encode(),
        method="POST",
        headers={
            "X-Trino-User": "sluice",
            "X-Trino-Catalog": catalog,
            "X-Trino-Schema": SCHEMA,
            "X-Trino-Time-Zone": "UTC",
        },
    )
    deadline = time.monotonic() + timeout_s
    columns, rows = None, []
    while True:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            page = json.load(response)
        if "error" in page:
            error = page["error"]
            raise TrinoError(f"{error.get('errorName')}: {error.get('message')}")
        if columns is None and "columns" in page:
            columns = [(c["name"], c["type"]) for c in page["columns"]]
        rows.extend(page.get("data", []))
        next_uri = page.get("nextUri")
        if not next_uri:
            return columns or [], rows
        if time.monotonic() > deadline:
            raise TrinoError(f"no result within {timeout_s} s: {sql[:80]}")
        request = urllib.request.Request(next_uri, headers={"X-Trino-User": "sluice"})


def trino_cli(*args):
    """The Trino CLI, as a user runs it; returns (exit code, output)."""
    run = subprocess.run(
        TRINO_CLI + list(args), capture_output=True, text=True, timeout=300
    )
    output = "\n".join(
        line
        for line in (run.stdout + run.stderr).splitlines()
        if not re.search(r"WARNING|jline|org\.jline", line)
    )
    return run.returncode, output


# ---------------------------------------------------------------------------------------------
# sluice


def sluice(*args, check=True, env=None):
    run = subprocess.run(
        [SLUICE, *args], capture_output=True, text=True, timeout=600, env=env
    )
    if check and run.returncode != 0:
        raise Failure(f"sluice {' '.join(args)} exited {run.returncode}:\n{run.stderr[-3000:]}")
    return run


def sluice_sql(config, *, command=None, file=None, version=None, as_of=None):
    """Rows of `sluice sql` as (column names, rows as lists)."""
    args = ["sql", "--config", str(config)]
    if version is not None:
        args += ["--as-of-version", f"{TABLE}={version}"]
    if as_of is not None:
        args += ["--as-of", as_of]
    source = ["-c", command] if command is not None else ["-f", str(file)]
    header = sluice(*args, "--format", "csv", *source).stdout.splitlines()
    names = next(iter(csv_rows(header[:1])), []) if header else []
    rows = []
    for line in sluice(*args, "--format", "ndjson", *source).stdout.splitlines():
        if line.strip():
            record = json.loads(line)
            unknown = set(record) - set(names)
            if unknown:
                raise Failure(f"ndjson columns {unknown} are not in the CSV header {names}")
            rows.append([record.get(name) for name in names])
    return names, rows


def csv_rows(lines):
    return list(csv.reader(lines))


def write_config(name, schema_file, group):
    """A writer config for the shared table; `schema_file` may be an evolved copy."""
    mappings = REPO / "schemas" / "mappings"
    text = f"""
[kafka]
brokers = "{BROKERS}"
group_id = "{group}"

[storage]
root = "s3://lakehouse/warehouse"

[storage.s3]
endpoint = "{S3_ENDPOINT}"
region = "us-east-1"
allow_http = true

[batch]
max_age_ms = 1000

[maintenance]
enabled = false

[metrics]
listen = "127.0.0.1:0"

[[tables]]
schema = "{schema_file}"
sources = [
  {{ topic = "posts.mastodon", mapping = "{mappings}/mastodon.toml" }},
  {{ topic = "posts.bluesky", mapping = "{mappings}/bluesky.toml" }},
  {{ topic = "posts.tweets", mapping = "{mappings}/tweets.toml" }},
]
"""
    path = WORK / f"{name}.toml"
    path.write_text(text)
    return path


class Writer:
    """`sluice run` in the background, stopped with SIGTERM (it commits what it buffered)."""

    def __init__(self, config, label):
        self.log = open(WORK / f"writer-{label}.log", "ab")
        self.process = subprocess.Popen(
            [SLUICE, "--log-format", "json", "run", "--config", str(config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                raise Failure("the writer did not stop within 60 s of SIGTERM")
        self.log.close()
        if self.process.returncode not in (0, -signal.SIGTERM):
            raise Failure(f"the writer exited {self.process.returncode}")


def produce(*args):
    """Publishes; returns how many deletes were among the messages."""
    run = sluice("produce", "--brokers", BROKERS, "--partitions", "4", "--rate", "0", *args)
    found = re.search(r"(\d+) deletes", run.stdout)
    return int(found.group(1)) if found else 0


def landed(config):
    """Messages the tables account for: rows, dead letters, and the deletes and removed rows
    maintenance recorded (a delete not applied yet is in no table; an erasure request is no
    message)."""
    _, rows = sluice_sql(
        config,
        command=f"SELECT (SELECT count(*) FROM {TABLE}) + (SELECT count(*) FROM {DEAD}) "
        f"+ (SELECT count(*) FROM {DELETIONS} WHERE kafka_offset IS NOT NULL) AS n",
    )
    return rows[0][0]


def wait_landed(config, expected, writer):
    deadline = time.monotonic() + CATCH_UP_S
    while True:
        if writer.process.poll() is not None:
            raise Failure(f"the writer exited {writer.process.returncode}; log {writer.log.name}")
        now = landed(config)
        if now == expected:
            return
        if now > expected:
            raise Failure(f"{now} rows and dead letters, more than the {expected} produced")
        if time.monotonic() > deadline:
            raise Failure(f"only {now} of {expected} messages landed within {CATCH_UP_S} s")
        time.sleep(0.5)


def latest_version():
    _, rows = trino(f'SELECT max(version) FROM "{TABLE}$history"')
    return rows[0][0]


# ---------------------------------------------------------------------------------------------
# Comparing results cell by cell.


def parse_time(text):
    """A timestamp as either engine prints it, as an aware datetime."""
    text = text.strip().replace(" UTC", "Z").replace(" ", "T")
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    # Python before 3.11 wants exactly 3 or 6 fraction digits.
    match = re.match(r"^(.*T\d\d:\d\d:\d\d)(\.\d+)?(.*)$", text)
    base, fraction, zone = match.group(1), match.group(2) or "", match.group(3)
    if fraction:
        fraction = "." + (fraction[1:] + "000000")[:6]
    parsed = datetime.datetime.fromisoformat(base + fraction + (zone or "+00:00"))
    return parsed.astimezone(datetime.timezone.utc)


def normalise(value, trino_type, engine):
    """One cell in a form both engines' values compare in."""
    if value is None:
        return None
    if trino_type.startswith("array("):
        inner = trino_type[len("array(") : -1]
        return [normalise(item, inner, engine) for item in value]
    if trino_type.startswith("timestamp"):
        return parse_time(value)
    if trino_type == "varbinary":
        return base64.b64decode(value) if engine == "trino" else bytes.fromhex(value)
    if trino_type in ("double", "real") or trino_type.startswith("decimal"):
        return float(value)
    if trino_type in ("bigint", "integer", "smallint", "tinyint"):
        return int(value)
    return value


def same(a, b):
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return False
        if math.isnan(a) and math.isnan(b):
            return True
        return a == b or abs(a - b) <= FLOAT_TOLERANCE * max(abs(a), abs(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def compare(label, trino_result, sluice_result):
    """Raises unless both engines returned the same columns and the same rows in order."""
    columns, trino_rows = trino_result
    names, sluice_rows = sluice_result
    trino_names = [name for name, _ in columns]
    if trino_names != names:
        raise Failure(f"{label}: columns differ\n  Trino:  {trino_names}\n  sluice: {names}")
    if len(trino_rows) != len(sluice_rows):
        raise Failure(
            f"{label}: Trino returned {len(trino_rows)} rows, sluice sql {len(sluice_rows)}"
        )
    types = [kind for _, kind in columns]
    for index, (t_row, s_row) in enumerate(zip(trino_rows, sluice_rows)):
        for name, kind, t_value, s_value in zip(trino_names, types, t_row, s_row):
            left = normalise(t_value, kind, "trino")
            right = normalise(s_value, kind, "sluice")
            if not same(left, right):
                raise Failure(
                    f"{label}: row {index + 1}, column {name} ({kind}): "
                    f"Trino {t_value!r}, sluice sql {s_value!r}"
                )
    return len(trino_rows)


def statement(path):
    """The one statement of a sql/ file, without its trailing semicolon."""
    text = path.read_text()
    body = "\n".join(line for line in text.splitlines() if not line.strip().startswith("--"))
    body = body.strip()
    if body.endswith(";"):
        body = body[:-1]
    if ";" in body:
        raise Failure(f"{path.name} holds more than one statement")
    return body


# ---------------------------------------------------------------------------------------------
# The checks.


def check_registration(config):
    """The SQL `sluice trino-sql` prints registers the table and its dead letters; `sluice
    trino-sql --server` registers them too, and repeating it is not an error; a name taken by a
    table at another location is refused. In both catalogs."""
    for catalog in CATALOGS:
        if catalog == "delta":
            # A first registration as the README shows it: the printed SQL, through the CLI.
            sql_file = WORK / f"register-{catalog}.sql"
            sql_file.write_text(
                sluice("trino-sql", "--config", str(config), "--catalog", catalog).stdout
            )
            code, output = trino_cli("--file", str(sql_file))
            if code != 0:
                raise Failure(f"the printed registration failed in catalog {catalog}:\n{output}")
        outcomes = []
        for _ in ("first", "second"):
            run = sluice(
                "trino-sql", "--config", str(config), "--catalog", catalog,
                "--server", TRINO_URL,
            )
            outcomes.append(sorted(line.split(":")[0] for line in run.stdout.splitlines()))
        expected_first = ["already registered"] * 3 if catalog == "delta" else ["registered"] * 3
        if outcomes != [expected_first, ["already registered"] * 3]:
            raise Failure(f"registration through Trino ({catalog}) did {outcomes}")
        _, rows = trino(f"SHOW TABLES FROM {catalog}.{SCHEMA}", catalog=catalog)
        tables = sorted(row[0] for row in rows)
        if tables != sorted([TABLE, DEAD, DELETIONS]):
            raise Failure(f"catalog {catalog} lists {tables}")
        log(f"registered in catalog {catalog}, then again through --server twice: {outcomes}")
    elsewhere = WORK / "elsewhere.toml"
    elsewhere.write_text(config.read_text().replace("s3://lakehouse/warehouse", "s3://lakehouse/other"))
    run = sluice("trino-sql", "--config", str(elsewhere), "--server", TRINO_URL, check=False)
    if run.returncode == 0 or "is registered in Trino at s3://lakehouse/warehouse" not in run.stderr:
        raise Failure(f"a name taken at another location was not refused:\n{run.stderr}")
    log("a table name registered at another location is refused with both locations")


def check_library(config):
    """Every sql/*.sql gives the same rows in Trino (both catalogs) as in `sluice sql -f`."""
    version = latest_version()
    queries = sorted((REPO / "sql").glob("*.sql"))
    if len(queries) < 12:
        raise Failure(f"only {len(queries)} queries in sql/")
    results = []
    for path in queries:
        expected = sluice_sql(config, file=path, version=version)
        if not expected[1]:
            raise Failure(f"{path.name} returns no rows on this table: it proves nothing here")
        for catalog in CATALOGS:
            try:
                got = trino(statement(path), catalog=catalog)
            except TrinoError as error:
                raise Failure(f"{path.name} failed in Trino ({catalog}): {error}")
            rows = compare(f"{path.name} ({catalog})", got, expected)
        results.append((path.name, rows))
        log(f"sql/{path.name}: {rows} rows, equal in Trino (both catalogs) and sluice sql")
    return results


def check_time_travel(config):
    """FOR VERSION AS OF and FOR TIMESTAMP AS OF equal `sluice sql`'s time travel."""
    _, history = trino(
        f'SELECT version, CAST(timestamp AS varchar) FROM "{TABLE}$history" ORDER BY version'
    )
    versions = [row[0] for row in history]
    query = (
        "SELECT count(*) AS n, count(DISTINCT post_id) AS posts, "
        "round(sum(coalesce(toxicity, 0)), 6) AS toxicity "
        f"FROM {TABLE}"
    )
    picks = sorted({versions[1], versions[len(versions) // 2], versions[-1]})
    for version in picks:
        got = trino(f"{query} FOR VERSION AS OF {version}")
        expected = sluice_sql(config, command=query, version=version)
        compare(f"version {version}", got, expected)
    counts = []
    for version, stamp in history[1:]:
        moment = parse_time(stamp) + datetime.timedelta(milliseconds=1)
        literal = moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        got = trino(f"{query} FOR TIMESTAMP AS OF TIMESTAMP '{literal} UTC'")
        expected = sluice_sql(
            config, command=query, as_of=moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        )
        compare(f"timestamp {literal} (just after version {version})", got, expected)
        counts.append(got[1][0][0])
        if len(counts) >= 4:
            break
    log(f"time travel: versions {picks} and {len(counts)} timestamps equal in both engines")


def version_counts(config, first, last):
    """Row count of every version in first..=last, read by sluice sql."""
    counts = {}
    for version in range(first, last + 1):
        _, rows = sluice_sql(
            config, command=f"SELECT count(*) AS n FROM {TABLE}", version=version
        )
        counts[version] = rows[0][0]
    return counts


def check_reads_during_writes(config, produced):
    """Trino reads while the writer commits and a compactor rewrites: every count it returns
    is the row count of some table version, and no query fails."""
    first = latest_version()
    writer = Writer(config, "concurrent")
    more = 3000
    producer = subprocess.Popen(
        [SLUICE, "produce", "--brokers", BROKERS, "--rate", "300", "--count", str(more),
         "--embedding-dim", "16", "--bad-every", "50", "--seed", "3"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seen, errors = [], []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            for catalog in CATALOGS:
                try:
                    _, rows = trino(f"SELECT count(*) FROM {TABLE}", catalog=catalog)
                    seen.append(rows[0][0])
                except Exception as error:  # noqa: BLE001 - every failure is reported
                    errors.append(f"{catalog}: {error}")

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    compactions = 0
    try:
        while producer.poll() is None:
            run = sluice("compact", "--config", str(config), check=False)
            if run.returncode not in (0, 3):
                raise Failure(f"sluice compact exited {run.returncode}:\n{run.stderr[-2000:]}")
            compactions += 1
        if producer.returncode != 0:
            raise Failure(f"the producer exited {producer.returncode}")
        wait_landed(config, produced + more, writer)
        sluice("compact", "--config", str(config))
        compactions += 1
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        writer.stop()
    if errors:
        raise Failure(f"{len(errors)} Trino reads failed during writes, first: {errors[0]}")
    last = latest_version()
    counts = version_counts(config, first, last)
    possible = set(counts.values())
    strange = sorted(set(seen) - possible)
    if strange:
        raise Failure(
            f"Trino counted {strange}, which no version {first}..{last} has "
            f"(versions have {sorted(possible)})"
        )
    distinct = len(set(seen))
    if distinct < 3:
        raise Failure(f"the reads saw only {distinct} distinct versions: no overlap was tested")
    _, rewrites = trino(
        f'SELECT count(*) FROM "{TABLE}$history" '
        f"WHERE version > {first} AND version <= {last} AND operation = 'OPTIMIZE'"
    )
    if rewrites[0][0] < 1:
        raise Failure("no compaction rewrote files while Trino read: nothing raced")
    log(
        f"reads during writes: {len(seen)} Trino counts over versions {first}..{last} "
        f"({distinct} distinct counts; {rewrites[0][0]} compaction commits from {compactions} runs "
        "of sluice compact), each the count of a version"
    )
    return produced + more


def check_evolution_and_maintenance(produced):
    """After ADD COLUMN, a checkpoint with log cleanup and a vacuum, Trino still reads and sees
    the new column."""
    evolved = WORK / "enriched_posts_evolved.toml"
    evolved.write_text(
        (REPO / "schemas" / "enriched_posts.toml").read_text()
        + '\n[[columns]]\nname = "review_note"\ntype = "string"\n'
        'doc = "Added by the Trino suite: an additive schema change."\n'
    )
    config = write_config("evolved", evolved, "sluice-trino")
    writer = Writer(config, "evolved")
    more = 200
    try:
        produce("--count", str(more), "--embedding-dim", "16", "--seed", "4")
        wait_landed(config, produced + more, writer)
    finally:
        writer.stop()
    produced += more
    for catalog in CATALOGS:
        _, rows = trino(f"DESCRIBE {TABLE}", catalog=catalog)
        if "review_note" not in [row[0] for row in rows]:
            raise Failure(f"Trino ({catalog}) does not see the added column")
    query = f"SELECT count(*) AS n, count(review_note) AS notes FROM {TABLE}"
    compare("after ADD COLUMN", trino(query), sluice_sql(config, command=query))
    log("after ADD COLUMN: Trino lists review_note and counts as sluice sql does")

    sluice("checkpoint", "--config", str(config))
    count = f"SELECT count(*) AS n, count(DISTINCT post_id) AS posts FROM {TABLE}"
    for catalog in CATALOGS:
        compare(f"after checkpoint ({catalog})", trino(count, catalog=catalog),
                sluice_sql(config, command=count))
    log("after a checkpoint with log cleanup: Trino reads, equal counts")

    sluice("compact", "--config", str(config))
    vacuum = sluice(
        "vacuum", "--config", str(config), "--retention-hours", "0", "--allow-short-retention"
    )
    for catalog in CATALOGS:
        compare(f"after vacuum ({catalog})", trino(count, catalog=catalog),
                sluice_sql(config, command=count))
    log(f"after compaction and vacuum: Trino reads, equal counts ({vacuum.stdout.strip()[:200]})")
    return config, produced


def check_deletes_applied(config, produced, deletes):
    """`sluice apply` removes deleted posts and older versions by copy-on-write; Trino reads
    the rewritten table and the deletions table as `sluice sql` does, and the audit of what
    happened is complete."""
    if deletes == 0:
        raise Failure("the producer made no deletes: nothing tested")
    before = f"SELECT count(*) AS n, count(DISTINCT post_id) AS posts FROM {TABLE}"
    _, counted = sluice_sql(config, command=before)
    run = sluice("apply", "--config", str(config))
    landed_now = landed(config)
    if landed_now != produced:
        raise Failure(f"after apply the tables account for {landed_now} of {produced} messages")
    expected = sluice_sql(config, command=before)
    after = expected[1]
    if after[0][0] >= counted[0][0] or after[0][0] != after[0][1]:
        raise Failure(f"apply left {after} rows/posts (before: {counted}); one row per post expected")
    for catalog in CATALOGS:
        compare(f"after apply ({catalog})", trino(before, catalog=catalog), expected)
    by_operation = (
        f"SELECT operation, count(*) AS n, count(DISTINCT post_id) AS posts FROM {DELETIONS} "
        "GROUP BY operation ORDER BY operation"
    )
    rows = compare("deletions by operation", trino(by_operation), sluice_sql(config, command=by_operation))
    log(f"apply: {run.stdout.strip()}; Trino reads {after[0][0]} live posts and {rows} kinds of "
        "deletion records as sluice sql does")


def check_forget(config, produced):
    """`sluice forget --author` erases the most prolific author: Trino (both catalogs) and
    `sluice sql` read none of their rows afterwards, both read the same erasure records, and
    every message is still accounted for."""
    top = (
        f"SELECT author, count(*) AS n FROM {TABLE} WHERE author IS NOT NULL "
        "GROUP BY author ORDER BY n DESC, author LIMIT 1"
    )
    _, rows = sluice_sql(config, command=top)
    author, posts = rows[0]
    run = sluice("forget", "--config", str(config), "--author", author, "--reason", "e2e erasure")
    if f"1 erasure requests recorded; removed {posts} rows" not in run.stdout:
        raise Failure(f"forgetting {author} ({posts} rows):\n{run.stdout}")
    quoted = author.replace("'", "''")
    left = f"SELECT count(*) AS n FROM {TABLE} WHERE author = '{quoted}'"
    for catalog in CATALOGS:
        _, got = trino(left, catalog=catalog)
        if got[0][0] != 0:
            raise Failure(f"Trino ({catalog}) still reads {got[0][0]} rows of {author}")
    _, got = sluice_sql(config, command=left)
    if got[0][0] != 0:
        raise Failure(f"sluice sql still reads {got[0][0]} rows of {author}")
    records = (
        f"SELECT operation, count(*) AS n FROM {DELETIONS} WHERE reason = 'e2e erasure' "
        "GROUP BY operation ORDER BY operation"
    )
    compare("erasure records", trino(records), sluice_sql(config, command=records))
    accounted = landed(config)
    if accounted != produced:
        raise Failure(f"after forget the tables account for {accounted} of {produced} messages")
    again = sluice("forget", "--config", str(config), "--author", author, "--reason", "e2e erasure")
    if "0 erasure requests recorded (1 recorded before); removed 0 rows" not in again.stdout:
        raise Failure(f"forgetting {author} again:\n{again.stdout}")
    log(f"forget: {run.stdout.splitlines()[0]}; Trino reads no row of theirs; again: nothing")


def check_dead_letters(config):
    """The dead-letter table's payload reads as varbinary in Trino and its reasons group."""
    columns, _ = trino(f"SELECT payload FROM {DEAD} LIMIT 1")
    if columns[0][1] != "varbinary":
        raise Failure(f"Trino reads payload as {columns[0][1]}, not varbinary")
    query = (
        f"SELECT reason, count(*) AS n, sum(length(payload)) AS bytes FROM {DEAD} "
        "GROUP BY reason ORDER BY reason"
    )
    got = trino(query)
    rows = compare("dead letters by reason", got, sluice_sql(config, command=query))
    payloads = f"SELECT kafka_topic, kafka_partition, kafka_offset, payload FROM {DEAD} ORDER BY 1, 2, 3"
    compare("dead-letter payloads", trino(payloads), sluice_sql(config, command=payloads))
    log(f"dead letters: payload is varbinary, {rows} reasons group equally, payloads byte-equal")


def check_cosine(config):
    """cosine_similarity in Trino agrees with sluice sql to 1e-6 on the same pairs; a table whose
    embeddings vary in length still answers nearest_posts.sql (its length guard)."""
    # Rows are named by their Kafka position: post ids repeat across the generator's runs.
    query = f"""
WITH e AS (
  SELECT kafka_partition AS part, kafka_offset AS pos, embedding FROM {TABLE}
  WHERE kafka_topic = 'posts.tweets' AND cardinality(embedding) = 16
  ORDER BY kafka_partition, kafka_offset LIMIT 40
)
SELECT l.part AS left_part, l.pos AS left_pos, r.part AS right_part, r.pos AS right_pos,
  cosine_similarity(l.embedding, r.embedding) AS cosine
FROM e AS l CROSS JOIN e AS r
WHERE l.part < r.part OR (l.part = r.part AND l.pos < r.pos)
ORDER BY 1, 2, 3, 4"""
    columns, trino_rows = trino(query)
    names, sluice_rows = sluice_sql(config, command=query)
    if len(trino_rows) != len(sluice_rows) or len(trino_rows) < 100:
        raise Failure(f"pairs: Trino {len(trino_rows)}, sluice sql {len(sluice_rows)}")
    worst = 0.0
    for t_row, s_row in zip(trino_rows, sluice_rows):
        if t_row[:4] != s_row[:4]:
            raise Failure(f"pair order differs: {t_row[:4]} vs {s_row[:4]}")
        worst = max(worst, abs(float(t_row[4]) - float(s_row[4])))
    if worst > COSINE_TOLERANCE:
        raise Failure(f"cosine similarities differ by up to {worst}")
    _, lengths = trino(
        f"SELECT DISTINCT cardinality(embedding) FROM {TABLE} WHERE embedding IS NOT NULL"
    )
    if len(lengths) < 2:
        raise Failure(f"the table's embeddings all have one length {lengths}: nothing tested")
    log(
        f"cosine_similarity: {len(trino_rows)} pairs agree to {worst:.2e}; embeddings of lengths "
        f"{sorted(row[0] for row in lengths)} coexist"
    )


def main():
    config = write_config("sluice", REPO / "schemas" / "enriched_posts.toml", "sluice-trino")
    log("landing posts: 3,000 messages of three shapes (1 in 50 hostile), and 100 tweets whose "
        "embeddings have another length")
    writer = Writer(config, "initial")
    try:
        # In three rounds, so that time travel has versions to tell apart. The second edits,
        # redelivers and deletes posts too (1 in 20 messages).
        produced = 0
        pending = 0
        for count, args in (
            (1500, ["--embedding-dim", "16", "--bad-every", "50", "--seed", "1"]),
            (1500, ["--embedding-dim", "16", "--bad-every", "50", "--seed", "5",
                    "--operations-every", "20"]),
            (100, ["--shape", "tweets", "--embedding-dim", "8", "--seed", "2"]),
        ):
            pending += produce("--count", str(count), *args)
            produced += count
            wait_landed(config, produced - pending, writer)
    finally:
        writer.stop()
    check_registration(config)
    check_deletes_applied(config, produced, pending)
    results = check_library(config)
    check_time_travel(config)
    check_dead_letters(config)
    check_cosine(config)
    check_forget(config, produced)
    produced = check_reads_during_writes(config, produced)
    check_evolution_and_maintenance(produced)
    log("every sql/ query, equal in Trino and sluice sql:")
    for name, rows in results:
        log(f"  {name}: {rows} rows")


if __name__ == "__main__":
    try:
        main()
    except (Failure, TrinoError) as failure:
        print(f"FAILED: {failure}", file=sys.stderr, flush=True)
        sys.exit(1)
