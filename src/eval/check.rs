//! A suite question's check: how an answer is scored pass or fail.

use serde::{Deserialize, Serialize};

/// One check, written in the suite as a JSON object with one of these keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Check {
    /// The answer contains this text (case-insensitive).
    Contains { contains: String },
    /// The answer matches this regular expression (case-insensitive).
    Regex { regex: String },
    /// The last number in the answer is this one, within `tolerance` (default 1e-6, relative to
    /// the expected value's size for large values). Thousands separators are ignored.
    Number {
        number: f64,
        #[serde(default)]
        tolerance: Option<f64>,
    },
    /// Of `options`, the first one the answer names (as a whole word) is `choice`.
    Choice {
        choice: String,
        options: Vec<String>,
    },
}

impl Check {
    /// Reject a check that cannot be applied (a bad regex, a choice not among its options).
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::Regex { regex } => word_regex(regex, false).map(|_| ()),
            Self::Choice { choice, options } if !options.contains(choice) => Err(format!(
                "choice `{choice}` is not one of the options {options:?}"
            )),
            Self::Contains { contains } if contains.is_empty() => {
                Err("contains is empty".to_string())
            }
            _ => Ok(()),
        }
    }

    pub fn passes(&self, answer: &str) -> bool {
        match self {
            Self::Contains { contains } => answer.to_lowercase().contains(&contains.to_lowercase()),
            Self::Regex { regex } => word_regex(regex, false).is_ok_and(|r| r.is_match(answer)),
            Self::Number { number, tolerance } => last_number(answer).is_some_and(|x| {
                let tol = tolerance.unwrap_or(1e-6).max(number.abs() * 1e-9);
                (x - number).abs() <= tol
            }),
            Self::Choice { choice, options } => {
                let first = options
                    .iter()
                    .filter_map(|o| {
                        let r = word_regex(&regex::escape(o), true).ok()?;
                        r.find(answer).map(|m| (m.start(), o))
                    })
                    .min_by_key(|(at, o)| (*at, std::cmp::Reverse(o.len())));
                first.is_some_and(|(_, o)| o == choice)
            }
        }
    }
}

fn word_regex(pattern: &str, whole_word: bool) -> Result<regex::Regex, String> {
    let p = if whole_word {
        format!(r"(?i)\b{pattern}\b")
    } else {
        format!("(?i){pattern}")
    };
    regex::Regex::new(&p).map_err(|e| e.to_string())
}

/// The last number written in `text` (`-3`, `2.5`, `1,024`, `10.`), if any.
pub fn last_number(text: &str) -> Option<f64> {
    static NUMBER: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let re = NUMBER.get_or_init(|| {
        regex::Regex::new(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?").expect("number regex")
    });
    re.find_iter(text)
        .last()
        .and_then(|m| m.as_str().replace(',', "").parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(json: &str) -> Check {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn each_kind_parses_from_its_key() {
        assert_eq!(
            check(r#"{"contains": "Paris"}"#),
            Check::Contains {
                contains: "Paris".into()
            }
        );
        assert!(matches!(check(r#"{"regex": "a+"}"#), Check::Regex { .. }));
        assert!(matches!(
            check(r#"{"number": 10, "tolerance": 0.5}"#),
            Check::Number {
                tolerance: Some(_),
                ..
            }
        ));
        assert!(matches!(
            check(r#"{"choice": "B", "options": ["A", "B"]}"#),
            Check::Choice { .. }
        ));
    }

    #[test]
    fn contains_and_regex_ignore_case() {
        assert!(check(r#"{"contains": "paris"}"#).passes("It is Paris."));
        assert!(!check(r#"{"contains": "paris"}"#).passes("It is Lyon."));
        assert!(check(r#"{"regex": "\\bdef\\s+fib\\("}"#).passes("```python\nDEF fib(n):"));
        assert!(!check(r#"{"regex": "\\bdef\\s+fib\\("}"#).passes("fibonacci"));
    }

    #[test]
    fn number_takes_the_last_number_written() {
        let ten = check(r#"{"number": 10}"#);
        assert!(ten.passes("6^2 + 8^2 = 100, so the hypotenuse is 10 cm."));
        assert!(ten.passes("The answer is 10."));
        assert!(!ten.passes("It is 10 cm, and the area is 24."));
        assert!(!ten.passes("no numbers here"));
        assert!(check(r#"{"number": 1024}"#).passes("That makes 1,024 in all"));
        assert!(check(r#"{"number": -2.5}"#).passes("x = -2.5"));
        assert!(check(r#"{"number": 3.14, "tolerance": 0.01}"#).passes("about 3.141"));
        assert_eq!(last_number("from 3 to 7.25 then"), Some(7.25));
    }

    #[test]
    fn choice_is_the_first_option_named() {
        let c = check(r#"{"choice": "one", "options": ["one", "two", "three"]}"#);
        assert!(c.passes("Sally has one sister."));
        assert!(!c.passes("Two sisters, not one."));
        assert!(!c.passes("someone"), "whole words only");
        assert!(!c.passes("none of them"));
    }

    #[test]
    fn bad_checks_are_refused() {
        assert!(check(r#"{"regex": "("}"#).validate().is_err());
        assert!(check(r#"{"choice": "C", "options": ["A", "B"]}"#)
            .validate()
            .is_err());
        assert!(check(r#"{"contains": ""}"#).validate().is_err());
        assert!(check(r#"{"number": 1}"#).validate().is_ok());
    }
}
