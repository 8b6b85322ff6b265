//! Label canonicalization: turns what an LLM wrote (`Positive `, `INAPROPRIATE`, `pt-BR`) into
//! one of a column's allowed values, or into `UNKNOWN` when no single value is a safe match.
//!
//! The steps, first match wins: the value as is; folded (case, surrounding whitespace, trailing
//! punctuation, `-`/space → `_`); an alias; the closest allowed value or alias within a small
//! edit distance (optimal string alignment: a letter added, dropped or changed, or two
//! neighbours swapped, each counts one, as models misspell), but only when exactly one target
//! is that close. Anything else is `UNKNOWN`,
//! and the caller keeps the raw label, so nothing lands silently in the wrong bucket.

use std::collections::HashMap;

use serde::Deserialize;

/// The value stored when no allowed value matches.
pub const DEFAULT_UNKNOWN: &str = "UNKNOWN";
/// Default largest edit distance for a fuzzy match.
pub const DEFAULT_MAX_EDITS: usize = 2;

/// How a raw label was turned into a stored one; counted per column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Already an allowed value, byte for byte.
    Exact,
    /// An allowed value after case, whitespace and punctuation folding.
    Folded,
    /// A configured (or built-in language) alias.
    Alias,
    /// The single closest allowed value within the edit-distance limit.
    Fuzzy,
    /// No safe match: stored as the unknown value.
    Unknown,
}

impl Outcome {
    /// Every outcome, in reporting order.
    pub const ALL: [Outcome; 5] = [
        Outcome::Exact,
        Outcome::Folded,
        Outcome::Alias,
        Outcome::Fuzzy,
        Outcome::Unknown,
    ];

    /// The label used in metrics and summaries.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Exact => "exact",
            Outcome::Folded => "folded",
            Outcome::Alias => "alias",
            Outcome::Fuzzy => "fuzzy",
            Outcome::Unknown => "unknown",
        }
    }
}

/// The `labels` entry of a column in a schema file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelSpec {
    /// Allowed values, as stored. Optional with `language = true` (defaults to ISO 639-1).
    #[serde(default)]
    pub allowed: Vec<String>,
    /// Spellings that mean an allowed value, e.g. `pos = "positive"`.
    #[serde(default)]
    pub aliases: HashMap<String, String>,
    /// Largest edit distance for a fuzzy match (also capped at a quarter of the value's length).
    #[serde(default)]
    pub max_edits: Option<usize>,
    /// Stored when nothing matches.
    #[serde(default)]
    pub unknown: Option<String>,
    /// Normalize to lower-case ISO 639-1 codes (`EN` → `en`, `pt-BR` → `pt`, `UA` → `uk`).
    #[serde(default)]
    pub language: bool,
}

/// A validated set of labels for one column.
#[derive(Debug, Clone)]
pub struct LabelSet {
    /// Allowed values as stored.
    allowed: Vec<String>,
    /// Folded spelling → allowed value (allowed values themselves and aliases).
    lookup: HashMap<String, (usize, Outcome)>,
    /// Fuzzy candidates: folded spelling and the allowed value it means.
    candidates: Vec<(String, usize)>,
    max_edits: usize,
    unknown: String,
    language: bool,
    boolean: bool,
}

impl LabelSet {
    /// Builds a label set; the error says which alias or value is wrong.
    pub fn new(spec: &LabelSpec) -> Result<Self, String> {
        let mut allowed = spec.allowed.clone();
        let mut aliases: Vec<(String, String)> = Vec::new();
        if spec.language {
            if allowed.is_empty() {
                allowed = iso_639_1_codes();
            }
            aliases.extend(language_aliases(&allowed, &spec.aliases));
        }
        if allowed.is_empty() {
            return Err("`labels` needs a non-empty `allowed` list (or `language = true`)".into());
        }
        let mut sorted: Vec<(&String, &String)> = spec.aliases.iter().collect();
        sorted.sort();
        aliases.extend(sorted.into_iter().map(|(k, v)| (k.clone(), v.clone())));

        let mut lookup = HashMap::new();
        let mut candidates = Vec::new();
        for (i, value) in allowed.iter().enumerate() {
            let folded = fold(value);
            if folded.is_empty() {
                return Err("an allowed value is empty".into());
            }
            if let Some((j, _)) = lookup.insert(folded.clone(), (i, Outcome::Folded)) {
                return Err(format!(
                    "allowed values `{}` and `{value}` fold to the same label",
                    allowed[j]
                ));
            }
            candidates.push((folded, i));
        }
        for (alias, target) in aliases {
            let Some(i) = allowed.iter().position(|a| *a == target) else {
                return Err(format!(
                    "alias `{alias}` points to `{target}`, which is not an allowed value"
                ));
            };
            let folded = fold(&alias);
            match lookup.get(&folded) {
                Some((j, _)) if *j != i => {
                    return Err(format!(
                        "alias `{alias}` means `{target}` but folds to `{}`",
                        allowed[*j]
                    ));
                }
                Some(_) => {}
                None => {
                    lookup.insert(folded.clone(), (i, Outcome::Alias));
                    candidates.push((folded, i));
                }
            }
        }
        Ok(LabelSet {
            allowed,
            lookup,
            candidates,
            max_edits: spec.max_edits.unwrap_or(DEFAULT_MAX_EDITS),
            unknown: spec
                .unknown
                .clone()
                .unwrap_or_else(|| DEFAULT_UNKNOWN.into()),
            language: spec.language,
            boolean: false,
        })
    }

