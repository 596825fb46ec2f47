//! Tool calling: `tools`, `tool_choice` and `parallel_tool_calls` checked into a [`ToolPlan`];
//! the grammar that keeps every call the model starts valid, in the model's own format; and
//! [`ToolCallParser`], which turns the model's text back into content and `tool_calls`
//! incrementally. Streams and whole responses are both built from its deltas, so they agree
//! by construction.
//!
//! Formats: `hermes` (Qwen2 / Qwen2.5: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`,
//! one block per call) and `llama3_json` (Llama 3.1 / 3.2: `{"name": ..., "parameters": {...}}`,
//! optionally after `<|python_tag|>`, one call per turn: Meta's template refuses more).

use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::structured::{json_options, Constraint};
use crate::tokenizer::chat_template::python_json;
use crate::tokenizer::ChatMessage;
use llguidance::api::TopLevelGrammar;

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
    /// GLM-4-9B-chat (THUDM): tools on a system item, a call is `name\n{arguments}` after
    /// `<|assistant|>` (the name in the item's `metadata`), a result is an `observation` turn.
    Glm4,
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
            Some(Self::Glm4)
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
            Self::Generic | Self::Glm4 => "arguments",
        }
    }

    /// How calls may be wrapped in this format's text.
    fn wraps(self) -> &'static [Wrap] {
        match self {
            Self::Hermes => &[Wrap::Tagged, Wrap::Bare, Wrap::Fenced],
            Self::Llama3Json { .. } => &[Wrap::Bare],
            Self::Generic | Self::Glm4 => &[],
        }
    }

    /// Whether a reply may hold more than one call.
    fn parallel(self) -> bool {
        match self {
            Self::Hermes | Self::Generic => true,
            Self::Llama3Json { .. } | Self::Glm4 => false,
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
            ToolFormat::Glm4 => TopLevelGrammar::from_lark(self.glm4_grammar()),
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

    /// GLM-4: the reply is one call, `name\n{arguments}`, or text that does not begin with a
    /// tool's name and a newline.
    fn glm4_grammar(&self) -> String {
        let fs = self.callable();
        let mut rules = String::new();
        for (i, f) in fs.iter().enumerate() {
            let head = serde_json::to_string(&format!("{}\n", f.name)).unwrap_or_default();
            let args = self.with_options(f.parameters.clone());
            rules.push_str(&format!("call{i}: {head} args{i}\nargs{i}: %json {args}\n"));
        }
        let alts: Vec<String> = (0..fs.len()).map(|i| format!("call{i}")).collect();
        let names: Vec<&str> = fs.iter().map(|f| f.name.as_str()).collect();
        let start = match self.choice {
            Choice::Auto => "start: call | TEXT?",
            _ => "start: call",
        };
        format!(
            "{start}\ncall: {}\nTEXT: /(.|\\n)+/ & ~/({})\\n(.|\\n)*/\n{rules}",
            alts.join(" | "),
            names.join("|"),
        )
    }

    /// Whether a reply may hold several calls: asked for, and the format has room for them.
    pub fn parallel(&self) -> bool {
        self.parallel && self.format.parallel()
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
        Some(ToolFormat::Glm4) => return glm4_messages(tools, messages, json),
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
/// item, each past call an assistant item whose `metadata` is the function's name and whose
/// content is its arguments, each result an `observation` item.
fn glm4_messages(
    tools: &Tools,
    messages: Vec<ChatMessage>,
    json: impl Fn(&Value) -> String,
) -> Vec<ChatMessage> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    if let (Some(_), Some(list)) = (&tools.plan, &tools.for_template) {
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

/// What the parser recognised in new text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolDelta {
    Content(String),
    /// A call began: its index (dense from 0) and function name.
    Start {
        index: usize,
        name: String,
    },
    /// More of call `index`'s arguments (JSON text).
    Args {
        index: usize,
        fragment: String,
    },
}

const OPEN: &str = "<tool_call>";

/// What surrounds a call in the text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Wrap {
    /// `<tool_call>` ... `</tool_call>`, anywhere.
    #[default]
    Tagged,
    /// A JSON object alone, first thing in the reply.
    Bare,
    /// ```` ```json ```` ... ```` ``` ````, first thing in the reply.
    Fenced,
}

impl Wrap {
    fn open(self) -> &'static str {
        match self {
            Self::Tagged => OPEN,
            Self::Bare => "",
            Self::Fenced => "```json",
        }
    }

    fn close(self) -> Option<&'static str> {
        match self {
            Self::Tagged => Some("</tool_call>"),
            Self::Bare => None,
            Self::Fenced => Some("```"),
        }
    }
}

