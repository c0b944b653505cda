//! What the demo reads from a chat request body (OpenAI chat or Anthropic Messages): the model,
//! whether to stream, the last user message and how much text the prompt holds.

use serde_json::Value;

/// Model name used when a request names none.
const DEFAULT_MODEL: &str = "demo-1";

/// Which API a request speaks; it decides the fields read and the error body's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// OpenAI chat completions (and everything that is not Anthropic's endpoint).
    OpenAi,
    /// Anthropic Messages, `POST /v1/messages`.
    Anthropic,
}

impl Dialect {
    /// The dialect of a request for `path`.
    pub fn of_path(path: &str) -> Dialect {
        if path == "/v1/messages" {
            Dialect::Anthropic
        } else {
            Dialect::OpenAi
        }
    }
}

/// What the demo needs from a chat request.
#[derive(Debug, PartialEq, Eq)]
pub struct Prompt {
    /// Echoed back in the answer, as providers do.
    pub model: String,
    /// Answer as an event stream.
    pub stream: bool,
    /// OpenAI's `stream_options.include_usage`: a final usage chunk.
    pub include_usage: bool,
    /// The text of the last `user` message: the reply echoes its start.
    pub last_user: String,
    /// Unicode scalar values in every message's text (plus Anthropic's `system`), for the
    /// prompt-token estimate.
    pub prompt_chars: usize,
}

impl Prompt {
    /// Reads a request body; the error is the message for a 400 answer.
    pub fn parse(body: &[u8], dialect: Dialect) -> Result<Prompt, String> {
        // serde_json bounds nesting (128 levels), so a deep body is an error, not a stack
        // overflow; with duplicate keys the last one wins.
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| format!("We could not parse the JSON body of your request: {e}"))?;
        if !v.is_object() {
            return Err("the request body must be a JSON object".into());
        }
        let model = match v.get("model") {
            None | Some(Value::Null) => DEFAULT_MODEL.to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err("'model' must be a string".into()),
        };
        let stream = match v.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err("'stream' must be a boolean".into()),
        };
        let include_usage = dialect == Dialect::OpenAi
            && v.pointer("/stream_options/include_usage") == Some(&Value::Bool(true));
        let Some(messages) = v.get("messages").and_then(Value::as_array) else {
            return Err("'messages' is a required property and must be an array".into());
        };
        let mut prompt_chars = 0;
        if dialect == Dialect::Anthropic {
            if let Some(system) = v.get("system") {
                prompt_chars += content_text(system).chars().count();
            }
        }
        let mut last_user = String::new();
        for m in messages {
            let text = m.get("content").map(content_text).unwrap_or_default();
            prompt_chars += text.chars().count();
            if m.get("role").and_then(Value::as_str) == Some("user") {
                last_user = text;
            }
        }
        Ok(Prompt {
            model,
            stream,
            include_usage,
            last_user,
            prompt_chars,
        })
    }
}

/// The text of a message `content`: a string, or the `text` of each part of an array
/// (OpenAI content parts and Anthropic content blocks both use `text`), joined by newlines.
fn content_text(c: &Value) -> String {
    match c {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str, dialect: Dialect) -> Result<Prompt, String> {
        Prompt::parse(body.as_bytes(), dialect)
    }

    #[test]
    fn fields_defaults_and_content_parts() {
        let p = parse(
            r#"{"messages":[{"role":"user","content":"first"},{"role":"assistant","content":"ok"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"x"}},{"type":"text","text":"é"}]}]}"#,
            Dialect::OpenAi,
        )
        .unwrap();
        assert_eq!(
            p,
            Prompt {
                model: "demo-1".into(),
                stream: false,
                include_usage: false,
                last_user: "a\né".into(),
                prompt_chars: 5 + 2 + 3,
            }
        );
        let p = parse(
            r#"{"model":null,"stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
            Dialect::OpenAi,
        )
        .unwrap();
        assert!(p.stream && p.include_usage && p.model == "demo-1");
        // include_usage is OpenAI's; only a real `true` turns it on.
        let body = r#"{"stream_options":{"include_usage":"yes"},"messages":[]}"#;
        assert!(!parse(body, Dialect::OpenAi).unwrap().include_usage);
        let body = r#"{"stream_options":{"include_usage":true},"messages":[]}"#;
        assert!(!parse(body, Dialect::Anthropic).unwrap().include_usage);
    }

    #[test]
    fn anthropic_system_counts_toward_the_prompt() {
        let body = r#"{"system":[{"type":"text","text":"Be brief."}],"messages":[{"role":"user","content":"Hi"}]}"#;
        assert_eq!(parse(body, Dialect::Anthropic).unwrap().prompt_chars, 11);
        assert_eq!(parse(body, Dialect::OpenAi).unwrap().prompt_chars, 2);
    }

    #[test]
    fn json_reading_is_strict_where_it_must_be() {
        // Duplicate keys: the last wins. Escapes are decoded.
        let body = r#"{"messages":"x","messages":[{"role":"user","content":"q\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00"}]}"#;
        let p = parse(body, Dialect::OpenAi).unwrap();
        assert_eq!(p.last_user, "q\"\\/\u{8}\u{c}\n\r\té😀");
        for bad in [
            "",
            "{",
            "[1,]",
            "{\"a\" 1}",
            "not json",
            "[]",
            "\u{0}",
            r#"{"messages":"x"}"#,
            r#"{"messages":[],"stream":"yes"}"#,
            r#"{"messages":[],"model":1}"#,
            "{\"messages\":[],\"x\":\"\u{1}\"}",
            r#"{"messages":[],"x":"\ud800"}"#,
            "{}{}",
        ] {
            assert!(parse(bad, Dialect::OpenAi).is_err(), "{bad:?}");
        }
        assert!(Prompt::parse(b"{\"messages\":[]}\xff", Dialect::OpenAi).is_err());
        // Deep nesting is an error, not a stack overflow.
        let deep = format!(r#"{{"messages":[],"x":{}}}"#, "[".repeat(100_000));
        assert!(parse(&deep, Dialect::OpenAi).is_err());
        let ok = format!(
            r#"{{"messages":[],"x":{}{}}}"#,
            "[".repeat(100),
            "]".repeat(100)
        );
        assert!(parse(&ok, Dialect::OpenAi).is_ok());
    }
}
