//! OpenAI's API as the demo serves it: `POST /v1/chat/completions` (streamed or not, with
//! `stream_options.include_usage`), `GET /v1/models` and the error body.
//!
//! Bodies are serde structs, so fields go out in OpenAI's order.

use std::io::{self, Write};
use std::thread;

use serde::Serialize;

use super::http::{After, ConnMode, EventStream, Response};
use super::prompt::{Dialect, Prompt};
use super::reply::{self, Reply, WORD_DELAY};

/// OpenAI's error body: `{"error":{"message","type","param","code"}}`.
#[derive(Serialize)]
pub struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    /// The offending parameter, where one is to blame.
    param: Option<&'a str>,
    code: &'a str,
}

impl<'a> ErrorBody<'a> {
    /// An error with no `param`.
    pub fn new(message: &'a str, kind: &'a str, code: &'a str) -> Self {
        Self::with_param(message, kind, code, None)
    }

    /// An error that names the parameter at fault.
    pub fn with_param(
        message: &'a str,
        kind: &'a str,
        code: &'a str,
        param: Option<&'a str>,
    ) -> Self {
        ErrorBody {
            error: ErrorDetail {
                message,
                kind,
                param,
                code,
            },
        }
    }
}

#[derive(Serialize, Clone, Copy)]
struct Usage {
    prompt_tokens: usize,
    completion_tokens: usize,
    total_tokens: usize,
}

impl Usage {
    fn of(r: &Reply) -> Usage {
        let (prompt_tokens, completion_tokens) = (r.prompt_tokens, r.completion_tokens());
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [Choice<'a>; 1],
    usage: Usage,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    message: Message<'a>,
    /// Always null: the demo has no log probabilities.
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: Option<()>,
    /// One choice, or none in the final usage chunk.
    choices: &'a [ChunkChoice<'a>],
    /// Absent without include_usage; with it, null on every chunk but the usage chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Usage>>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

/// The first delta carries the role and an empty content, word deltas the content, the last
/// nothing at all.
#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

#[derive(Serialize)]
struct ModelList {
    object: &'static str,
    data: [Model; 2],
}

#[derive(Serialize)]
struct Model {
    id: &'static str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

/// `GET /v1/models`: the two demo models.
pub fn models(w: &mut impl Write, mode: ConnMode) -> io::Result<After> {
    let model = |id| Model {
        id,
        object: "model",
        created: 1_700_000_000,
        owned_by: "ringway",
    };
    let list = ModelList {
        object: "list",
        data: [model("demo-1"), model("demo-2")],
    };
    Response::json(200, &list)?.write(w, mode)
}

/// `POST /v1/chat/completions`: the reply whole, or streamed one word per chunk.
pub fn chat_completions(w: &mut impl Write, mode: ConnMode, body: &[u8]) -> io::Result<After> {
    let p = match Prompt::parse(body, Dialect::OpenAi) {
        Ok(p) => p,
        Err(msg) => {
            let e = ErrorBody::new(&msg, "invalid_request_error", "invalid_request");
            return Response::json(400, &e)?.write(w, mode);
        }
    };
    let id = format!("chatcmpl-ringwaydemo{}", reply::next_id());
    let created = reply::now_secs();
    let r = Reply::to(&p);
    if !p.stream {
        let completion = Completion {
            id: &id,
            object: "chat.completion",
            created,
            model: &p.model,
            choices: [Choice {
                index: 0,
                message: Message {
                    role: "assistant",
                    content: &r.text,
                },
                logprobs: None,
                finish_reason: "stop",
            }],
            usage: Usage::of(&r),
        };
        return Response::json(200, &completion)?.write(w, mode);
    }
    // Exactly OpenAI's convention: with include_usage every chunk carries "usage":null and one
    // extra chunk with empty choices carries the numbers; without it no chunk has the field.
    let usage_null = p.include_usage.then_some(None);
    let chunk = |choices: &[ChunkChoice<'_>], usage: Option<Option<Usage>>| -> io::Result<String> {
        let c = Chunk {
            id: &id,
            object: "chat.completion.chunk",
            created,
            model: &p.model,
            system_fingerprint: None,
            choices,
            usage,
        };
        let json = serde_json::to_string(&c).map_err(io::Error::other)?;
        Ok(format!("data: {json}\n\n"))
    };
    let choice = |delta, finish_reason| ChunkChoice {
        index: 0,
        delta,
        logprobs: None,
        finish_reason,
    };
    let deltas = r.deltas();
    let mut s = EventStream::start(w, mode)?;
    let first = Delta {
        role: Some("assistant"),
        content: Some(""),
    };
    s.frame(&chunk(&[choice(first, None)], usage_null)?)?;
    for (i, d) in deltas.iter().enumerate() {
        if i > 0 {
            thread::sleep(WORD_DELAY);
        }
        let word = Delta {
            role: None,
            content: Some(d),
        };
        s.frame(&chunk(&[choice(word, None)], usage_null)?)?;
    }
    let stop = Delta {
        role: None,
        content: None,
    };
    s.frame(&chunk(&[choice(stop, Some("stop"))], usage_null)?)?;
    if p.include_usage {
        s.frame(&chunk(&[], Some(Some(Usage::of(&r))))?)?;
    }
    s.frame("data: [DONE]\n\n")?;
    s.finish()
}
