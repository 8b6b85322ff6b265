-- Question: in which hours did toxicity surge above its recent level?
-- Columns: hour_start (UTC), posts (with a toxicity score), toxic_posts (score >= 0.5),
--          avg_toxicity, trailing_avg (mean of the 24 hours before), ratio
--          (avg_toxicity / trailing_avg). Only hours at least 1.5 times their trailing
--          average are listed; hours without 24 hours of history are not judged.
-- Engines: runs unchanged on DataFusion (`sluice sql`) and Trino.
WITH hourly AS (
  SELECT
    date_trunc('hour', created_at) AS hour_start,
    count(*) AS posts,
    sum(CASE WHEN toxicity >= 0.5 THEN 1 ELSE 0 END) AS toxic_posts,
    avg(toxicity) AS avg_toxicity
  FROM enriched_posts
  WHERE toxicity IS NOT NULL
  GROUP BY date_trunc('hour', created_at)
),
trend AS (
  SELECT
    hour_start,
    posts,
    toxic_posts,
    avg_toxicity,
    avg(avg_toxicity) OVER (ORDER BY hour_start ROWS BETWEEN 24 PRECEDING AND 1 PRECEDING)
      AS trailing_avg,
    count(*) OVER (ORDER BY hour_start ROWS BETWEEN 24 PRECEDING AND 1 PRECEDING)
      AS history_hours
  FROM hourly
)
SELECT
  hour_start,
  posts,
  toxic_posts,
  round(avg_toxicity, 4) AS avg_toxicity,
  round(trailing_avg, 4) AS trailing_avg,
  round(avg_toxicity / trailing_avg, 2) AS ratio
FROM trend
WHERE history_hours = 24
  AND trailing_avg > 0
  AND avg_toxicity >= 1.5 * trailing_avg
ORDER BY hour_start;
