-- Question: which people, organisations and places are mentioned most, per entity label?
-- Columns: label (PER, ORG, LOC, MISC), entity, mentions, posts (distinct posts mentioning
--          it), avg_score (mean NER confidence), rank_in_label (1 = most mentioned).
--          The top 5 per label.
-- Engines: runs unchanged on DataFusion (`sluice sql`) and Trino. Entities are reached by
-- position (the first 32 of a post; extend `positions` if your NER returns more) because
-- DataFusion 55 cannot plan Trino's lateral `CROSS JOIN UNNEST(p.entities)`.
WITH positions AS (
  SELECT i FROM (VALUES
    (1), (2), (3), (4), (5), (6), (7), (8), (9), (10), (11), (12), (13), (14), (15), (16),
    (17), (18), (19), (20), (21), (22), (23), (24), (25), (26), (27), (28), (29), (30),
    (31), (32)
  ) AS t (i)
),
mentions AS (
  SELECT p.post_id, p.entities[positions.i] AS e
  FROM enriched_posts AS p
  JOIN positions ON positions.i <= cardinality(p.entities)
),
ranked AS (
  SELECT
    e.label AS label,
    e.text AS entity,
    count(*) AS mentions,
    count(DISTINCT post_id) AS posts,
    avg(e.score) AS avg_score,
    row_number() OVER (PARTITION BY e.label ORDER BY count(*) DESC, e.text) AS rank_in_label
  FROM mentions
  GROUP BY e.label, e.text
)
SELECT label, entity, mentions, posts, round(avg_score, 4) AS avg_score, rank_in_label
FROM ranked
WHERE rank_in_label <= 5
ORDER BY label, rank_in_label;
