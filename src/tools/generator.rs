//! Generator: deterministic, realistic enriched posts in the three upstream shapes.
//!
//! Labels are as messy as real LLM output (mixed case, stray whitespace, `INAPROPRIATE`,
//! swapped letters as in `NUETRAL`, categories outside the list) so downstream canonicalization has something to do. With
//! `bad_every`, every n-th message is a hostile payload of a rotating kind (broken JSON, two
//! values, a wrong type, not an object, an out-of-range score, a bad timestamp, deep nesting).
//! With `operations_every`, every n-th message acts on a recent post of its shape instead of
//! creating one, rotating through an edit, a redelivery of the post's latest version, a delete
//! (in the shape's own delete format), and a replay of a deleted post's create after its delete.

use std::collections::{HashMap, VecDeque};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// Recent posts per shape that operations pick from.
const RECENT: usize = 64;

/// The upstream JSON shapes sluice ships mappings for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Shape {
    /// LLM-enriched Mastodon statuses.
    Mastodon,
    /// Bluesky Jetstream commit events with model enrichment.
    Bluesky,
    /// Tweets with engagement counts and an embedding.
    Tweets,
}

impl Shape {
    /// All shapes, in a fixed order.
    pub const ALL: [Shape; 3] = [Shape::Mastodon, Shape::Bluesky, Shape::Tweets];

    /// The conventional topic name for the shape.
    pub fn default_topic(self) -> &'static str {
        match self {
            Shape::Mastodon => "posts.mastodon",
            Shape::Bluesky => "posts.bluesky",
            Shape::Tweets => "posts.tweets",
        }
    }

    /// The shipped mapping file for the shape, relative to the repository root.
    pub fn mapping_file(self) -> &'static str {
        match self {
            Shape::Mastodon => "mappings/mastodon.toml",
            Shape::Bluesky => "mappings/bluesky.toml",
            Shape::Tweets => "mappings/tweets.toml",
        }
    }
}

const CATEGORIES: [&str; 8] = [
    "technology",
    "politics",
    "sports",
    "entertainment",
    "science",
    "business",
    "health",
    "climate",
];
/// Categories an LLM invents that are not in the list.
const INVENTED_CATEGORIES: [&str; 3] = ["Tech & Gadgets", "Sport", "memes"];
const SENTIMENTS: [&str; 3] = ["positive", "negative", "neutral"];
const LANGUAGES: [&str; 6] = ["en", "en", "en", "de", "es", "pt"];
/// Language values seen in the wild: upper case, regions, names, country codes, nonsense.
const MESSY_LANGUAGES: [&str; 7] = ["EN", "pt-BR", "English", "es-MX", "UA", "de_DE", "xx"];
const ENTITY_POOL: [(&str, &str); 10] = [
    ("Berlin", "LOC"),
    ("OpenAI", "ORG"),
    ("Lisbon", "LOC"),
    ("NASA", "ORG"),
    ("Taylor Swift", "PER"),
    ("Real Madrid", "ORG"),
    ("Greta Thunberg", "PER"),
    ("Mastodon", "MISC"),
    ("Nvidia", "ORG"),
    ("Tokyo", "LOC"),
];
const SUBJECTS: [&str; 8] = [
    "The new model release",
    "Tonight's match",
    "This climate report",
    "The election debate",
    "Our quarterly numbers",
    "The vaccine study",
    "That movie premiere",
    "The rocket launch",
];
const VERBS: [&str; 6] = [
    "is honestly",
    "looks",
    "was",
    "might be",
    "feels",
    "turned out",
];
const COMPLEMENTS: [&str; 8] = [
    "amazing, well done everyone",
    "a total disaster",
    "fine I guess",
    "better than expected",
    "exactly what we needed, said nobody",
    "worth watching twice",
    "a scam and you all know it",
    "interesting but overhyped",
];

/// Produces posts; the same seed gives the same posts.
pub struct Generator {
    rng: SmallRng,
    embedding_dim: usize,
    base_time_ms: i64,
    spread_days: i64,
    bad_every: Option<u64>,
    operations_every: Option<u64>,
    count: u64,
    /// Part of every post id, from the seed: runs with different seeds never reuse an id (a
    /// table with a key would take a reused id for a newer version of the post).
    run: u64,
    /// Latest version of recent posts per shape, for edits, redeliveries and deletes.
    recent: HashMap<Shape, VecDeque<Value>>,
    /// Creates of deleted posts per shape, replayed after their delete.
    deleted: HashMap<Shape, VecDeque<Value>>,
    operations: Operations,
}

