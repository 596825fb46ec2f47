//! Tool calling: `tools`, `tool_choice` and `parallel_tool_calls` checked into a [`ToolPlan`];
//! the grammar that keeps every call the model starts valid, in the model's own format; the
//! messages laid out as that format's template expects them. [`ToolCallParser`] (`parser`)
//! turns the model's text back into content and `tool_calls`.
//!
//! Formats: `hermes` (Qwen2 / Qwen2.5: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`,
//! one block per call), `llama3_json` (Llama 3.1 / 3.2: `{"name": ..., "parameters": {...}}`,
//! optionally after `<|python_tag|>`, one call per turn: Meta's template refuses more), `glm4`
//! (`name\n{arguments}`; the tools on a system item for glm-4-9b-chat and its `-hf` twin, in the
//! template's `tools` for GLM-4-0414) and `generic` (a JSON envelope, for templates with no tool
//! format).

use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::structured::{json_options, Constraint};
use crate::tokenizer::chat_template::python_json;
use crate::tokenizer::ChatMessage;
use llguidance::api::TopLevelGrammar;

mod parser;
pub use parser::{ToolCallParser, ToolDelta};

/// The tool fields of a chat request.
#[derive(Debug, Default, Deserialize)]
pub struct ToolParams {
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
}

/// How a model writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>` (Qwen2, Qwen2.5, Hermes).
    Hermes,
    /// `{"name": ..., "parameters": ...}`, after `<|python_tag|>` (its id, when the
    /// vocabulary has it) or not (Llama 3.1, 3.2).
    Llama3Json { python_tag: Option<u32> },
    /// GLM-4: a call is `name\n{arguments}` after `<|assistant|>` (the name in the item's
    /// `metadata`), a result is an `observation` turn. `tools_on_item`: glm-4-9b-chat and
    /// glm-4-9b-chat-hf read the tools from a system item (the layout THUDM's own server
    /// builds); GLM-4-0414 reads the template's `tools`, as transformers passes them.
    Glm4 { tools_on_item: bool },
    /// Templates with no tool format of their own (DeepSeek-V2, ChatML without tools): a
    /// system note describes the tools and the reply is one JSON object, `{"tool_calls":
    /// [{"name", "arguments"}, ...]}` or `{"response": "..."}` (llama.cpp's generic protocol).
    Generic,
}

impl ToolFormat {
    /// The format a chat template speaks, judged by what it writes (`None`: the template has
    /// no tool format this daemon knows).
    pub fn of_template(
        source_mentions: impl Fn(&str) -> bool,
        token_id: impl Fn(&str) -> Option<u32>,
    ) -> Option<Self> {
        if source_mentions("<tool_call>") {
            Some(Self::Hermes)
        } else if source_mentions("['metadata']") && source_mentions("['tools']") {
            Some(Self::Glm4 {
                tools_on_item: true,
            })
        } else if source_mentions("metadata") && source_mentions("<|observation|>") {
            Some(Self::Glm4 {
                tools_on_item: false,
            })
        } else if source_mentions("\"parameters\"") && source_mentions("ipython") {
            Some(Self::Llama3Json {
                python_tag: token_id("<|python_tag|>"),
            })
        } else {
            Some(Self::Generic)
        }
    }

    /// The key a call's arguments go under.
    fn args_key(self) -> &'static str {
        match self {
            Self::Hermes => "arguments",
            Self::Llama3Json { .. } => "parameters",
            Self::Generic | Self::Glm4 { .. } => "arguments",
        }
    }

    /// Whether a reply may hold more than one call.
    fn parallel(self) -> bool {
        match self {
            Self::Hermes | Self::Generic => true,
            Self::Llama3Json { .. } | Self::Glm4 { .. } => false,
        }
    }
}

/// `tool_choice`, once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    Auto,
    Required,
    Named(String),
}

#[derive(Debug, Clone)]
pub struct Function {
    pub name: String,
    /// The JSON schema of the arguments (`{}`-only when the tool declares none).
    pub parameters: Value,
    pub strict: bool,
}

/// What a request's tools ask of generation.
#[derive(Debug, Clone)]
pub struct ToolPlan {
    pub format: ToolFormat,
    pub functions: Vec<Function>,
    pub choice: Choice,
    pub parallel: bool,
}