/// Text in, content and calls out, a piece at a time (see the module docs).
#[derive(Debug, Default)]
pub struct ToolCallParser {
    /// Text not yet resolved: held-back content, or the current call's body.
    buf: String,
    in_call: bool,
    /// How the current call opened.
    wrap: Wrap,
    /// A bare or fenced call may start here: at the start of the reply, or right after one.
    bare_ok: bool,
    /// The wraps this format's calls come in.
    wraps: &'static [Wrap],
    /// Whitespace after the content sent so far, held until more content follows (it is
    /// dropped before a call and after the last one).
    pending_ws: String,
    /// Whitespace held before a `<tool_call>` tag, restored if what follows is not a call.
    ws_before_tag: String,
    /// Calls started.
    calls: usize,
    /// The current call's `Start` was sent.
    started: bool,
    /// Bytes of the current call's arguments sent.
    args_sent: usize,
    /// The generic protocol and GLM-4: where the reply's envelope is (`None` for others).
    envelope: Option<Envelope>,
    /// GLM-4: the tools' names (a call's first line).
    names: Vec<String>,
}

/// Where the parser is in the generic protocol's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Envelope {
    /// Before `{"tool_calls": [` or `{"response": "`.
    Start,
    /// Between calls of the list.
    List,
    /// Inside the response string.
    Response,
    /// Past the response string's closing quote.
    ResponseEnd,
    /// GLM-4: the first line, which is a tool's name for a call.
    NameLine,
    /// GLM-4: a call's arguments, the rest of the reply.
    GlmArgs,
    /// Past the envelope: anything more is content.
    After,
}

const LIST_OPEN: &str = "{\"tool_calls\": [";
const RESPONSE_OPEN: &str = "{\"response\": \"";

impl ToolCallParser {
    /// A parser for `format`; `names` are the tools' names (GLM-4 writes a call's name alone).
    pub fn new(format: ToolFormat, names: &[String]) -> Self {
        let envelope = match format {
            ToolFormat::Generic => Some(Envelope::Start),
            ToolFormat::Glm4 => Some(Envelope::NameLine),
            _ => None,
        };
        Self {
            bare_ok: true,
            wraps: format.wraps(),
            envelope,
            names: names.to_vec(),
            ..Self::default()
        }
    }

