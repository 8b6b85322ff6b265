-- Question: which posts are closest in meaning to a given post?
-- Columns: post_id, category, text (first 60 characters), similarity (cosine similarity of
--          the embeddings, -1..1). The 10 nearest.
-- The anchor is the first post with an embedding; to start from your own post, replace the
-- anchor's WHERE clause with `WHERE post_id = '...'`. Only embeddings of the anchor's length
-- are compared: both engines fail the whole query on vectors of different lengths, and a
-- table fed by two models (or with `dimension` unset in its schema) holds several lengths.
-- Engines: runs unchanged on DataFusion (`sluice sql`, which ships Trino's vector functions)
-- and Trino.
WITH anchor AS (
  SELECT post_id, embedding
  FROM enriched_posts
  WHERE embedding IS NOT NULL
  ORDER BY post_id
  LIMIT 1
)
SELECT
  p.post_id,
  p.category,
  substr(p.text, 1, 60) AS text,
  round(cosine_similarity(p.embedding, a.embedding), 4) AS similarity
FROM enriched_posts AS p
CROSS JOIN anchor AS a
WHERE p.embedding IS NOT NULL
  AND cardinality(p.embedding) = cardinality(a.embedding)
  AND p.post_id <> a.post_id
ORDER BY similarity DESC, p.post_id
LIMIT 10;