/// The checked tool fields: the tools for the template (as sent; none for `tool_choice:
/// "none"`, so the model is not invited to call) and the plan, unless no call may be made.
#[derive(Debug, Default)]
pub struct Tools {
    pub for_template: Option<Vec<Value>>,
    pub plan: Option<ToolPlan>,
}

fn bad(field: &'static str, msg: impl Into<String>) -> ApiError {
    ApiError::param(field, msg)
}

/// One entry of `tools`: `{"type": "function", "function": {"name", "description",
/// "parameters", "strict"}}`.
fn function(i: usize, t: &Value) -> Result<Function, ApiError> {
    if t.get("type").and_then(Value::as_str) != Some("function") {
        return Err(bad("tools", format!("tools[{i}].type must be `function`")));
    }
    let f = t
        .get("function")
        .filter(|f| f.is_object())
        .ok_or_else(|| bad("tools", format!("tools[{i}].function must be an object")))?;
    let name = f.get("name").and_then(Value::as_str).unwrap_or("");
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid {
        return Err(bad(
            "tools",
            format!(
                "tools[{i}].function.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -; got `{name}`"
            ),
        ));
    }
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => {
            json!({"type": "object", "properties": {}, "additionalProperties": false})
        }
        Some(Value::Object(m)) if m.is_empty() => {
            json!({"type": "object", "properties": {}, "additionalProperties": false})
        }
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => {
            return Err(bad(
                "tools",
                format!("tools[{i}].function.parameters must be a JSON schema object"),
            ))
        }
    };
    Ok(Function {
        name: name.to_string(),
        parameters,
        strict: f.get("strict").and_then(Value::as_bool).unwrap_or(false),
    })
}

impl ToolParams {
    /// Check the fields against each other; `format` is the model's (`None`: it has none,
    /// and a request that may call a tool is refused rather than answered as plain text).
    pub fn check(self, format: Option<ToolFormat>) -> Result<Tools, ApiError> {
        let tools = self.tools.unwrap_or_default();
        let functions = tools
            .iter()
            .enumerate()
            .map(|(i, t)| function(i, t))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, f) in functions.iter().enumerate() {
            if functions[..i].iter().any(|g| g.name == f.name) {
                return Err(bad(
                    "tools",
                    format!("tools[{i}].function.name `{}` is given twice", f.name),
                ));
            }
        }
        let choice = match &self.tool_choice {
            None => (!functions.is_empty()).then_some(Choice::Auto),
            Some(Value::String(s)) => match s.as_str() {
                "none" => None,
                "auto" => Some(Choice::Auto),
                "required" => Some(Choice::Required),
                other => {
                    return Err(bad(
                        "tool_choice",
                        format!("tool_choice must be none, auto, required or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}; got `{other}`"),
                    ))
                }
            },
            Some(v) => {
                let name = v
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                    .ok_or_else(|| {
                        bad(
                            "tool_choice",
                            "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                        )
                    })?;
                Some(Choice::Named(name.to_string()))
            }
        };
        match &choice {
            Some(Choice::Required) if functions.is_empty() => {
                return Err(bad(
                    "tool_choice",
                    "tool_choice `required` needs at least one tool in tools",
                ))
            }
            Some(Choice::Named(n)) if !functions.iter().any(|f| &f.name == n) => {
                return Err(bad(
                    "tool_choice",
                    format!("tool_choice names function `{n}`, which is not in tools"),
                ))
            }
            _ => {}
        }
        let Some(choice) = choice else {
            return Ok(Tools::default());
        };
        let format = format.ok_or_else(|| {
            bad(
                "tools",
                "this model's chat template has no tool-call format; send tool_choice `none` or no tools",
            )
        })?;
        Ok(Tools {
            for_template: Some(tools),
            plan: Some(ToolPlan {
                format,
                functions,
                choice,
                parallel: self.parallel_tool_calls.unwrap_or(true),
            }),
        })
    }
}

impl ToolPlan {
    /// The functions a call may name under this choice.
    fn callable(&self) -> Vec<&Function> {
        match &self.choice {
            Choice::Named(n) => self.functions.iter().filter(|f| &f.name == n).collect(),
            _ => self.functions.iter().collect(),
        }
    }

