//! Structured output on the API side: `response_format` (OpenAI), `structured_outputs` and the
//! older `guided_*` fields (vLLM) and the tool-call grammars of `tools` become one llguidance
//! grammar, compiled against the model's vocabulary off the async threads, cached by its text,
//! and handed to the engine as a per-choice [`Guide`]. A schema, regex or grammar that does not
//! compile is a 400 naming the field and the compiler's reason.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory, TokenParser};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use crate::engine::guide::Guide;
use crate::tokenizer::Tokenizer;

/// vLLM's `structured_outputs` (and the `guided_*` fields it replaced): one of these.
#[derive(Debug, Default, Deserialize)]
pub struct StructuredOutputs {
    /// A JSON schema (an object, or a string holding one).
    pub json: Option<Value>,
    pub regex: Option<String>,
    pub choice: Option<Vec<String>>,
    /// A grammar in llguidance's Lark syntax.
    pub grammar: Option<String>,
    /// Any JSON object.
    #[serde(default)]
    pub json_object: bool,
}

/// The structured-output fields of a request body, both endpoints.
#[derive(Debug, Default, Deserialize)]
pub struct StructuredParams {
    /// OpenAI's: `{"type": "text" | "json_object" | "json_schema", ...}`.
    pub response_format: Option<Value>,
    pub structured_outputs: Option<StructuredOutputs>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
}

/// A grammar a request's output must follow, and the request field it came from.
#[derive(Debug, Clone)]
pub struct Constraint {
    pub grammar: TopLevelGrammar,
    pub field: &'static str,
}

/// How JSON is spelled under a grammar: no free whitespace (a small model left to choose can
/// emit newlines forever), Python's `json.dumps` separators, as chat templates render JSON.
pub fn json_options() -> Value {
    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

/// `schema` with inferd's JSON spelling, unless it sets its own `x-guidance`. `lenient`
/// ignores keywords the compiler does not support instead of refusing the schema.
pub fn json_grammar(mut schema: Value, lenient: bool) -> TopLevelGrammar {
    if let Value::Object(m) = &mut schema {
        if !m.contains_key("x-guidance") {
            let mut opts = json_options();
            opts["lenient"] = lenient.into();
            m.insert("x-guidance".into(), opts);
        }
    }
    TopLevelGrammar::from_json_schema(schema)
}

/// A JSON schema field: an object, or a string holding one (vLLM accepts both).
fn schema_value(field: &'static str, v: Value) -> Result<Value, ApiError> {
    let v = match v {
        Value::String(s) => serde_json::from_str(&s)
            .map_err(|e| ApiError::param(field, format!("{field} is not valid JSON: {e}")))?,
        v => v,
    };
    if !(v.is_object() || v.is_boolean()) {
        return Err(ApiError::param(
            field,
            format!("{field} must be a JSON schema (an object)"),
        ));
    }
    Ok(v)
}

/// `choice`: exactly one of the strings.
fn choice_grammar(field: &'static str, choices: &[String]) -> Result<TopLevelGrammar, ApiError> {
    if choices.is_empty() {
        return Err(ApiError::param(field, format!("{field} must not be empty")));
    }
    let alts: Vec<String> = choices
        .iter()
        .map(|c| serde_json::to_string(c).unwrap_or_default())
        .collect();
    Ok(TopLevelGrammar::from_lark(format!(
        "start: {}",
        alts.join(" | ")
    )))
}

impl StructuredParams {
    /// The one constraint these fields ask for, if any; more than one is a 400.
    pub fn constraint(self) -> Result<Option<Constraint>, ApiError> {
        let mut found: Vec<Constraint> = Vec::new();
        let mut add = |field: &'static str, grammar: TopLevelGrammar| {
            found.push(Constraint { grammar, field })
        };
        if let Some(rf) = self.response_format {
            if let Some(g) = response_format(rf)? {
                add("response_format", g);
            }
        }
        if let Some(so) = self.structured_outputs {
            let mut n = 0;
            if let Some(s) = so.json {
                let s = schema_value("structured_outputs.json", s)?;
                add("structured_outputs.json", json_grammar(s, false));
                n += 1;
            }
            if let Some(r) = so.regex {
                add("structured_outputs.regex", TopLevelGrammar::from_regex(&r));
                n += 1;
            }
            if let Some(c) = so.choice {
                add(
                    "structured_outputs.choice",
                    choice_grammar("structured_outputs.choice", &c)?,
                );
                n += 1;
            }
            if let Some(g) = so.grammar {
                add("structured_outputs.grammar", TopLevelGrammar::from_lark(g));
                n += 1;
            }
            if so.json_object {
                add(
                    "structured_outputs.json_object",
                    json_grammar(json!({"type": "object"}), false),
                );
                n += 1;
            }
            if n == 0 {
                return Err(ApiError::param(
                    "structured_outputs",
                    "structured_outputs must set one of json, regex, choice, grammar, json_object",
                ));
            }
        }
        if let Some(s) = self.guided_json {
            let s = schema_value("guided_json", s)?;
            add("guided_json", json_grammar(s, false));
        }
        if let Some(r) = self.guided_regex {
            add("guided_regex", TopLevelGrammar::from_regex(&r));
        }
        if let Some(c) = self.guided_choice {
            add("guided_choice", choice_grammar("guided_choice", &c)?);
        }
        if let Some(g) = self.guided_grammar {
            add("guided_grammar", TopLevelGrammar::from_lark(g));
        }
        if found.len() > 1 {
            let fields: Vec<&str> = found.iter().map(|c| c.field).collect();
            return Err(ApiError::param(
                found[1].field,
                format!(
                    "only one output constraint per request; got {}",
                    fields.join(", ")
                ),
            ));
        }
        Ok(found.pop())
    }
}