    /// What opened the current call, given back as text if it was not one.
    fn opener(&self) -> &'static str {
        self.wrap.open()
    }

    /// Calls started so far.
    pub fn num_calls(&self) -> usize {
        self.calls
    }

    pub fn push(&mut self, text: &str) -> Vec<ToolDelta> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            let progressed = match self.envelope {
                _ if self.in_call => self.step_call(&mut out),
                Some(e) if e != Envelope::After => self.step_envelope(e, &mut out),
                _ => self.step_content(&mut out),
            };
            if !progressed {
                return out;
            }
        }
    }

    /// The end of the text: release what was held back.
    pub fn finish(&mut self) -> Vec<ToolDelta> {
        let mut out = Vec::new();
        if self.in_call {
            if !self.started {
                // `<tool_call>` and no recognisable call after it: that was text.
                let text = format!("{}{}", self.opener(), std::mem::take(&mut self.buf));
                self.pending_ws = std::mem::take(&mut self.ws_before_tag);
                self.content(&text, &mut out);
            }
        } else {
            let rest = std::mem::take(&mut self.buf);
            self.content(&rest, &mut out);
        }
        if self.calls == 0 && !self.pending_ws.is_empty() {
            out.push(ToolDelta::Content(std::mem::take(&mut self.pending_ws)));
        }
        out
    }

    /// Content, whose trailing whitespace is held back.
    fn content(&mut self, text: &str, out: &mut Vec<ToolDelta>) {
        if text.is_empty() {
            return;
        }
        let body = text.trim_end();
        if body.is_empty() {
            self.pending_ws.push_str(text);
            return;
        }
        let mut s = std::mem::take(&mut self.pending_ws);
        s.push_str(body);
        self.pending_ws = text[body.len()..].to_string();
        self.bare_ok = false;
        out.push(ToolDelta::Content(s));
    }

    /// Begin a call after `skip` bytes of the buffer (its opening, and whitespace before it).
    fn open_call(&mut self, skip: usize, wrap: Wrap) {
        self.ws_before_tag = std::mem::take(&mut self.pending_ws);
        self.buf.drain(..skip);
        self.in_call = true;
        self.wrap = wrap;
        self.started = false;
        self.args_sent = 0;
    }

    /// The generic protocol: its envelope, the response string decoded as it streams, the
    /// calls of its list (each a bare call).
    fn step_envelope(&mut self, e: Envelope, out: &mut Vec<ToolDelta>) -> bool {
        let lead = self.buf.len() - self.buf.trim_start().len();
        let rest = &self.buf[lead..];
        let next = |me: &mut Self, skip: usize, to: Envelope| {
            me.buf.drain(..skip);
            me.envelope = Some(to);
            true
        };
        match e {
            Envelope::Start if rest.starts_with(LIST_OPEN) => {
                next(self, lead + LIST_OPEN.len(), Envelope::List)
            }
            Envelope::Start if rest.starts_with(RESPONSE_OPEN) => {
                next(self, lead + RESPONSE_OPEN.len(), Envelope::Response)
            }
            Envelope::Start if LIST_OPEN.starts_with(rest) || RESPONSE_OPEN.starts_with(rest) => {
                false
            }
            Envelope::List if rest.starts_with('{') => {
                self.open_call(lead, Wrap::Bare);
                true
            }
            Envelope::List if rest.starts_with(',') => next(self, lead + 1, Envelope::List),
            Envelope::List if rest.starts_with("]}") => next(self, lead + 2, Envelope::After),
            Envelope::List if rest.is_empty() || rest == "]" => false,
            Envelope::Response => {
                let (text, used, closed) = json_string_prefix(&self.buf);
                self.content(&text, out);
                self.buf.drain(..used);
                if closed {
                    self.envelope = Some(Envelope::ResponseEnd);
                }
                closed
            }
            Envelope::ResponseEnd if rest.starts_with('}') => next(self, lead + 1, Envelope::After),
            Envelope::ResponseEnd if rest.is_empty() => false,
            Envelope::NameLine => match self.buf.find('\n') {
                Some(i) if self.names.iter().any(|n| *n == self.buf[..i]) => {
                    out.push(ToolDelta::Start {
                        index: self.calls,
                        name: self.buf[..i].to_string(),
                    });
                    self.calls += 1;
                    next(self, i + 1, Envelope::GlmArgs)
                }
                None if self.names.iter().any(|n| n.starts_with(self.buf.as_str())) => false,
                _ => next(self, 0, Envelope::After),
            },
            Envelope::GlmArgs => {
                if !self.buf.is_empty() {
                    out.push(ToolDelta::Args {
                        index: self.calls - 1,
                        fragment: std::mem::take(&mut self.buf),
                    });
                }
                false
            }
            // Not the protocol after all: the rest is content.
            _ => next(self, 0, Envelope::After),
        }
    }

    fn step_content(&mut self, out: &mut Vec<ToolDelta>) -> bool {
        // Models that leave out the tag write the call first thing, as a bare JSON object or
        // in a ```json fence.
        let lead = self.buf.len() - self.buf.trim_start().len();
        let rest = &self.buf[lead..];
        if self.bare_ok && !rest.is_empty() {
            let fenced = self.wraps.contains(&Wrap::Fenced);
            let wrap = if rest.starts_with('{') && self.wraps.contains(&Wrap::Bare) {
                Some(Wrap::Bare)
            } else if fenced && rest.starts_with(Wrap::Fenced.open()) {
                Some(Wrap::Fenced)
            } else if fenced && Wrap::Fenced.open().starts_with(rest) {
                return false; // may become a fence
            } else {
                None
            };
            if let Some(wrap) = wrap {
                let ws: String = self.buf[..lead].to_string();
                self.pending_ws.push_str(&ws);
                self.open_call(lead + wrap.open().len(), wrap);
                return true;
            }
        }
        let tagged = self.wraps.contains(&Wrap::Tagged);
        if let Some(i) = self.buf.find(OPEN).filter(|_| tagged) {
            let before = self.buf[..i].to_string();
            self.content(&before, out);
            self.open_call(i + OPEN.len(), Wrap::Tagged);
            return true;
        }
        // Hold back a tail that may be the start of `<tool_call>`.
        let held = (1..OPEN.len())
            .rev()
            .find(|&k| tagged && self.buf.ends_with(&OPEN[..k]))
            .unwrap_or(0);
        let cut = self.buf.len() - held;
        if cut > 0 {
            let text: String = self.buf.drain(..cut).collect();
            self.content(&text, out);
        }
        false
    }

    fn step_call(&mut self, out: &mut Vec<ToolDelta>) -> bool {
        let lead = self.buf.len() - self.buf.trim_start().len();
        let body = self.buf[lead..].to_string();
        let scan = match scan_call(&body) {
            Ok(s) => s,
            Err(()) => {
                // Not a JSON call: if nothing was sent for it, it was text after all.
                if !self.started {
                    let text = format!("{}{}", self.opener(), std::mem::take(&mut self.buf));
                    self.in_call = false;
                    self.pending_ws = std::mem::take(&mut self.ws_before_tag);
                    self.content(&text, out);
                    return true;
                }
                return self.close_call(self.buf.len(), out);
            }
        };
        if let (false, Some(name)) = (self.started, &scan.name) {
            out.push(ToolDelta::Start {
                index: self.calls,
                name: name.clone(),
            });
            self.started = true;
            self.calls += 1;
            self.ws_before_tag.clear();
        }
        if let (true, Some((a, end))) = (self.started, scan.args) {
            let upto = end.unwrap_or(body.len());
            if upto > a + self.args_sent {
                out.push(ToolDelta::Args {
                    index: self.calls - 1,
                    fragment: body[a + self.args_sent..upto].to_string(),
                });
                self.args_sent = upto - a;
            }
        }
        let Some(end) = scan.end else {
            return false;
        };
        let Some(close) = self.wrap.close() else {
            let called = self.started;
            self.close_call(lead + end, out);
            self.bare_ok = called;
            return true;
        };
        let after = &body[end..];
        let after_trim = after.trim_start();
        if after_trim.starts_with(close) {
            let consumed = lead + end + (after.len() - after_trim.len()) + close.len();
            let (called, wrap) = (self.started, self.wrap);
            self.close_call(consumed, out);
            self.bare_ok = called && wrap == Wrap::Fenced;
            return true;
        }
        if close.starts_with(after_trim) {
            return false; // the closing tag may still be coming
        }
        // A complete call without its closing tag: the call ends here, the rest is content.
        self.close_call(lead + end, out)
    }

    /// End the current call after `consumed` bytes of the buffer.
    fn close_call(&mut self, consumed: usize, out: &mut Vec<ToolDelta>) -> bool {
        if !self.started {
            // A JSON object without a name: text.
            let text = format!("{}{}", self.opener(), &self.buf[..consumed]);
            self.pending_ws = std::mem::take(&mut self.ws_before_tag);
            self.content(&text, out);
        }
        self.buf.drain(..consumed);
        self.in_call = false;
        self.started = false;
        self.args_sent = 0;
        true
    }
}