    /// One call's JSON with inferd's JSON spelling (see [`Self::call_object`]).
    fn call_schema(&self) -> Value {
        self.with_options(self.call_object())
    }

    /// `schema` with inferd's JSON spelling. Tools that are not `strict` may use keywords the
    /// compiler does not know; those are ignored rather than refused (their arguments are
    /// still valid JSON objects).
    fn with_options(&self, mut schema: Value) -> Value {
        let lenient = !self.callable().iter().all(|f| f.strict);
        if let Value::Object(m) = &mut schema {
            let mut opts = json_options();
            opts["lenient"] = lenient.into();
            m.insert("x-guidance".into(), opts);
        }
        schema
    }

    /// One call's JSON: the name pinned, the arguments valid against that tool's schema.
    fn call_object(&self) -> Value {
        let key = self.format.args_key();
        let one = |f: &Function| {
            json!({
                "type": "object",
                "properties": {"name": {"const": f.name}, key: f.parameters},
                "required": ["name", key],
                "additionalProperties": false,
            })
        };
        match self.callable().as_slice() {
            [f] => one(f),
            fs => json!({"anyOf": fs.iter().map(|f| one(f)).collect::<Vec<_>>()}),
        }
    }

    /// The generic protocol's reply: `{"tool_calls": [...]}`, or with `auto` also
    /// `{"response": "..."}`.
    fn generic_schema(&self) -> Value {
        let mut calls = json!({"type": "array", "items": self.call_object(), "minItems": 1});
        if !self.parallel() {
            calls["maxItems"] = 1.into();
        }
        let with_calls = json!({"type": "object", "properties": {"tool_calls": calls},
                                "required": ["tool_calls"], "additionalProperties": false});
        let schema = match self.choice {
            Choice::Auto => json!({"anyOf": [with_calls, {"type": "object",
                "properties": {"response": {"type": "string"}},
                "required": ["response"], "additionalProperties": false}]}),
            _ => with_calls,
        };
        self.with_options(schema)
    }

    /// The system note that describes the tools and the protocol to a model whose template
    /// has no tool format.
    fn generic_note(&self, tools: &[Value]) -> String {
        let mut note = String::from(
            "You can call tools. To call tools, reply with only a JSON object: \
             {\"tool_calls\": [{\"name\": <tool name>, \"arguments\": <arguments object>}]}",
        );
        if self.choice == Choice::Auto {
            note.push_str(". To answer without a tool, reply with {\"response\": <your answer>}");
        }
        note.push_str(".\n\nTools:");
        for t in tools {
            note.push('\n');
            python_json(t, None, 0, &mut note);
        }
        note
    }

    /// The grammar every reply follows: with `auto`, free text until a call starts, then a
    /// valid call; with `required` or a named function, calls only.
    pub fn constraint(&self) -> Constraint {
        let grammar = match self.format {
            ToolFormat::Hermes => TopLevelGrammar::from_lark(self.hermes_grammar()),
            ToolFormat::Llama3Json { python_tag } => {
                TopLevelGrammar::from_lark(self.llama3_grammar(python_tag))
            }
            // A space may come first (templates like DeepSeek's end the prompt with `Assistant:`).
            ToolFormat::Glm4 { .. } => TopLevelGrammar::from_lark(self.glm4_grammar()),
            ToolFormat::Generic => TopLevelGrammar::from_lark(format!(
                "start: \" \"? body\nbody: %json {}\n",
                self.generic_schema()
            )),
        };
        Constraint {
            grammar,
            field: "tools",
        }
    }

