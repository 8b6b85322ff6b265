-- Question: where is sarcasm most common, by topic and language?
-- Columns: category, language (ISO 639-1), labelled (posts with a sarcasm label),
--          sarcastic, sarcasm_pct (0..100). Groups with fewer than 20 labelled posts are
--          left out: their rates are noise.
-- Engines: runs unchanged on DataFusion (`sluice sql`) and Trino.
SELECT
  coalesce(category, '(none)') AS category,
  coalesce(language, '(none)') AS language,
  count(*) AS labelled,
  sum(CASE WHEN sarcasm = 'sarcastic' THEN 1 ELSE 0 END) AS sarcastic,
  round(100 * CAST(sum(CASE WHEN sarcasm = 'sarcastic' THEN 1 ELSE 0 END) AS double) / count(*), 2)
    AS sarcasm_pct
FROM enriched_posts
WHERE sarcasm IN ('sarcastic', 'not_sarcastic')
GROUP BY coalesce(category, '(none)'), coalesce(language, '(none)')
HAVING count(*) >= 20
ORDER BY sarcasm_pct DESC, category, language;
