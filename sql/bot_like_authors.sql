-- Question: which accounts look automated: a high bot score, sustained over many posts?
-- Columns: author, posts, avg_bot_score, min_bot_score, active_days, posts_per_day.
--          Accounts with at least 5 scored posts and a mean bot score of 0.7 or more,
--          most bot-like first; the top 20.
-- Engines: runs unchanged on DataFusion (`sluice sql`) and Trino.
SELECT
  author,
  count(*) AS posts,
  round(avg(bot_score), 4) AS avg_bot_score,
  round(min(bot_score), 4) AS min_bot_score,
  count(DISTINCT event_date) AS active_days,
  round(CAST(count(*) AS double) / count(DISTINCT event_date), 2) AS posts_per_day
FROM enriched_posts
WHERE bot_score IS NOT NULL AND author IS NOT NULL
GROUP BY author
HAVING count(*) >= 5 AND avg(bot_score) >= 0.7
ORDER BY avg_bot_score DESC, posts DESC, author
LIMIT 20;
