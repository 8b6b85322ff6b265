-- Question: what did upstream deletes, edits and erasure requests take out of the table, per day?
-- Columns: day (UTC day of the Kafka timestamp of the message each record accounts for),
--          operation (delete: delete messages; deleted: rows their deletes removed; replaced:
--          older versions and redeliveries a newer row replaced; forgotten, forgotten dead
--          letter: what `sluice forget` removed), records, posts (distinct posts),
--          platforms. Erasure requests themselves have no Kafka position and are left out.
-- Engines: runs unchanged on DataFusion (`sluice sql`) and Trino.
SELECT
  CAST(kafka_timestamp AS DATE) AS day,
  operation,
  count(*) AS records,
  count(DISTINCT post_id) AS posts,
  count(DISTINCT platform) AS platforms
FROM enriched_posts_deletions
WHERE kafka_timestamp IS NOT NULL
GROUP BY CAST(kafka_timestamp AS DATE), operation
ORDER BY day, operation;