/// How many operations a generator made, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Operations {
    /// Edits: a new version of a post (a row that replaces the earlier one).
    pub edits: u64,
    /// The latest version of a post delivered again.
    pub redeliveries: u64,
    /// Deletes of a post.
    pub deletes: u64,
    /// Creates of a deleted post delivered after its delete (a replay from a cursor).
    pub replays: u64,
}

impl Operations {
    /// All operations.
    pub fn total(&self) -> u64 {
        self.edits + self.redeliveries + self.deletes + self.replays
    }
}

impl Generator {
    /// A generator whose posts are created within `spread_days` before `base_time_ms`.
    pub fn new(seed: u64, embedding_dim: usize, base_time_ms: i64, spread_days: i64) -> Self {
        Generator {
            rng: SmallRng::seed_from_u64(seed),
            embedding_dim,
            base_time_ms,
            spread_days: spread_days.max(1),
            bad_every: None,
            operations_every: None,
            count: 0,
            run: seed % 1_000_000,
            recent: HashMap::new(),
            deleted: HashMap::new(),
            operations: Operations::default(),
        }
    }

    /// Makes every `n`-th message an operation on a recent post (0 disables).
    pub fn with_operations_every(mut self, n: u64) -> Self {
        self.operations_every = (n > 0).then_some(n);
        self
    }

    /// The operations made so far.
    pub fn operations(&self) -> Operations {
        self.operations
    }

    /// Makes every `n`-th message a hostile payload (0 disables).
    pub fn with_bad_every(mut self, n: u64) -> Self {
        self.bad_every = (n > 0).then_some(n);
        self
    }

    /// The next message of `shape`: its key and JSON payload.
    pub fn next(&mut self, shape: Shape) -> (String, Vec<u8>) {
        let (key, message) = self.next_value(shape);
        let payload = match message {
            Ok(value) => serde_json::to_vec(&value).expect("generated JSON serializes"),
            Err(hostile) => hostile,
        };
        (key, payload)
    }

    /// The next message of `shape`: its key and the post as a JSON value, or a hostile
    /// payload's bytes (every `bad_every`-th message).
    pub fn next_value(&mut self, shape: Shape) -> (String, Result<Value, Vec<u8>>) {
        self.count += 1;
        let seq = self.count;
        if let Some(n) = self.bad_every
            && seq.is_multiple_of(n)
        {
            return (format!("bad-{seq}"), Err(self.bad_payload(seq / n, shape)));
        }
        if let Some(n) = self.operations_every
            && seq.is_multiple_of(n)
            && let Some(operation) = self.operation(seq / n, shape)
        {
            return (message_key(shape, &operation), Ok(operation));
        }
        let created_ms =
            self.base_time_ms - self.rng.random_range(0..self.spread_days * 86_400_000);
        let (key, value) = match shape {
            Shape::Mastodon => self.mastodon(seq, created_ms),
            Shape::Bluesky => self.bluesky(seq, created_ms),
            Shape::Tweets => self.tweet(seq, created_ms),
        };
        if self.operations_every.is_some() {
            let recent = self.recent.entry(shape).or_default();
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(value.clone());
        }
        (key, Ok(value))
    }

    /// Operation `k` (kinds rotate) on a recent post of `shape`; `None` before there is one.
    fn operation(&mut self, k: u64, shape: Shape) -> Option<Value> {
        let recent = self.recent.get(&shape).filter(|r| !r.is_empty())?;
        let pick = self.rng.random_range(0..recent.len());
        match k % 4 {
            0 => {
                let edited = self.edit(shape, &self.recent[&shape][pick].clone());
                self.recent.get_mut(&shape)?[pick] = edited.clone();
                self.operations.edits += 1;
                Some(edited)
            }
            2 => {
                let post = self.recent.get_mut(&shape)?.remove(pick)?;
                let delete = delete_message(shape, &post);
                let deleted = self.deleted.entry(shape).or_default();
                if deleted.len() == RECENT {
                    deleted.pop_front();
                }
                deleted.push_back(original(shape, post));
                self.operations.deletes += 1;
                Some(delete)
            }
            3 if self.deleted.get(&shape).is_some_and(|d| !d.is_empty()) => {
                self.operations.replays += 1;
                self.deleted.get_mut(&shape)?.pop_front()
            }
            _ => {
                self.operations.redeliveries += 1;
                Some(self.recent[&shape][pick].clone())
            }
        }
    }

