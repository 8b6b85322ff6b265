-- Question: which posts drew the most engagement, and how well did they convert views?
-- Columns: post_id, platform, author, text (first 60 characters), likes, reposts, replies,
--          engagements (their sum), impressions (tweets only), engagement_rate
--          (engagements / impressions, where impressions are known). The top 10.
-- Engines: runs unchanged on DataFusion (`sluice sql`) and Trino.
SELECT
  post_id,
  platform,
  author,
  substr(text, 1, 60) AS text,
  coalesce(like_count, 0) AS likes,
  coalesce(repost_count, 0) AS reposts,
  coalesce(reply_count, 0) AS replies,
  coalesce(like_count, 0) + coalesce(repost_count, 0) + coalesce(reply_count, 0) AS engagements,
  impression_count AS impressions,
  CASE
    WHEN impression_count > 0 THEN round(
      CAST(coalesce(like_count, 0) + coalesce(repost_count, 0) + coalesce(reply_count, 0) AS double)
        / impression_count,
      4
    )
  END AS engagement_rate
FROM enriched_posts
ORDER BY engagements DESC, post_id
LIMIT 10;