/// Decode the start of a JSON string's body (after its opening quote): the text decoded so
/// far, the bytes it used, and whether the closing quote was reached. An escape cut off at the
/// end (`\`, `\u12`, half of a surrogate pair) waits for more.
fn json_string_prefix(body: &str) -> (String, usize, bool) {
    let b = body.as_bytes();
    let mut out = String::new();
    let (mut i, mut plain) = (0, 0);
    while i < b.len() {
        match b[i] {
            b'"' => {
                out.push_str(&body[plain..i]);
                return (out, i + 1, true);
            }
            b'\\' => {
                out.push_str(&body[plain..i]);
                plain = i;
                let len = match b.get(i + 1) {
                    None => break,
                    Some(b'u') => {
                        let high = body
                            .get(i + 2..i + 6)
                            .and_then(|h| u16::from_str_radix(h, 16).ok());
                        match high {
                            None if body.len() < i + 6 => break,
                            Some(h) if (0xD800..0xDC00).contains(&h) => {
                                if body.len() < i + 12 {
                                    break;
                                }
                                12
                            }
                            _ => 6,
                        }
                    }
                    Some(_) => 2,
                };
                let esc = &body[i..i + len];
                let decoded: String =
                    serde_json::from_str(&format!("\"{esc}\"")).unwrap_or_else(|_| esc.to_string());
                out.push_str(&decoded);
                i += len;
                plain = i;
            }
            _ => i += 1,
        }
    }
    let end = i.min(b.len());
    out.push_str(&body[plain..end]);
    (out, end, false)
}