    /// Hermes: a call opens with `<tool_call>`, or (as small models often write it, and
    /// llama.cpp accepts) is a bare JSON object or a ```` ```json ```` fence that begins the
    /// reply; text that is not a call never begins with either, so such a start is always a
    /// valid call.
    fn hermes_grammar(&self) -> String {
        let rules = format!(
            "fenced: \"```json\\n\" body \"\\n```\"\n\
             f_end: TEXT?\n\
             TEXT: /(.|\\n)+/ & ~/(\\{{|```json)(.|\\n)*/\n\
             f_hd[lazy]: F_HD\n\
             F_HD: /(.|\\n)*<tool_call>/ & ~/(\\{{|```json)(.|\\n)*/\n\
             f_call: f_hd \"\\n\" body \"\\n</tool_call>\"\n\
             call: \"<tool_call>\\n\" body \"\\n</tool_call>\"\n\
             body: %json {}\n",
            self.call_schema()
        );
        let start = match (&self.choice, self.parallel()) {
            (Choice::Auto, true) => {
                "start: body (\"\\n\" body)* | fenced (\"\\n\" fenced)* | f_call* f_end"
            }
            (Choice::Auto, false) => "start: body | fenced | f_end | f_call",
            (Choice::Required, true) => "start: call (\"\\n\" call)*",
            _ => "start: call",
        };
        format!("{start}\n{rules}")
    }

    /// Llama 3: the reply is one call (a JSON object, after `<|python_tag|>` or not) or text
    /// that does not begin with `{`.
    fn llama3_grammar(&self, python_tag: Option<u32>) -> String {
        let start = match self.choice {
            Choice::Auto => "start: call | TEXT?",
            _ => "start: call",
        };
        let tagged = python_tag.map_or(String::new(), |id| format!(" | <[{id}]> body"));
        format!(
            "{start}\n\
             call: body{tagged}\n\
             TEXT: /(.|\\n)+/ & ~/\\{{(.|\\n)*/\n\
             body: %json {}\n",
            self.call_schema()
        )
    }

    /// GLM-4: the reply is one call, `name\n{arguments}` (GLM-4-0414's template writes a
    /// space before the newline: either is taken), or text that does not begin with a tool's
    /// name and a newline.
    fn glm4_grammar(&self) -> String {
        let fs = self.callable();
        let mut rules = String::new();
        for (i, f) in fs.iter().enumerate() {
            // One lexeme, name to newline, so that text lexing alongside it cannot outrun it.
            // (Names are letters, digits, `_` and `-`: nothing to escape in a regex.)
            let args = self.with_options(f.parameters.clone());
            rules.push_str(&format!(
                "call{i}: /{} ?\\n/ args{i}\nargs{i}: %json {args}\n",
                f.name
            ));
        }
        let alts: Vec<String> = (0..fs.len()).map(|i| format!("call{i}")).collect();
        let names: Vec<&str> = fs.iter().map(|f| f.name.as_str()).collect();
        let start = match self.choice {
            Choice::Auto => "start: call | TEXT?",
            _ => "start: call",
        };
        format!(
            "{start}\ncall: {}\nTEXT: /(.|\\n)+/ & ~/({}) ?\\n(.|\\n)*/\n{rules}",
            alts.join(" | "),
            names.join("|"),
        )
    }

    /// Whether a reply may hold several calls: asked for, the format has room for them, and
    /// no one function was named (a named function is called once, as OpenAI and vLLM do).
    pub fn parallel(&self) -> bool {
        self.parallel && self.format.parallel() && !matches!(self.choice, Choice::Named(_))
    }

    /// Whether a reply with calls finishes as `tool_calls` (OpenAI gives `stop` when the
    /// function was named).
    pub fn finish_as_tool_calls(&self) -> bool {
        !matches!(self.choice, Choice::Named(_))
    }
}

