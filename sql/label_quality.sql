-- Question: how clean are each model's labels? Share fixed by sluice and share unusable.
-- Columns: model_version, posts, then per label column (sentiment, category): fixed
--          (the raw label was repaired to an allowed value: case, spacing, alias,
--          misspelling) and unknown (no allowed value was close: stored as UNKNOWN), as
--          percentages (0..100) of the posts.
-- Engines: runs unchanged on DataFusion (`sluice sql`) and Trino.
SELECT
  coalesce(model_version, '(none)') AS model_version,
  count(*) AS posts,
  round(100 * CAST(sum(CASE WHEN sentiment_raw IS NOT NULL AND sentiment <> 'UNKNOWN' THEN 1 ELSE 0 END) AS double) / count(*), 2)
    AS sentiment_fixed_pct,
  round(100 * CAST(sum(CASE WHEN sentiment = 'UNKNOWN' THEN 1 ELSE 0 END) AS double) / count(*), 2)
    AS sentiment_unknown_pct,
  round(100 * CAST(sum(CASE WHEN category_raw IS NOT NULL AND category <> 'UNKNOWN' THEN 1 ELSE 0 END) AS double) / count(*), 2)
    AS category_fixed_pct,
  round(100 * CAST(sum(CASE WHEN category = 'UNKNOWN' THEN 1 ELSE 0 END) AS double) / count(*), 2)
    AS category_unknown_pct
FROM enriched_posts
GROUP BY coalesce(model_version, '(none)')
ORDER BY posts DESC, model_version;