/// What a (possibly partial) call body `{"name": ..., "arguments": ...}` holds so far.
#[derive(Debug, Default, PartialEq)]
struct CallScan {
    name: Option<String>,
    /// Byte offset where the arguments value starts, and where it ends once complete.
    args: Option<(usize, Option<usize>)>,
    /// Offset just past the object's closing brace.
    end: Option<usize>,
}

/// Scan a call body prefix. `Err` when it cannot be the start of a JSON object.
fn scan_call(body: &str) -> Result<CallScan, ()> {
    let b = body.as_bytes();
    let mut scan = CallScan::default();
    let ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    let mut i = 0;
    if b.is_empty() {
        return Ok(scan);
    }
    if b[0] != b'{' {
        return Err(());
    }
    i += 1;
    loop {
        ws(&mut i);
        if i >= b.len() {
            return Ok(scan);
        }
        match b[i] {
            b'}' => {
                scan.end = Some(i + 1);
                return Ok(scan);
            }
            b',' => {
                i += 1;
                continue;
            }
            b'"' => {}
            _ => return Err(()),
        }
        let Some(k_end) = string_end(b, i) else {
            return Ok(scan);
        };
        let key: String = serde_json::from_str(&body[i..k_end]).map_err(|_| ())?;
        i = k_end;
        ws(&mut i);
        if i >= b.len() {
            return Ok(scan);
        }
        if b[i] != b':' {
            return Err(());
        }
        i += 1;
        ws(&mut i);
        if i >= b.len() {
            return Ok(scan);
        }
        let v_start = i;
        let v_end = value_end(b, i);
        match key.as_str() {
            "name" => {
                if let Some(e) = v_end {
                    scan.name = serde_json::from_str::<String>(&body[v_start..e]).ok();
                }
            }
            "arguments" | "parameters" => scan.args = Some((v_start, v_end)),
            _ => {}
        }
        match v_end {
            Some(e) => i = e,
            None => return Ok(scan),
        }
    }
}

/// The offset past the JSON string starting at `b[i] == '"'`, if it is complete.
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    }
    None
}

