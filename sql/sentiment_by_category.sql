-- Question: which topics draw negative posts, and which positive ones?
-- Columns: category (canonical; UNKNOWN when the LLM invented one), posts, then posts per
--          sentiment label, and negative_share (negative posts / posts, 0..1).
-- Engines: runs unchanged on DataFusion (`sluice sql`) and Trino.
SELECT
  coalesce(category, '(none)') AS category,
  count(*) AS posts,
  sum(CASE WHEN sentiment = 'positive' THEN 1 ELSE 0 END) AS positive,
  sum(CASE WHEN sentiment = 'neutral' THEN 1 ELSE 0 END) AS neutral,
  sum(CASE WHEN sentiment = 'negative' THEN 1 ELSE 0 END) AS negative,
  sum(CASE WHEN sentiment = 'mixed' THEN 1 ELSE 0 END) AS mixed,
  sum(CASE WHEN sentiment = 'UNKNOWN' OR sentiment IS NULL THEN 1 ELSE 0 END) AS unlabelled,
  round(CAST(sum(CASE WHEN sentiment = 'negative' THEN 1 ELSE 0 END) AS double) / count(*), 4)
    AS negative_share
FROM enriched_posts
GROUP BY coalesce(category, '(none)')
ORDER BY negative_share DESC, category;
