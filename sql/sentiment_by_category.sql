-- Question: how do sentiment labels spread across topic categories?
-- Columns: sentiment, category (raw LLM labels folded with lower(trim())), posts.
-- Engines: runs unchanged on DataFusion (`sluice sql`) and Trino.
SELECT
  coalesce(lower(trim(sentiment)), '(none)') AS sentiment,
  coalesce(lower(trim(category)), '(none)') AS category,
  count(*) AS posts
FROM enriched_posts
GROUP BY 1, 2
ORDER BY 1, 2;