    /// A label set for a boolean column: `true`/`false`, the usual spellings of yes and no,
    /// plus the spec's aliases (e.g. `sarcastic = "true"`). No match stores null.
    pub fn boolean(spec: &LabelSpec) -> Result<Self, String> {
        if !spec.allowed.is_empty() || spec.language || spec.unknown.is_some() {
            return Err(
                "a boolean column's labels take only `aliases` (to \"true\" or \"false\") and \
                 `max_edits`"
                    .into(),
            );
        }
        let mut aliases: HashMap<String, String> = [
            ("yes", "true"),
            ("y", "true"),
            ("1", "true"),
            ("t", "true"),
            ("no", "false"),
            ("n", "false"),
            ("0", "false"),
            ("f", "false"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        aliases.extend(spec.aliases.clone());
        let mut set = LabelSet::new(&LabelSpec {
            allowed: vec!["true".into(), "false".into()],
            aliases,
            max_edits: spec.max_edits,
            unknown: None,
            language: false,
        })?;
        set.boolean = true;
        Ok(set)
    }

    /// Whether this set fills a boolean column (unknown labels store null).
    pub fn is_boolean(&self) -> bool {
        self.boolean
    }

    /// The stored value for a raw label, and how it was found.
    pub fn canonicalize(&self, raw: &str) -> (&str, Outcome) {
        if let Some(value) = self.allowed.iter().find(|a| a.as_str() == raw) {
            return (value, Outcome::Exact);
        }
        let folded = fold(raw);
        if let Some(&(i, outcome)) = self.lookup.get(&folded) {
            return (&self.allowed[i], outcome);
        }
        if self.language {
            // A region or script subtag: `pt_br`, `zh_hant`.
            if let Some((primary, _)) = folded.split_once('_')
                && let Some(&(i, _)) = self.lookup.get(primary)
            {
                return (&self.allowed[i], Outcome::Alias);
            }
        }
        match self.closest(&folded) {
            Some(i) => (&self.allowed[i], Outcome::Fuzzy),
            None => (&self.unknown, Outcome::Unknown),
        }
    }

    /// The allowed value whose spellings are uniquely closest to `folded`, if within limits.
    fn closest(&self, folded: &str) -> Option<usize> {
        let mut best: Option<(usize, usize)> = None; // (distance, allowed index)
        let mut tied = false;
        // Lengths first: a label far longer than every spelling (a model that returned a
        // paragraph) is counted once, never copied per candidate.
        let length = folded.chars().count();
        for (spelling, i) in &self.candidates {
            let spelling_length = spelling.chars().count();
            let limit = self.max_edits.min(spelling_length / 4);
            if limit == 0 || length.abs_diff(spelling_length) > limit {
                continue;
            }
            let d = strsim::osa_distance(folded, spelling);
            if d > limit {
                continue;
            }
            match best {
                Some((bd, bi)) if d == bd && bi != *i => tied = true,
                Some((bd, _)) if d < bd => {
                    best = Some((d, *i));
                    tied = false;
                }
                None => best = Some((d, *i)),
                _ => {}
            }
        }
        if tied { None } else { best.map(|(_, i)| i) }
    }
}

/// Case, whitespace and punctuation folding: `" Not Sarcastic!"` → `not_sarcastic`.
pub fn fold(raw: &str) -> String {
    let trimmed = raw
        .trim_matches(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`'))
        .trim_end_matches(|c: char| c.is_whitespace() || matches!(c, '.' | ',' | ';' | ':' | '!'));
    let mut out = String::with_capacity(trimmed.len());
    let mut gap = false;
    for c in trimmed.chars() {
        if c.is_whitespace() || c == '-' || c == '_' {
            gap = true;
            continue;
        }
        if gap && !out.is_empty() {
            out.push('_');
        }
        gap = false;
        out.extend(c.to_lowercase());
    }
    out
}

/// Spellings of ISO 639-1 codes that `isolang` does not know, beside its 639-3 codes, English
/// names and autonyms: country codes sent as language codes (only those that are no language
/// code themselves), withdrawn 639-1 codes, ISO 639-2/B codes, the macrolanguage member models
/// name most, and the everyday names of languages whose ISO name is longer.
const LANGUAGE_ALIASES: &[(&str, &str)] = &[
    // Country codes.
    ("ua", "uk"),
    ("jp", "ja"),
    ("cn", "zh"),
    ("gr", "el"),
    ("dk", "da"),
    ("cz", "cs"),
    ("il", "he"),
    ("vn", "vi"),
    ("ir", "fa"),
    ("kz", "kk"),
    ("rs", "sr"),
    ("al", "sq"),
    // Withdrawn ISO 639-1 codes.
    ("iw", "he"),
    ("in", "id"),
    ("ji", "yi"),
    ("jw", "jv"),
    ("mo", "ro"),
    // ISO 639-2/B (bibliographic) codes that differ from 639-3.
    ("fre", "fr"),
    ("ger", "de"),
    ("dut", "nl"),
    ("chi", "zh"),
    ("cze", "cs"),
    ("gre", "el"),
    ("per", "fa"),
    ("rum", "ro"),
    // Mandarin, a member of the Chinese macrolanguage.
    ("cmn", "zh"),
    ("mandarin", "zh"),
    // Everyday names.
    ("greek", "el"),
    ("farsi", "fa"),
];

/// Every ISO 639-1 code `isolang` lists, the default allowed values of a language column.
fn iso_639_1_codes() -> Vec<String> {
    let mut codes: Vec<String> = isolang::languages()
        .filter_map(|language| language.to_639_1())
        .map(String::from)
        .collect();
    codes.sort();
    codes
}

/// The spellings that mean each allowed language code: its ISO 639-3 code, English name and
/// autonym (from `isolang`), then [`LANGUAGE_ALIASES`]. A spelling that would mean two allowed
/// codes (`isiNdebele` names both `nd` and `nr`) or that the schema's own aliases use is left
/// out, so it stays the schema's to decide.
fn language_aliases(allowed: &[String], own: &HashMap<String, String>) -> Vec<(String, String)> {
    let mut meaning: HashMap<String, Option<String>> = HashMap::new();
    let mut order = Vec::new();
    let mut add = |spelling: &str, code: &str| {
        let folded = fold(spelling);
        match meaning.get_mut(&folded) {
            Some(seen) if seen.as_deref() != Some(code) => *seen = None,
            Some(_) => {}
            None => {
                meaning.insert(folded.clone(), Some(code.to_string()));
                order.push((folded, spelling.to_string()));
            }
        }
    };
    for code in allowed {
        if let Some(language) = isolang::Language::from_639_1(code) {
            add(language.to_639_3(), code);
            add(language.to_name(), code);
            if let Some(autonym) = language.to_autonym() {
                add(autonym, code);
            }
        }
    }
    for (spelling, code) in LANGUAGE_ALIASES {
        if allowed.iter().any(|a| a == code) {
            add(spelling, code);
        }
    }
    let own: Vec<String> = own.keys().map(|k| fold(k)).collect();
    order
        .into_iter()
        .filter(|(folded, _)| !own.contains(folded))
        .filter_map(|(folded, spelling)| Some((spelling, meaning[&folded].clone()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(allowed: &[&str], aliases: &[(&str, &str)]) -> LabelSet {
        LabelSet::new(&LabelSpec {
            allowed: allowed.iter().map(|s| s.to_string()).collect(),
            aliases: aliases
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..LabelSpec::default()
        })
        .unwrap()
    }

    fn check(labels: &LabelSet, cases: &[(&str, &str, Outcome)]) {
        for (raw, value, outcome) in cases {
            assert_eq!(
                labels.canonicalize(raw),
                (*value, *outcome),
                "raw label {raw:?}"
            );
        }
    }

    #[test]
    fn llm_spellings_of_sentiment_become_allowed_values() {
        let s = set(
            &["positive", "negative", "neutral", "mixed"],
            &[("pos", "positive"), ("neg", "negative"), ("neu", "neutral")],
        );
        use Outcome::*;
        check(
            &s,
            &[
                ("positive", "positive", Exact),
                ("Positive ", "positive", Folded),
                ("POSITIVE", "positive", Folded),
                ("  negative.", "negative", Folded),
                ("\"Neutral\"", "neutral", Folded),
                ("Neutral!", "neutral", Folded),
                ("NEG", "negative", Alias),
                ("postive", "positive", Fuzzy),
                ("Positve", "positive", Fuzzy),
                ("negatve", "negative", Fuzzy),
                ("neutrall", "neutral", Fuzzy),
                ("NUETRAL", "neutral", Fuzzy),
                ("negaitve", "negative", Fuzzy),
                ("happy", "UNKNOWN", Unknown),
                ("", "UNKNOWN", Unknown),
                ("very positive", "UNKNOWN", Unknown),
            ],
        );
    }

    #[test]
    fn appropriateness_misspellings_pick_the_single_closest_value() {
        let s = set(&["appropriate", "inappropriate"], &[]);
        use Outcome::*;
        check(
            &s,
            &[
                ("INAPROPRIATE", "inappropriate", Fuzzy),
                ("Appropriate ", "appropriate", Folded),
                ("inapropriate", "inappropriate", Fuzzy),
                ("apropriate", "appropriate", Fuzzy),
                ("in-appropriate", "inappropriate", Fuzzy),
            ],
        );
    }

    #[test]
    fn ambiguous_or_distant_labels_become_unknown() {
        // "aatch" is one edit from both values: no single closest value.
        let s = set(&["batch", "catch"], &[]);
        assert_eq!(s.canonicalize("aatch"), ("UNKNOWN", Outcome::Unknown));
        assert_eq!(s.canonicalize("bbtch").0, "batch");
        // Short values never match fuzzily: "sad" is not "mad".
        let s = set(&["mad", "glad"], &[]);
        assert_eq!(s.canonicalize("sad"), ("UNKNOWN", Outcome::Unknown));
        // Categories the LLM invented stay out of the real buckets.
        let s = set(&["politics", "sports", "technology", "entertainment"], &[]);
        for invented in ["crypto", "vibes", "sport news", "politics and sports"] {
            assert_eq!(
                s.canonicalize(invented),
                ("UNKNOWN", Outcome::Unknown),
                "{invented}"
            );
        }
        assert_eq!(s.canonicalize("Sport"), ("sports", Outcome::Fuzzy));
        assert_eq!(s.canonicalize("Technolgy"), ("technology", Outcome::Fuzzy));
    }

    #[test]
    fn two_word_labels_fold_spaces_and_hyphens() {
        let s = set(&["sarcastic", "not_sarcastic"], &[]);
        use Outcome::*;
        check(
            &s,
            &[
                ("not sarcastic", "not_sarcastic", Folded),
                ("Not-Sarcastic", "not_sarcastic", Folded),
                ("NOT  SARCASTIC.", "not_sarcastic", Folded),
                ("Sarcastic", "sarcastic", Folded),
                ("not sarcstic", "not_sarcastic", Fuzzy),
            ],
        );
    }

    #[test]
    fn languages_normalize_to_iso_639_1() {
        let s = LabelSet::new(&LabelSpec {
            language: true,
            ..LabelSpec::default()
        })
        .unwrap();
        use Outcome::*;
        check(
            &s,
            &[
                ("en", "en", Exact),
                ("EN", "en", Folded),
                ("pt-BR", "pt", Alias),
                ("zh_Hant", "zh", Alias),
                ("UA", "uk", Alias),
                ("jp", "ja", Alias),
                ("iw", "he", Alias),
                ("eng", "en", Alias),
                ("English", "en", Alias),
                ("Deutsch", "de", Alias),
                ("español", "es", Alias),
                ("Ελληνικά", "el", Alias),
                ("Greek", "el", Alias),
                ("Modern Greek", "el", Alias),
                ("fre", "fr", Alias),
                ("ukr", "uk", Alias),
                ("swa", "sw", Alias),
                ("Swahili", "sw", Alias),
                ("Yoruba", "yo", Alias),
                ("Tagalog", "tl", Alias),
                ("isiNdebele", "UNKNOWN", Unknown),
                ("Portugese", "pt", Fuzzy),
                ("xx", "UNKNOWN", Unknown),
                ("und", "UNKNOWN", Unknown),
            ],
        );
    }

    #[test]
    fn a_schemas_own_language_alias_wins_over_the_iso_spelling() {
        // isolang gives `Norsk` as the autonym of `no`; this schema means Bokmål by it.
        let s = LabelSet::new(&LabelSpec {
            allowed: vec!["en".into(), "nb".into(), "no".into()],
            aliases: [("norsk".to_string(), "nb".to_string())].into(),
            language: true,
            ..LabelSpec::default()
        })
        .unwrap();
        use Outcome::*;
        check(
            &s,
            &[
                ("Norsk", "nb", Alias),
                ("nor", "no", Alias),
                ("Norwegian Bokmål", "nb", Alias),
                ("spa", "UNKNOWN", Unknown),
            ],
        );
    }

    #[test]
    fn bad_label_specs_are_explained() {
        let err = LabelSet::new(&LabelSpec {
            allowed: vec!["positive".into()],
            aliases: [("good".to_string(), "great".to_string())].into(),
            ..LabelSpec::default()
        })
        .unwrap_err();
        assert!(err.contains("alias `good` points to `great`"), "{err}");
        let err = LabelSet::new(&LabelSpec {
            allowed: vec!["Positive".into(), "positive".into()],
            ..LabelSpec::default()
        })
        .unwrap_err();
        assert!(err.contains("fold to the same label"), "{err}");
        assert!(LabelSet::new(&LabelSpec::default()).is_err());
    }

    /// `label` with the letters at `at` and `at + 1` swapped, or `None` when they are equal.
    fn swapped(label: &str, at: usize) -> Option<String> {
        let mut chars: Vec<char> = label.chars().collect();
        (chars[at] != chars[at + 1]).then(|| {
            chars.swap(at, at + 1);
            chars.into_iter().collect()
        })
    }

    #[test]
    fn swapped_letters_in_every_label_column_of_the_flagship_schema_land_canonical() {
        let schema = crate::contract::schema::TableSchema::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/schemas/enriched_posts.toml"
        )))
        .unwrap();
        let mut columns = 0;
        let mut checked = 0;
        for column in &schema.columns {
            let Some(labels) = &column.labels else {
                continue;
            };
            columns += 1;
            // The language column allows ISO codes, too short to misspell; its names are
            // aliases, and models swap their letters as well.
            let targets: Vec<(String, &str)> = if column.name == "language" {
                [
                    ("english", "en"),
                    ("spanish", "es"),
                    ("portuguese", "pt"),
                    ("german", "de"),
                ]
                .map(|(name, code)| (name.to_string(), code))
                .to_vec()
            } else {
                labels
                    .allowed
                    .iter()
                    .map(|a| (a.clone(), a.as_str()))
                    .collect()
            };
            for (label, canonical) in &targets {
                // Values under four letters never match fuzzily (see `closest`).
                if label.chars().count() < 4 {
                    continue;
                }
                for at in 0..label.chars().count() - 1 {
                    let Some(typo) = swapped(label, at) else {
                        continue;
                    };
                    for raw in [typo.clone(), typo.to_uppercase()] {
                        assert_eq!(
                            labels.canonicalize(&raw),
                            (*canonical, Outcome::Fuzzy),
                            "{}: {raw:?}",
                            column.name
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(
            columns, 5,
            "sentiment, language, sarcasm, category, appropriateness"
        );
        assert!(checked > 200, "{checked}");
    }

    #[test]
    fn boolean_labels_take_yes_no_and_aliases() {
        let s = LabelSet::boolean(&LabelSpec {
            aliases: [
                ("sarcastic".to_string(), "true".to_string()),
                ("not_sarcastic".to_string(), "false".to_string()),
            ]
            .into(),
            ..LabelSpec::default()
        })
        .unwrap();
        assert!(s.is_boolean());
        use Outcome::*;
        check(
            &s,
            &[
                ("true", "true", Exact),
                ("TRUE", "true", Folded),
                ("Yes", "true", Alias),
                ("not sarcastic", "false", Alias),
                ("Sarcastic!", "true", Alias),
                ("maybe", "UNKNOWN", Unknown),
            ],
        );
        assert!(
            LabelSet::boolean(&LabelSpec {
                allowed: vec!["x".into()],
                ..LabelSpec::default()
            })
            .is_err()
        );
    }
}
