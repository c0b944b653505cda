//! Anthropic's Messages API as the demo serves it: `POST /v1/messages` (streamed or not) and
//! Anthropic's error body.
//!
//! Bodies are serde structs, so fields go out in Anthropic's order.

use std::io::{self, Write};
use std::thread;

use serde::Serialize;

use super::http::{After, ConnMode, EventStream, Response};
use super::prompt::{Dialect, Prompt};
use super::reply::{self, Reply, WORD_DELAY};

/// Anthropic's error body: `{"type":"error","error":{"type","message"}}`.
#[derive(Serialize)]
pub struct ErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
}

impl<'a> ErrorBody<'a> {
    /// An error of Anthropic type `kind` (`invalid_request_error`, `rate_limit_error`, …).
    pub fn new(kind: &'a str, message: &'a str) -> Self {
        ErrorBody {
            kind: "error",
            error: ErrorDetail { kind, message },
        }
    }
}

#[derive(Serialize)]
struct Message<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    /// The whole reply, or empty in `message_start` (it follows in deltas).
    content: &'a [TextBlock<'a>],
    stop_reason: Option<&'static str>,
    stop_sequence: Option<&'static str>,
    usage: Usage,
}

#[derive(Serialize)]
struct Usage {
    input_tokens: usize,
    output_tokens: usize,
}

#[derive(Serialize)]
struct TextBlock<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

#[derive(Serialize)]
struct StopDelta {
    stop_reason: &'static str,
    stop_sequence: Option<&'static str>,
}

#[derive(Serialize)]
struct OutputUsage {
    output_tokens: usize,
}

/// One streamed event; its `type` is also the SSE event name.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event<'a> {
    MessageStart {
        message: Message<'a>,
    },
    ContentBlockStart {
        index: u32,
        content_block: TextBlock<'a>,
    },
    ContentBlockDelta {
        index: u32,
        delta: TextBlock<'a>,
    },
    ContentBlockStop {
        index: u32,
    },
    MessageDelta {
        delta: StopDelta,
        usage: OutputUsage,
    },
    MessageStop,
}

impl Event<'_> {
    fn name(&self) -> &'static str {
        match self {
            Event::MessageStart { .. } => "message_start",
            Event::ContentBlockStart { .. } => "content_block_start",
            Event::ContentBlockDelta { .. } => "content_block_delta",
            Event::ContentBlockStop { .. } => "content_block_stop",
            Event::MessageDelta { .. } => "message_delta",
            Event::MessageStop => "message_stop",
        }
    }

    /// The event as one SSE frame.
    fn frame(&self) -> io::Result<String> {
        let data = serde_json::to_string(self).map_err(io::Error::other)?;
        Ok(format!("event: {}\ndata: {data}\n\n", self.name()))
    }
}

/// `POST /v1/messages`: the reply whole, or streamed one word per `content_block_delta`.
pub fn messages(w: &mut impl Write, mode: ConnMode, body: &[u8]) -> io::Result<After> {
    let p = match Prompt::parse(body, Dialect::Anthropic) {
        Ok(p) => p,
        Err(msg) => {
            // Anthropic clients expect Anthropic's error shape on this endpoint.
            let e = ErrorBody::new("invalid_request_error", &msg);
            return Response::json(400, &e)?.write(w, mode);
        }
    };
    let id = format!("msg_ringwaydemo{}", reply::next_id());
    let r = Reply::to(&p);
    let output_tokens = r.completion_tokens();
    if !p.stream {
        let message = Message {
            id: &id,
            kind: "message",
            role: "assistant",
            model: &p.model,
            content: &[TextBlock {
                kind: "text",
                text: &r.text,
            }],
            stop_reason: Some("end_turn"),
            stop_sequence: None,
            usage: Usage {
                input_tokens: r.prompt_tokens,
                output_tokens,
            },
        };
        return Response::json(200, &message)?.write(w, mode);
    }
    let mut s = EventStream::start(w, mode)?;
    // As Anthropic does: input tokens in message_start (output_tokens starts at 1), the final
    // output count in message_delta.
    let start = Event::MessageStart {
        message: Message {
            id: &id,
            kind: "message",
            role: "assistant",
            model: &p.model,
            content: &[],
            stop_reason: None,
            stop_sequence: None,
            usage: Usage {
                input_tokens: r.prompt_tokens,
                output_tokens: 1,
            },
        },
    };
    s.frame(&start.frame()?)?;
    let block = TextBlock {
        kind: "text",
        text: "",
    };
    let block_start = Event::ContentBlockStart {
        index: 0,
        content_block: block,
    };
    s.frame(&block_start.frame()?)?;
    for (i, d) in r.deltas().iter().enumerate() {
        if i > 0 {
            thread::sleep(WORD_DELAY);
        }
        let delta = Event::ContentBlockDelta {
            index: 0,
            delta: TextBlock {
                kind: "text_delta",
                text: d,
            },
        };
        s.frame(&delta.frame()?)?;
    }
    s.frame(&Event::ContentBlockStop { index: 0 }.frame()?)?;
    let message_delta = Event::MessageDelta {
        delta: StopDelta {
            stop_reason: "end_turn",
            stop_sequence: None,
        },
        usage: OutputUsage { output_tokens },
    };
    s.frame(&message_delta.frame()?)?;
    s.frame(&Event::MessageStop.frame()?)?;
    s.finish()
}