    /// A new version of `post`: new text, a later edit time, the shape's update marker.
    fn edit(&mut self, shape: Shape, post: &Value) -> Value {
        let mut edited = post.clone();
        let text = self.text();
        match shape {
            Shape::Mastodon => {
                edited["event"] = json!("status.update");
                edited["content"] = json!(format!("<p>{text}</p>"));
                let edits = edited["edits"].as_i64().unwrap_or(0) + 1;
                edited["edits"] = json!(edits);
            }
            Shape::Bluesky => {
                let time_us = post["time_us"].as_i64().unwrap_or_default() + 1_000_000;
                edited["time_us"] = json!(time_us);
                edited["commit"]["operation"] = json!("update");
                edited["commit"]["rev"] = json!(format!("3l{time_us:x}"));
                edited["commit"]["cid"] =
                    json!(format!("bafyrei{:020x}", self.rng.random::<u64>()));
                edited["commit"]["record"]["text"] = json!(text);
            }
            Shape::Tweets => {
                edited["text"] = json!(text);
                let edits = edited["edits"].as_i64().unwrap_or(0) + 1;
                edited["edits"] = json!(edits);
            }
        }
        edited
    }

    /// A hostile payload of kind `k % 8`, shaped for `shape` where the kind needs a field.
    fn bad_payload(&mut self, k: u64, shape: Shape) -> Vec<u8> {
        let id = match shape {
            Shape::Bluesky => {
                r#""did": "did:plc:bad", "commit": {"cid": "bad", "collection": "app.bsky.feed.post", "rkey": "bad"}"#
            }
            Shape::Mastodon | Shape::Tweets => r#""id": "bad""#,
        };
        match k % 8 {
            0 => br#"{"id": "x", "content": "unterminated"#.to_vec(),
            1 => b"<html>502 Bad Gateway</html>".to_vec(),
            2 => br#"{"id":"a"}{"id":"b"}"#.to_vec(),
            3 => br#"{"id": {"oops": 1}, "did": "did:plc:bad", "commit": {"cid": ["x"], "collection": "x", "rkey": ["x"]}, "created_at": "2025-01-01T00:00:00Z"}"#
                .to_vec(),
            4 => br#"["not", "an", "object"]"#.to_vec(),
            // A score outside [0, 1]: a model emitting logits instead of probabilities.
            5 => match shape {
                Shape::Mastodon => format!(r#"{{{id}, "favourites_count": -1}}"#),
                Shape::Bluesky => format!(r#"{{{id}, "enrichment": {{"toxicity": {{"score": 1.7}}}}}}"#),
                Shape::Tweets => format!(r#"{{{id}, "labels": {{"toxicity": 1.7}}}}"#),
            }
            .into_bytes(),
            6 => match shape {
                Shape::Bluesky => format!(r#"{{{id}, "time_us": "soon"}}"#),
                Shape::Mastodon | Shape::Tweets => format!(r#"{{{id}, "created_at": "yesterday"}}"#),
            }
            .into_bytes(),
            _ => format!(r#"{{{id}, "x": {}{}}}"#, "[".repeat(100), "]".repeat(100)).into_bytes(),
        }
    }

    fn text(&mut self) -> String {
        format!(
            "{} {} {}",
            SUBJECTS[self.rng.random_range(0..SUBJECTS.len())],
            VERBS[self.rng.random_range(0..VERBS.len())],
            COMPLEMENTS[self.rng.random_range(0..COMPLEMENTS.len())]
        )
    }

    /// A label as an LLM writes it: usually clean, sometimes shouty, padded or misspelled.
    fn messy(&mut self, label: &str) -> String {
        match self.rng.random_range(0..20) {
            0 | 1 => label.to_uppercase(),
            2 | 3 => {
                let mut s = label.to_string();
                s[..1].make_ascii_uppercase();
                s + " "
            }
            4 => {
                // A dropped letter, as in "postive".
                let mut s = label.to_string();
                s.remove(label.len() / 2);
                s
            }
            5 => {
                // Two letters swapped, shouted, as in "NUETRAL".
                let mut letters: Vec<char> = label.to_uppercase().chars().collect();
                let at = if letters[1] == letters[2] { 2 } else { 1 };
                letters.swap(at, at + 1);
                letters.into_iter().collect()
            }
            _ => label.to_string(),
        }
    }

    /// A language as models and platforms report it: mostly ISO 639-1, sometimes not.
    fn language(&mut self) -> &'static str {
        if self.rng.random_range(0..10) == 0 {
            MESSY_LANGUAGES[self.rng.random_range(0..MESSY_LANGUAGES.len())]
        } else {
            LANGUAGES[self.rng.random_range(0..LANGUAGES.len())]
        }
    }

    fn category(&mut self) -> String {
        self.category_and_topic().0
    }

    /// A category label as the LLM wrote it, and the index of the topic it is really about.
    fn category_and_topic(&mut self) -> (String, usize) {
        if self.rng.random_range(0..25) == 0 {
            let k = self.rng.random_range(0..INVENTED_CATEGORIES.len());
            (INVENTED_CATEGORIES[k].to_string(), CATEGORIES.len() + k)
        } else {
            let k = self.rng.random_range(0..CATEGORIES.len());
            (self.messy(CATEGORIES[k]), k)
        }
    }

    /// An account number and whether it is a bot. Bots are a few accounts that post often.
    fn account(&mut self) -> (u64, bool) {
        if self.rng.random_range(0..8) == 0 {
            let bot = self.rng.random_range(0..ACCOUNTS / BOT_EVERY);
            (bot * BOT_EVERY, true)
        } else {
            let account = self.rng.random_range(0..ACCOUNTS);
            (account, account.is_multiple_of(BOT_EVERY))
        }
    }

    fn sentiment(&mut self) -> String {
        let s = SENTIMENTS[self.rng.random_range(0..SENTIMENTS.len())];
        self.messy(s)
    }

    fn score(&mut self) -> f64 {
        (self.rng.random_range(0..10_000) as f64) / 10_000.0
    }

    /// A toxicity score: mostly low, but roughly one hour a day is a pile-on where scores
    /// run about twice as high, so surge detection has something to find.
    fn toxicity(&mut self, created_ms: i64) -> f64 {
        let score = self.score();
        if (created_ms / 3_600_000) % 23 == 5 {
            score.sqrt()
        } else {
            score * score
        }
    }

    fn entities(&mut self) -> Vec<Value> {
        (0..self.rng.random_range(0..4))
            .map(|_| {
                let (text, label) = ENTITY_POOL[self.rng.random_range(0..ENTITY_POOL.len())];
                json!({"text": text, "label": label, "score": 0.5 + self.score() / 2.0})
            })
            .collect()
    }

    fn author(&mut self) -> String {
        format!("user{}", self.rng.random_range(0..5_000))
    }

    fn mastodon(&mut self, seq: u64, created_ms: i64) -> (String, Value) {
        let id = format!("1{:06}{seq:011}", self.run);
        let appropriate = match self.rng.random_range(0..20) {
            0 => "INAPROPRIATE",
            1 => "inappropriate",
            2 => "Appropriate ",
            _ => "appropriate",
        };
        let sarcasm = if self.rng.random_range(0..6) == 0 {
            "Sarcastic"
        } else {
            "not sarcastic"
        };
        let instance =
            ["mastodon.social", "fosstodon.org", "hachyderm.io"][self.rng.random_range(0..3)];
        let value = json!({
            "id": id,
            "created_at": rfc3339(created_ms),
            "content": format!("<p>{}</p>", self.text()),
            "url": format!("https://{instance}/@{}/{id}", self.author()),
            "account": {"acct": format!("{}@{instance}", self.author()), "bot": false},
            "favourites_count": self.rng.random_range(0..500),
            "reblogs_count": self.rng.random_range(0..100),
            "replies_count": self.rng.random_range(0..50),
            "language": self.language(),
            "sentiment": self.sentiment(),
            "sarcasm": sarcasm,
            "category": self.category(),
            "appropriate language": appropriate,
            "model": "llama-3.1-8b-instruct",
        });
        (id, value)
    }

    fn bluesky(&mut self, seq: u64, created_ms: i64) -> (String, Value) {
        let (account, bot) = self.account();
        let did = format!(
            "did:plc:{:016x}{:08x}",
            spread(account),
            spread(!account) >> 32
        );
        let cid = format!("bafyrei{seq:012}{:08x}", self.rng.random::<u32>());
        let toxicity = self.toxicity(created_ms);
        let value = json!({
            "did": did,
            "time_us": created_ms * 1000 + self.rng.random_range(0..1000),
            "kind": "commit",
            "commit": {
                "rev": format!("3l{seq:x}"),
                "operation": "create",
                "collection": "app.bsky.feed.post",
                "rkey": format!("3k{:06}{seq:010}", self.run),
                "cid": cid,
                "record": {
                    "$type": "app.bsky.feed.post",
                    "text": self.text(),
                    "langs": [LANGUAGES[self.rng.random_range(0..LANGUAGES.len())]],
                    "createdAt": rfc3339(created_ms),
                }
            },
            "enrichment": {
                "model": "detoxify-0.5+bert-base-ner",
                "language": self.language(),
                "sentiment": {"label": self.sentiment(), "score": 0.5 + self.score() / 2.0},
                "toxicity": {"score": toxicity, "labels": {
                    "insult": toxicity * self.score(),
                    "threat": toxicity * self.score() / 4.0,
                    "obscene": toxicity * self.score(),
                    "identity_attack": toxicity * self.score() / 3.0,
                    "severe_toxicity": toxicity * toxicity,
                }},
                "entities": self.entities(),
                "bot_score": if bot { 0.75 + self.score() / 4.0 } else { self.score() * self.score() * 0.6 },
                "category": self.category(),
            }
        });
        (did, value)
    }

    fn tweet(&mut self, seq: u64, created_ms: i64) -> (String, Value) {
        let id = format!("1{:06}{seq:012}", self.run);
        let (category, topic) = self.category_and_topic();
        // Posts on one topic point the same way: a topic direction plus noise, so nearest
        // neighbours by embedding mostly share a category, as with a real sentence encoder.
        let embedding: Vec<f32> = topic_direction(topic, self.embedding_dim)
            .into_iter()
            .map(|t| 0.7 * t + 0.3 * self.rng.random_range(-1.0f32..1.0))
            .collect();
        let impressions = self.rng.random_range(10..100_000);
        let value = json!({
            "id": id,
            "text": self.text(),
            "created_at": rfc3339(created_ms),
            "author": {"username": self.author(), "verified": self.rng.random_range(0..10) == 0},
            "lang": self.language(),
            "public_metrics": {
                "like_count": impressions / self.rng.random_range(20..200),
                "retweet_count": impressions / self.rng.random_range(100..2000),
                "reply_count": impressions / self.rng.random_range(200..5000),
                "impression_count": impressions,
            },
            "labels": {
                "sentiment": self.sentiment(),
                "sentiment_score": 0.5 + self.score() / 2.0,
                "sarcasm": if self.rng.random_range(0..8) == 0 { "sarcastic" } else { "not_sarcastic" },
                "category": category,
                "toxicity": self.toxicity(created_ms),
                "model": "gpt-4o-mini",
            },
            "embedding": embedding,
        });
        (id, value)
    }
}

/// The Kafka key a message of `shape` is sent with: the post's id, or for Bluesky its author
/// (Jetstream's order is per repository), so every version of a post lands in one partition.
fn message_key(shape: Shape, message: &Value) -> String {
    let key = match shape {
        Shape::Bluesky => &message["did"],
        Shape::Mastodon if message["event"] == "delete" => &message["payload"],
        Shape::Tweets if message.get("delete").is_some() => &message["delete"]["status"]["id"],
        Shape::Mastodon | Shape::Tweets => &message["id"],
    };
    key.as_str().unwrap_or_default().to_string()
}

/// The delete of `post` in its shape's format: a Jetstream delete commit, a Mastodon streaming
/// `delete` event (the status id), an X compliance deletion notice.
fn delete_message(shape: Shape, post: &Value) -> Value {
    match shape {
        Shape::Bluesky => {
            let time_us = post["time_us"].as_i64().unwrap_or_default() + 2_000_000;
            json!({
                "did": post["did"],
                "time_us": time_us,
                "kind": "commit",
                "commit": {
                    "rev": format!("3l{time_us:x}"),
                    "operation": "delete",
                    "collection": post["commit"]["collection"],
                    "rkey": post["commit"]["rkey"],
                }
            })
        }
        Shape::Mastodon => json!({"event": "delete", "payload": post["id"]}),
        Shape::Tweets => json!({
            "delete": {"status": {"id": post["id"], "user_id": post["author"]["username"]}}
        }),
    }
}

/// The create of `post`, whatever version it is at.
fn original(shape: Shape, mut post: Value) -> Value {
    match shape {
        Shape::Bluesky => post["commit"]["operation"] = json!("create"),
        Shape::Mastodon => {
            if let Some(fields) = post.as_object_mut() {
                fields.remove("event");
            }
        }
        Shape::Tweets => {}
    }
    post
}

/// Bluesky accounts the generator posts from.
const ACCOUNTS: u64 = 2_000;
/// Every n-th account is a bot.
const BOT_EVERY: u64 = 40;

/// A well-mixed 64-bit value for `n` (splitmix64), to make ids look random but stay stable.
fn spread(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The direction in embedding space of topic `k`: fixed per topic and dimension.
fn topic_direction(k: usize, dim: usize) -> Vec<f32> {
    let mut rng = SmallRng::seed_from_u64(spread(k as u64));
    (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Milliseconds since the epoch as RFC 3339 UTC with millisecond precision.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_posts_and_bad_ones_where_asked() {
        let mut a = Generator::new(7, 8, 1_750_000_000_000, 3).with_bad_every(4);
        let mut b = Generator::new(7, 8, 1_750_000_000_000, 3).with_bad_every(4);
        for i in 1..=12u64 {
            let shape = Shape::ALL[(i % 3) as usize];
            let (ka, pa) = a.next(shape);
            let (kb, pb) = b.next(shape);
            assert_eq!((ka.clone(), pa.clone()), (kb, pb));
            let parsed = serde_json::from_slice::<Value>(&pa);
            if i % 4 == 0 {
                assert!(ka.starts_with("bad-"));
            } else {
                assert!(parsed.unwrap().is_object());
            }
        }
    }

    #[test]
    fn operations_act_on_recent_posts_in_each_shapes_own_format() {
        for shape in Shape::ALL {
            let mut g = Generator::new(3, 8, 1_750_000_000_000, 3).with_operations_every(3);
            let mut posts: HashMap<String, Value> = HashMap::new();
            let mut seen = Operations::default();
            for _ in 0..200 {
                let (key, message) = g.next_value(shape);
                let message = message.unwrap();
                let deleted = match shape {
                    Shape::Bluesky => message["commit"]["operation"] == "delete",
                    Shape::Mastodon => message["event"] == "delete",
                    Shape::Tweets => message.get("delete").is_some(),
                };
                let id = match shape {
                    Shape::Bluesky => format!("{}/{}", message["did"], message["commit"]["rkey"]),
                    Shape::Mastodon if deleted => message["payload"].to_string(),
                    Shape::Tweets if deleted => message["delete"]["status"]["id"].to_string(),
                    _ => message["id"].to_string(),
                };
                assert!(!key.is_empty(), "{message}");
                if deleted {
                    assert!(
                        posts.contains_key(&id),
                        "a delete names a post sent before: {message}"
                    );
                    seen.deletes += 1;
                } else if let Some(earlier) = posts.get(&id) {
                    if earlier == &message {
                        seen.redeliveries += 1;
                    } else if g.operations().replays > seen.replays {
                        seen.replays += 1;
                    } else {
                        seen.edits += 1;
                    }
                }
                posts.insert(id, message);
            }
            assert_eq!(seen, g.operations(), "{shape:?}");
            assert!(
                seen.edits > 0 && seen.deletes > 0 && seen.replays > 0 && seen.redeliveries > 0,
                "{seen:?}"
            );
        }
    }
}