/// OpenAI's `response_format`.
fn response_format(rf: Value) -> Result<Option<TopLevelGrammar>, ApiError> {
    const FIELD: &str = "response_format";
    let kind = rf.get("type").and_then(Value::as_str).ok_or_else(|| {
        ApiError::param(
            FIELD,
            "response_format.type must be one of text, json_object, json_schema",
        )
    })?;
    if kind != "json_schema" && rf.get("json_schema").is_some() {
        return Err(ApiError::param(
            "response_format.json_schema",
            "response_format.json_schema is only allowed when type is json_schema",
        ));
    }
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(json_grammar(json!({"type": "object"}), false))),
        "json_schema" => {
            let spec = rf.get("json_schema").ok_or_else(|| {
                ApiError::param(
                    "response_format.json_schema",
                    "response_format.json_schema is required when type is json_schema",
                )
            })?;
            if spec.get("name").and_then(Value::as_str).is_none() {
                return Err(ApiError::param(
                    "response_format.json_schema.name",
                    "response_format.json_schema.name is required",
                ));
            }
            // No schema: any JSON value (OpenAI requires one; vLLM allows none).
            let schema = match spec.get("schema") {
                Some(s) => schema_value("response_format.json_schema.schema", s.clone())?,
                None => json!({}),
            };
            Ok(Some(json_grammar(schema, false)))
        }
        other => Err(ApiError::param(
            FIELD,
            format!(
                "response_format.type must be one of text, json_object, json_schema; got `{other}`"
            ),
        )),
    }
}

/// Most compiled grammars kept per model.
const CACHE_ENTRIES: usize = 64;

/// One model's grammar compiler: its vocabulary's token trie (built on first use: it walks the
/// whole vocabulary) and the grammars compiled so far.
pub struct Grammars {
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
    factory: OnceLock<Result<ParserFactory, String>>,
    cache: Mutex<HashMap<String, TokenParser>>,
}

