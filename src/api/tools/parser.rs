//! Text in, content and tool calls out, a piece at a time: [`ToolCallParser`] follows each
//! format's wraps (hermes tags, bare JSON, ```json fences; the generic protocol's envelope;
//! GLM-4's name line) and streams a call's arguments as they arrive. Streams and whole
//! responses are both folded from its deltas.

use super::ToolFormat;

/// How calls may be wrapped in `format`'s text.
fn wraps(format: ToolFormat) -> &'static [Wrap] {
    match format {
        ToolFormat::Hermes => &[Wrap::Tagged, Wrap::Bare, Wrap::Fenced],
        ToolFormat::Llama3Json { .. } => &[Wrap::Bare],
        ToolFormat::Generic | ToolFormat::Glm4 { .. } => &[],
    }
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
    /// GLM-4: the first line, the turn's `metadata`: a tool's name for a call (a space may
    /// follow it: GLM-4-0414's template writes one), empty for text.
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
            ToolFormat::Glm4 { .. } => Some(Envelope::NameLine),
            _ => None,
        };
        Self {
            bare_ok: true,
            wraps: wraps(format),
            envelope,
            names: names.to_vec(),
            ..Self::default()
        }
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
            // A call cut off in the generic protocol's list before its name: never text.
            if !self.started && self.envelope != Some(Envelope::List) {
                // `<tool_call>` and no recognisable call after it: that was text.
                let text = format!("{}{}", self.wrap.open(), std::mem::take(&mut self.buf));
                self.pending_ws = std::mem::take(&mut self.ws_before_tag);
                self.content(&text, &mut out);
            }
        } else if !matches!(self.envelope, Some(Envelope::List | Envelope::ResponseEnd)) {
            // (Inside the generic envelope, what is left is its punctuation.)
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
                // An empty first line: text follows, after the newline that opens it.
                Some(0) => next(self, 1, Envelope::After),
                Some(i) => match self.tool_named(&self.buf[..i]) {
                    Some(name) => {
                        out.push(ToolDelta::Start {
                            index: self.calls,
                            name,
                        });
                        self.calls += 1;
                        next(self, i + 1, Envelope::GlmArgs)
                    }
                    None => next(self, 0, Envelope::After),
                },
                // May still become a name line.
                None if self.names.iter().any(|n| {
                    n.starts_with(self.buf.as_str()) || self.buf.strip_suffix(' ') == Some(n)
                }) =>
                {
                    false
                }
                None => next(self, 0, Envelope::After),
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

    /// GLM-4: the tool a name line calls (`name`, or `name ` as GLM-4-0414's template writes it).
    fn tool_named(&self, line: &str) -> Option<String> {
        let line = line.strip_suffix(' ').unwrap_or(line);
        self.names.iter().find(|n| *n == line).cloned()
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
                    let text = format!("{}{}", self.wrap.open(), std::mem::take(&mut self.buf));
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
            let text = format!("{}{}", self.wrap.open(), &self.buf[..consumed]);
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

    /// `pieces` fed in turn to a fresh `format` parser, then the end: what a response shows.
    fn parse_pieces(format: ToolFormat, names: &[String], pieces: &[&str]) -> Parsed {
        let mut p = ToolCallParser::new(format, names);
        let mut d = Vec::new();
        for piece in pieces {
            d.extend(p.push(piece));
        }
        d.extend(p.finish());
        fold(d)
    }

    /// `text` parsed whole, checked to equal the parse of it split at every char boundary.
    fn parse_at_every_split(format: ToolFormat, names: &[String], text: &str) -> Parsed {
        let whole = parse_pieces(format, names, &[text]);
        for (cut, _) in text.char_indices() {
            let split = parse_pieces(format, names, &[&text[..cut], &text[cut..]]);
            assert_eq!(split, whole, "{text:?} split at {cut}");
        }
        whole
    }

    fn parse_whole(text: &str) -> Parsed {
        parse_pieces(ToolFormat::Hermes, &[], &[text])
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
            let whole = parse_at_every_split(ToolFormat::Hermes, &[], text);
            let chars: Vec<String> = text.chars().map(String::from).collect();
            let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
            let one_by_one = parse_pieces(ToolFormat::Hermes, &[], &pieces);
            assert_eq!(one_by_one, whole, "{text:?} a char at a time");
        }
        assert_eq!(parse_whole(texts[0]).calls.len(), 2);
        assert_eq!(parse_whole(texts[3]).content, texts[3]);
    }

    fn parse_generic(text: &str) -> Parsed {
        parse_at_every_split(ToolFormat::Generic, &[], text)
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
        // Not the protocol: the text is content.
        assert_eq!(parse_generic("Hello").content, "Hello");
        // Cut off (max_tokens) as the next call of the list opens: nothing of it is content.
        for cut in [
            r#"{"tool_calls": [{"name": "f", "arguments": {}}, {""#,
            r#"{"tool_calls": [{"name": "f", "arguments": {}}]"#,
        ] {
            assert_eq!(
                parse_generic(cut),
                Parsed {
                    content: String::new(),
                    calls: vec![call("f", "{}")]
                },
                "{cut}"
            );
        }
    }

    #[test]
    fn glm4_calls_are_a_name_line_and_arguments() {
        let names = ["get_weather".to_string(), "get".to_string()];
        let parse = |text: &str| {
            let item = parse_at_every_split(
                ToolFormat::Glm4 {
                    tools_on_item: true,
                },
                &names,
                text,
            );
            let global = parse_at_every_split(
                ToolFormat::Glm4 {
                    tools_on_item: false,
                },
                &names,
                text,
            );
            assert_eq!(item, global, "{text:?}");
            item
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
        // GLM-4-0414's template writes a space after the name.
        assert_eq!(
            parse("get \n{}"),
            Parsed {
                content: String::new(),
                calls: vec![call("get", "{}")]
            }
        );
        assert_eq!(parse("get_weather  \n{}").content, "get_weather  \n{}");
        // A text turn opens with a newline (an empty `metadata` line): it is not content.
        assert_eq!(parse("\nParis is sunny.").content, "Paris is sunny.");
        assert_eq!(parse("\n\nTwo lines down.").content, "\nTwo lines down.");
        assert_eq!(parse("\n").content, "");
    }
}