/// Messages as the template should see them. Native formats pass through (their templates
/// render tools, calls and results themselves). The generic protocol, for templates that know
/// none of it, writes the tool note into the system message, past calls as the JSON the model
/// is asked to write, past answers (while tools are offered) as `{"response": ...}`, and tool
/// results as user turns.
pub fn prepare_messages(
    format: Option<ToolFormat>,
    tools: &Tools,
    messages: Vec<ChatMessage>,
) -> Vec<ChatMessage> {
    let json = |v: &Value| {
        let mut s = String::new();
        python_json(v, None, 0, &mut s);
        s
    };
    match format {
        Some(ToolFormat::Generic) => {}
        Some(ToolFormat::Glm4 { tools_on_item }) => {
            return glm4_messages(tools_on_item, tools, messages, json)
        }
        _ => return messages,
    }
    let offered = tools.plan.is_some();
    let mut out: Vec<ChatMessage> = messages
        .into_iter()
        .map(|m| match (m.role.as_str(), m.tool_calls) {
            ("assistant", Some(calls)) => {
                let calls: Vec<Value> = calls
                    .iter()
                    .map(|c| json!({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}))
                    .collect();
                ChatMessage::text("assistant", json(&json!({"tool_calls": calls})))
            }
            ("assistant", None) if offered => {
                ChatMessage::text("assistant", json(&json!({"response": m.content})))
            }
            ("tool", _) => ChatMessage::text(
                "user",
                json(&json!({"tool_response": {"id": m.tool_call_id, "content": m.content}})),
            ),
            (_, tool_calls) => ChatMessage { tool_calls, ..m },
        })
        .collect();
    if let (Some(plan), Some(list)) = (&tools.plan, &tools.for_template) {
        let note = plan.generic_note(list);
        match out.first_mut() {
            Some(first) if first.role == "system" => {
                first.content = format!("{}\n\n{note}", first.content);
            }
            _ => out.insert(0, ChatMessage::text("system", note)),
        }
    }
    out
}

/// GLM-4's layout, as THUDM's own OpenAI server builds it: the tools on a leading system
/// item (`tools_on_item`; GLM-4-0414's template takes them from its `tools` instead), each past
/// call an assistant item whose `metadata` is the function's name and whose content is its
/// arguments, each result an `observation` item.
fn glm4_messages(
    tools_on_item: bool,
    tools: &Tools,
    messages: Vec<ChatMessage>,
    json: impl Fn(&Value) -> String,
) -> Vec<ChatMessage> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    if let (true, Some(_), Some(list)) = (tools_on_item, &tools.plan, &tools.for_template) {
        out.push(ChatMessage {
            tools: Some(list.clone()),
            ..ChatMessage::text("system", "")
        });
    }
    for m in messages {
        match (m.role.as_str(), &m.tool_calls) {
            ("assistant", Some(calls)) => {
                if !m.content.is_empty() {
                    out.push(ChatMessage::text("assistant", m.content.clone()));
                }
                for c in calls {
                    out.push(ChatMessage {
                        metadata: c["function"]["name"].as_str().map(String::from),
                        ..ChatMessage::text("assistant", json(&c["function"]["arguments"]))
                    });
                }
            }
            ("tool", _) => out.push(ChatMessage::text("observation", m.content)),
            _ => out.push(m),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(json: &str) -> Result<Tools, String> {
        let p: ToolParams = serde_json::from_str(json).unwrap();
        p.check(Some(ToolFormat::Hermes)).map_err(|e| e.to_string())
    }

    #[test]
    fn tool_fields_are_checked() {
        let tools = r#""tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]"#;
        assert_eq!(
            check(&format!(
                r#"{{{tools}, "tool_choice": {{"type": "function", "function": {{"name": "g"}}}}}}"#
            ))
            .unwrap_err(),
            "tool_choice names function `g`, which is not in tools"
        );
        assert_eq!(
            check(r#"{"tool_choice": "required"}"#).unwrap_err(),
            "tool_choice `required` needs at least one tool in tools"
        );
        assert_eq!(
            check(&format!(r#"{{{tools}, "tool_choice": "sometimes"}}"#))
                .unwrap_err()
                .split(';')
                .next()
                .unwrap(),
            "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}"
        );
        assert_eq!(
            check(r#"{"tools": [{"type": "function", "function": {"name": "a b"}}]}"#).unwrap_err(),
            "tools[0].function.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -; got `a b`"
        );
        let t = check(&format!("{{{tools}}}")).unwrap();
        assert_eq!(t.plan.unwrap().choice, Choice::Auto);
        let t = check(&format!(r#"{{{tools}, "tool_choice": "none"}}"#)).unwrap();
        assert!(t.plan.is_none() && t.for_template.is_none());
        let p: ToolParams = serde_json::from_str(&format!("{{{tools}}}")).unwrap();
        assert_eq!(
            p.check(None).unwrap_err().to_string(),
            "this model's chat template has no tool-call format; send tool_choice `none` or no tools"
        );
    }
}
