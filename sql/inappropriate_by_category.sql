-- Question: in which topics does the LLM flag inappropriate language most often?
-- Columns: category, labelled (posts with an appropriateness label), inappropriate,
--          inappropriate_pct (0..100).
-- Only posts the model labelled count: upstreams without the label (Bluesky, tweets) are
-- left out rather than counted as appropriate.
-- Engines: runs unchanged on DataFusion (`sluice sql`) and Trino.
SELECT
  coalesce(category, '(none)') AS category,
  count(*) AS labelled,
  sum(CASE WHEN appropriateness = 'inappropriate' THEN 1 ELSE 0 END) AS inappropriate,
  round(
    100 * CAST(sum(CASE WHEN appropriateness = 'inappropriate' THEN 1 ELSE 0 END) AS double)
      / count(*),
    2
  ) AS inappropriate_pct
FROM enriched_posts
WHERE appropriateness IN ('appropriate', 'inappropriate')
GROUP BY coalesce(category, '(none)')
ORDER BY inappropriate_pct DESC, category;
