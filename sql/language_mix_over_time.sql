-- Question: how does the language mix change from day to day?
-- Columns: event_date (UTC day the post was created), language (ISO 639-1; UNKNOWN when
--          unrecognised), posts, share_of_day (0..1).
-- Engines: runs unchanged on DataFusion (`sluice sql`) and Trino. The date partition column
-- keeps this cheap on both: each day is read from its own folder.
SELECT
  event_date,
  coalesce(language, '(none)') AS language,
  count(*) AS posts,
  round(CAST(count(*) AS double) / sum(count(*)) OVER (PARTITION BY event_date), 4)
    AS share_of_day
FROM enriched_posts
GROUP BY event_date, coalesce(language, '(none)')
ORDER BY event_date, posts DESC, language;