/// The offset past the JSON value starting at `b[i]`, if it is complete.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match b[i] {
        b'"' => string_end(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = string_end(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            let j = i + b[i..]
                .iter()
                .position(|&c| c == b',' || c == b'}' || c == b']' || c.is_ascii_whitespace())?;
            Some(j)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Content and calls, as a whole response shows them.
    #[derive(Debug, Default, PartialEq)]
    struct Parsed {
        content: String,
        calls: Vec<(String, String)>,
    }

    fn fold(deltas: impl IntoIterator<Item = ToolDelta>) -> Parsed {
        let mut p = Parsed::default();
        for d in deltas {
            match d {
                ToolDelta::Content(c) => p.content.push_str(&c),
                ToolDelta::Start { index, name } => {
                    assert_eq!(index, p.calls.len(), "indices are dense");
                    p.calls.push((name, String::new()));
                }
                ToolDelta::Args { index, fragment } => p.calls[index].1.push_str(&fragment),
            }
        }
        p
    }

    fn parse_whole(text: &str) -> Parsed {
        let mut p = ToolCallParser::new(ToolFormat::Hermes, &[]);
        let mut d = p.push(text);
        d.extend(p.finish());
        fold(d)
    }

    fn call(name: &str, args: &str) -> (String, String) {
        (name.to_string(), args.to_string())
    }

    #[test]
    fn hermes_goldens() {
        let one = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": [1, 2]}}\n</tool_call>";
        assert_eq!(
            parse_whole(one),
            Parsed {
                content: String::new(),
                calls: vec![call(
                    "get_weather",
                    "{\"city\": \"Paris\", \"days\": [1, 2]}"
                )]
            }
        );
        let two = format!("Let me check.\n\n{one}\n<tool_call>\n{{\"arguments\": {{}}, \"name\": \"now\"}}\n</tool_call>");
        assert_eq!(
            parse_whole(&two),
            Parsed {
                content: "Let me check.".into(),
                calls: vec![
                    call("get_weather", "{\"city\": \"Paris\", \"days\": [1, 2]}"),
                    call("now", "{}")
                ]
            }
        );
        // Braces and tags inside strings are data.
        let tricky = "<tool_call>\n{\"name\": \"run\", \"arguments\": {\"code\": \"if x: {\\\"a\\\": '}'} </tool_call>\"}}\n</tool_call>";
        assert_eq!(
            parse_whole(tricky).calls,
            vec![call(
                "run",
                "{\"code\": \"if x: {\\\"a\\\": '}'} </tool_call>\"}"
            )]
        );
        // Plain text, and a tag with no call after it, stay text.
        assert_eq!(parse_whole("Hello <tool").content, "Hello <tool");
        assert_eq!(parse_whole("a <tool_call> b").content, "a <tool_call> b");
        assert_eq!(parse_whole("  hi \n").content, "  hi \n");
        // Cut off mid-arguments (max_tokens): the call keeps what was generated.
        assert_eq!(
            parse_whole("<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": \"ab").calls,
            vec![call("f", "{\"x\": \"ab")]
        );
    }

    #[test]
    fn a_bare_json_call_first_thing_is_a_call() {
        let bare =
            "\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n{\"name\": \"g\", \"arguments\": {}}";
        assert_eq!(
            parse_whole(bare),
            Parsed {
                content: String::new(),
                calls: vec![call("f", "{\"a\": 1}"), call("g", "{}")]
            }
        );
        let fenced = "```json\n{\"name\": \"f\", \"arguments\": {}}\n```\n```json\n{\"name\": \"g\", \"arguments\": {}}\n```";
        assert_eq!(
            parse_whole(fenced),
            Parsed {
                content: String::new(),
                calls: vec![call("f", "{}"), call("g", "{}")]
            }
        );
        assert_eq!(
            parse_whole("```python\nx = 1\n```").content,
            "```python\nx = 1\n```"
        );
        // JSON without a name, or after other text, is content.
        assert_eq!(parse_whole("{\"a\": 1}").content, "{\"a\": 1}");
        assert_eq!(
            parse_whole("x {\"name\": \"f\"}").content,
            "x {\"name\": \"f\"}"
        );
    }

    /// Split at every byte (char) boundary, and one char at a time: the deltas fold to the
    /// whole parse.
    #[test]
    fn streaming_at_every_boundary_equals_the_whole_parse() {
        let texts = [
            "Sure — calling.\n<tool_call>\n{\"name\": \"search\", \"arguments\": {\"q\": \"naïve {x}\", \"n\": 3}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>",
            "\n{\"name\": \"f\", \"arguments\": {\"s\": \"```\"}}\n{\"name\": \"g\", \"arguments\": {}}",
            "```json\n{\"name\": \"f\", \"arguments\": {\"a\": [1, {\"b\": null}]}}\n```",
            "```js\nlet x = {};\n``` and <tool_cal",
        ];
        for text in texts {
            let whole = parse_whole(text);
            for (cut, _) in text.char_indices() {
                let mut p = ToolCallParser::new(ToolFormat::Hermes, &[]);
                let mut d = p.push(&text[..cut]);
                d.extend(p.push(&text[cut..]));
                d.extend(p.finish());
                assert_eq!(fold(d), whole, "{text:?} split at {cut}");
            }
            let mut p = ToolCallParser::new(ToolFormat::Hermes, &[]);
            let mut d = Vec::new();
            for c in text.chars() {
                d.extend(p.push(&c.to_string()));
            }
            d.extend(p.finish());
            assert_eq!(fold(d), whole, "{text:?} a char at a time");
        }
        assert_eq!(parse_whole(texts[0]).calls.len(), 2);
        assert_eq!(parse_whole(texts[3]).content, texts[3]);
    }

    fn parse_generic(text: &str) -> Parsed {
        let mut p = ToolCallParser::new(ToolFormat::Generic, &[]);
        let mut d = p.push(text);
        d.extend(p.finish());
        fold(d)
    }

    #[test]
    fn generic_protocol_at_every_boundary() {
        let texts = [
            r#"{"tool_calls": [{"name": "f", "arguments": {"a": [1, "}"]}}, {"name": "g", "arguments": {}}]}"#,
            r#"{"response": "Line one\nsaid \"hi\" — \u00e9\ud83d\ude00 and \\ done"}"#,
        ];
        assert_eq!(
            parse_generic(texts[0]),
            Parsed {
                content: String::new(),
                calls: vec![call("f", r#"{"a": [1, "}"]}"#), call("g", "{}")]
            }
        );
        assert_eq!(
            parse_generic(texts[1]).content,
            "Line one\nsaid \"hi\" — é😀 and \\ done"
        );
        for text in texts {
            let whole = parse_generic(text);
            for (cut, _) in text.char_indices() {
                let mut p = ToolCallParser::new(ToolFormat::Generic, &[]);
                let mut d = p.push(&text[..cut]);
                d.extend(p.push(&text[cut..]));
                d.extend(p.finish());
                assert_eq!(fold(d), whole, "{text:?} split at {cut}");
            }
        }
        // Not the protocol: the text is content.
        assert_eq!(parse_generic("Hello").content, "Hello");
    }

    #[test]
    fn glm4_calls_are_a_name_line_and_arguments() {
        let names = ["get_weather".to_string(), "get".to_string()];
        let parse = |text: &str| {
            let whole = {
                let mut p = ToolCallParser::new(ToolFormat::Glm4, &names);
                let mut d = p.push(text);
                d.extend(p.finish());
                fold(d)
            };
            for (cut, _) in text.char_indices() {
                let mut p = ToolCallParser::new(ToolFormat::Glm4, &names);
                let mut d = p.push(&text[..cut]);
                d.extend(p.push(&text[cut..]));
                d.extend(p.finish());
                assert_eq!(fold(d), whole, "{text:?} split at {cut}");
            }
            whole
        };
        assert_eq!(
            parse("get_weather\n{\"city\": \"Paris\"}"),
            Parsed {
                content: String::new(),
                calls: vec![call("get_weather", "{\"city\": \"Paris\"}")]
            }
        );
        assert_eq!(
            parse("get_weathers are nice\nyes").content,
            "get_weathers are nice\nyes"
        );
        assert_eq!(parse("Paris is sunny.").content, "Paris is sunny.");
        assert_eq!(parse("get").content, "get");
    }

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
