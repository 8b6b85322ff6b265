-- Question: how are sentiment labels distributed, and how confident was the model?
-- Columns: sentiment (canonical label; UNKNOWN when the model's label was not recognised,
--          (none) when the post had none), posts, share (of all posts, 0..1),
--          avg_score (mean sentiment_score, where the upstream sends one).
-- Engines: runs unchanged on DataFusion (`sluice sql`) and Trino.
SELECT
  coalesce(sentiment, '(none)') AS sentiment,
  count(*) AS posts,
  round(CAST(count(*) AS double) / sum(count(*)) OVER (), 4) AS share,
  round(avg(sentiment_score), 4) AS avg_score
FROM enriched_posts
GROUP BY coalesce(sentiment, '(none)')
ORDER BY posts DESC, sentiment;
