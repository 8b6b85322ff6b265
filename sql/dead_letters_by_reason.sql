-- Question: what broke upstream, and when? Dead letters per day and reason.
-- Columns: event_date (UTC day of the message's Kafka timestamp), reason (sluice's reason
--          code, see schemas/README.md), dead_letters, payload_bytes, topics (how many
--          topics sent such messages).
-- Engines: runs unchanged on DataFusion (`sluice sql`) and Trino.
SELECT
  event_date,
  reason,
  count(*) AS dead_letters,
  sum(payload_bytes) AS payload_bytes,
  count(DISTINCT kafka_topic) AS topics
FROM enriched_posts_dead_letters
GROUP BY event_date, reason
ORDER BY event_date, reason;