impl Grammars {
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize) -> Self {
        Self {
            tokenizer,
            vocab_size,
            factory: OnceLock::new(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Build the compiler now (it is built on first use otherwise).
    pub fn warm(&self) {
        if let Err(e) = self.factory() {
            tracing::warn!(error = %e, "structured output disabled");
        }
    }

    fn factory(&self) -> Result<&ParserFactory, ApiError> {
        self.factory
            .get_or_init(|| {
                let started = std::time::Instant::now();
                let env = self
                    .tokenizer
                    .tok_env(self.vocab_size)
                    .map_err(|e| e.to_string())?;
                let mut f = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
                f.set_stderr_log_level(0);
                tracing::info!(
                    ms = started.elapsed().as_millis() as u64,
                    "grammar compiler ready"
                );
                Ok(f)
            })
            .as_ref()
            .map_err(|e| ApiError::Internal(format!("structured output is unavailable: {e}")))
    }

    /// Compile `c` (or take it from the cache) into a fresh matcher. Blocking: call it from a
    /// tokenizer job.
    pub fn compile(&self, c: &Constraint) -> Result<Guide, ApiError> {
        let key =
            serde_json::to_string(&c.grammar).map_err(|e| ApiError::Internal(e.to_string()))?;
        let cached = self.cache.lock().ok().and_then(|m| m.get(&key).cloned());
        let parser = match cached {
            Some(p) => p,
            None => {
                let p = self
                    .factory()?
                    .create_parser(c.grammar.clone())
                    .map_err(|e| {
                        ApiError::param(
                            c.field,
                            format!("{} is not a valid constraint: {e}", c.field),
                        )
                    })?;
                if let Ok(mut m) = self.cache.lock() {
                    if m.len() >= CACHE_ENTRIES {
                        m.clear();
                    }
                    m.insert(key, p.clone());
                }
                p
            }
        };
        let matcher = Matcher::new(Ok(parser.deep_clone()));
        if let Some(e) = matcher.get_error() {
            return Err(ApiError::param(
                c.field,
                format!("{} is not a valid constraint: {e}", c.field),
            ));
        }
        Ok(Guide::new(matcher, c.field))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(json: &str) -> StructuredParams {
        serde_json::from_str(json).unwrap()
    }

    fn err(json: &str) -> String {
        params(json).constraint().unwrap_err().to_string()
    }

    #[test]
    fn each_field_gives_one_constraint() {
        assert!(params(r#"{"response_format": {"type": "text"}}"#)
            .constraint()
            .unwrap()
            .is_none());
        let c = params(r#"{"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}"#)
            .constraint()
            .unwrap()
            .unwrap();
        assert_eq!(c.field, "response_format");
        let c = params(r#"{"structured_outputs": {"choice": ["yes", "no"]}}"#)
            .constraint()
            .unwrap()
            .unwrap();
        assert_eq!(c.field, "structured_outputs.choice");
        let c = params(r#"{"guided_regex": "[0-9]+"}"#)
            .constraint()
            .unwrap()
            .unwrap();
        assert_eq!(c.field, "guided_regex");
    }

    #[test]
    fn malformed_fields_are_named() {
        assert_eq!(
            err(r#"{"response_format": {"type": "xml"}}"#),
            "response_format.type must be one of text, json_object, json_schema; got `xml`"
        );
        assert_eq!(
            err(r#"{"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}"#),
            "response_format.json_schema.name is required"
        );
        assert_eq!(
            err(r#"{"response_format": {"type": "json_object", "json_schema": {}}}"#),
            "response_format.json_schema is only allowed when type is json_schema"
        );
        assert_eq!(
            err(r#"{"structured_outputs": {}}"#),
            "structured_outputs must set one of json, regex, choice, grammar, json_object"
        );
        assert_eq!(
            err(r#"{"structured_outputs": {"choice": []}}"#),
            "structured_outputs.choice must not be empty"
        );
        assert_eq!(
            err(r#"{"response_format": {"type": "json_object"}, "guided_regex": "a"}"#),
            "only one output constraint per request; got response_format, guided_regex"
        );
        assert_eq!(
            err(r#"{"guided_json": "{not json"}"#)
                .split(':')
                .next()
                .unwrap(),
            "guided_json is not valid JSON"
        );
    }
}
