//! Server-sent events framing (WHATWG HTML "event stream interpretation"), fed arbitrary slices.
//!
//! The engine forwards an SSE response body as it arrives and passes the same bytes through
//! [`SseParser`], which only *watches*: it never needs the bytes again, and it holds at most
//! `max_frame` bytes of the frame in progress (its `event`/`data` fields and a partial line).
//!
//! # Frame boundaries, and removing one frame
//!
//! A frame is every line up to and including the blank line that ends it. [`SseParser::feed_frames`]
//! reports each completed frame as a [`FrameEnd`] whose `end` is the offset *in the slice just fed*
//! one past the frame's last byte, so the engine can split its forwarding exactly there. When the
//! engine itself injected `stream_options.include_usage` it must remove the usage-only chunk the
//! client never asked for, and it cannot know a frame is that chunk until the frame is complete.
//! The protocol is therefore:
//!
//! 1. Keep `held`: the bytes of the current, incomplete frame (at most `max_frame`, usually none,
//!    since upstreams write whole frames).
//! 2. On each read, call `feed_frames(input, ..)` (or `feed_items`). For each `FrameEnd`, the frame's bytes are
//!    `held ++ input[prev_end..end]`; forward them, or drop them if `frame.event` is the usage-only
//!    chunk ([`crate::usage::is_usage_only_chunk`]). Then `held.clear()`, `prev_end = end`.
//! 3. After the call, `input[prev_end..]` starts the next frame: append it to `held` — unless
//!    [`SseParser::in_oversized_frame`] is true, in which case flush `held` and the tail at once:
//!    an oversized frame is never parsed, so it can never be removed, and holding it would break
//!    the `max_frame` bound.
//!
//! Line endings: a blank line ended by CR LF ends its frame *after the CR*; the LF is counted as
//! the first byte of the next frame (whatever the read boundaries, so results never depend on
//! them). Removing a frame therefore removes `LF? … CR`, and the stream stays well formed: the
//! frame before it also ended in that CR, which the next frame's LF completes.
//!
//! Fields: `data` lines are joined with `\n`; `event` sets the type (empty slice: the default type,
//! "message"); `id`, `retry` and unknown fields are valid and ignored; lines starting with `:` are
//! comments. A frame with no `data` line (comments only, keep-alives) ends with no event, as the
//! standard says. A leading UTF-8 BOM is skipped. `[DONE]` is ordinary data.
//!
//! # Oversized frames
//!
//! A frame longer than `max_frame` is never held or dispatched (it is counted by
//! [`SseParser::unparsed_frames`]), but [`SseParser::feed_items`] still streams its data out as
//! [`SseItem::OversizedData`] pieces, so `usage::UsageTracker::on_oversized_data` can find the
//! usage in a huge Responses API `response.completed` frame (which repeats the whole output)
//! with a bounded streaming scan. The engine should drive the parser with `feed_items`, which
//! reports the same `FrameEnd`s as `feed_frames` plus those pieces.

use memchr::{memchr, memchr2};

/// A dispatched event. Borrowed from the parser; valid only inside the callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// The `event:` field; empty when absent (the standard's default type, "message").
    pub event: &'a [u8],
    /// The `data:` lines joined with `\n`.
    pub data: &'a [u8],
    /// Raw bytes of the whole frame, across reads, including its terminating blank line.
    pub raw_len: usize,
}

/// A completed frame, reported at the point where it ends in the slice just fed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameEnd<'a> {
    /// Offset in the slice passed to [`SseParser::feed_frames`] one past the frame's last byte.
    pub end: usize,
    /// Raw bytes of the whole frame (some may have come in earlier slices).
    pub raw_len: usize,
    /// The event, if the frame had data and fit in `max_frame`.
    pub event: Option<SseEvent<'a>>,
    /// The frame was longer than `max_frame` and was skipped unparsed.
    pub oversized: bool,
}

/// What [`SseParser::feed_items`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SseItem<'a> {
    /// A frame completed.
    End(FrameEnd<'a>),
    /// A piece of the data of a frame longer than `max_frame`, reported as it passes instead of
    /// being held: the pieces of one frame, concatenated, are its data lines joined with `\n`.
    /// A streaming consumer can still read a bounded field out of it (the Responses API's
    /// `response.completed` repeats the whole output, so it often exceeds any `max_frame`, yet
    /// carries the usage). The frame's `End` follows with `oversized: true`.
    OversizedData(&'a [u8]),
}

/// Where [`SseParser::feed_sink`] reports to.
pub trait FrameSink {
    /// A completed frame, or a piece of an oversized frame's data.
    fn item(&mut self, item: SseItem<'_>);

    /// Offered at the start of a frame (`input[at..]`): takes whole frames the sink reads
    /// itself, faster than the parser would, and returns their length (0: none). Taken frames
    /// must be exactly what the parser would have reported had it read them.
    fn run(&mut self, input: &[u8], at: usize) -> usize {
        let _ = (input, at);
        0
    }
}

impl<F: FnMut(SseItem<'_>)> FrameSink for F {
    fn item(&mut self, item: SseItem<'_>) {
        self(item)
    }
}

/// While skipping an oversized frame: where the current line stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OLine {
    /// Reading the field name (only `data` matters, so five bytes are enough to tell).
    Name { buf: [u8; 5], len: u8 },
    /// Just after `data:`: one optional space to skip.
    DataSpace,
    /// Inside a `data` value: bytes stream out.
    Data,
    /// Any other line: ignored.
    Skip,
}

/// UTF-8 byte order mark, which the standard's decoder strips from the start of the stream.
const BOM: &[u8; 3] = b"\xEF\xBB\xBF";

/// Incremental SSE parser. See the module documentation for the hold-back protocol.
#[derive(Debug)]
pub struct SseParser {
    max_frame: usize,
    /// The current line, when it began in an earlier slice.
    line: Vec<u8>,
    /// Raw length of the current line so far (also counted while skipping an oversized frame,
    /// where `line` stays empty): zero at a terminator means a blank line.
    line_len: usize,
    data: Vec<u8>,
    /// The frame's only `data` value so far, still in the slice being fed (`input[a..b]`): the
    /// common one-line frame is dispatched without copying. Copied into `data` before a second
    /// `data` line, an overflow, or the end of the slice.
    data_at: Option<(usize, usize)>,
    event: Vec<u8>,
    /// A `data` field was seen (even an empty one) so the frame dispatches.
    has_data: bool,
    /// Raw bytes of the current frame so far.
    frame_raw: usize,
    /// The previous byte was a CR: a following LF belongs to the same line ending.
    after_cr: bool,
    /// The current frame passed `max_frame`: skip to its end.
    oversized: bool,
    /// Line state while skipping an oversized frame.
    oline: OLine,
    /// BOM bytes matched at the start of the stream; 3 once decided.
    bom: u8,
    unparsed: u64,
}

impl SseParser {
    /// A parser that holds at most `max_frame` bytes of any frame; longer frames are skipped and
    /// counted by [`unparsed_frames`](Self::unparsed_frames).
    pub fn new(max_frame: usize) -> Self {
        Self {
            max_frame,
            line: Vec::new(),
            line_len: 0,
            data: Vec::new(),
            data_at: None,
            event: Vec::new(),
            has_data: false,
            frame_raw: 0,
            after_cr: false,
            oversized: false,
            oline: OLine::Name {
                buf: [0; 5],
                len: 0,
            },
            bom: 0,
            unparsed: 0,
        }
    }

    /// Frames skipped because they were longer than `max_frame`.
    pub fn unparsed_frames(&self) -> u64 {
        self.unparsed
    }

    /// Bytes of the current, incomplete frame seen so far (the engine's `held` length, unless
    /// the frame is oversized).
    pub fn pending_len(&self) -> usize {
        self.frame_raw
    }

    /// The current frame is longer than `max_frame`: it will not be parsed, so the engine must
    /// not hold it back.
    pub fn in_oversized_frame(&self) -> bool {
        self.oversized
    }

    /// Bytes the parser holds now (the bound the module promises: at most `max_frame`).
    pub fn held_bytes(&self) -> usize {
        self.line.len() + self.data.len() + self.event.len()
    }

    /// Feeds the next slice and calls `out` for every event that completes in it.
    pub fn feed(&mut self, input: &[u8], out: &mut impl FnMut(SseEvent<'_>)) {
        self.feed_frames(input, &mut |f: FrameEnd<'_>| {
            if let Some(e) = f.event {
                out(e);
            }
        });
    }

    /// Feeds the next slice and calls `out` for every frame that completes in it, with its end
    /// offset in `input` (see the module documentation).
    pub fn feed_frames(&mut self, input: &[u8], out: &mut impl FnMut(FrameEnd<'_>)) {
        self.feed_items(input, &mut |item: SseItem<'_>| {
            if let SseItem::End(f) = item {
                out(f);
            }
        });
    }

    /// Feeds the next slice and reports both completed frames and, for frames longer than
    /// `max_frame`, their data as it passes (see [`SseItem::OversizedData`]).
    pub fn feed_items(&mut self, input: &[u8], out: &mut impl FnMut(SseItem<'_>)) {
        self.feed_sink(input, out);
    }

    /// The longest frame this parser holds.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// [`feed_items`](Self::feed_items) for a sink that may also take whole frames itself: at
    /// every frame start it is offered the rest of the slice ([`FrameSink::run`]), and the bytes
    /// it takes are neither parsed nor reported.
    pub fn feed_sink(&mut self, input: &[u8], out: &mut impl FrameSink) {
        let mut i = 0;
        while self.bom < 3 && i < input.len() {
            if input[i] == BOM[usize::from(self.bom)] {
                self.bom += 1;
                self.frame_raw += 1;
                i += 1;
            } else {
                // Not a BOM after all: the bytes matched so far are the start of a line.
                let n = usize::from(self.bom);
                self.line.extend_from_slice(&BOM[..n]);
                self.line_len += n;
                self.bom = 3;
            }
        }
        while i < input.len() {
            if self.after_cr {
                self.after_cr = false;
                if input[i] == b'\n' {
                    self.frame_raw += 1;
                    i += 1;
                    continue;
                }
            }
            if self.frame_raw == 0 && input[i] == b'd' {
                // A frame starts here (nothing of it seen, no line ending pending).
                let took = out.run(input, i);
                if took > 0 {
                    i += took;
                    continue;
                }
            }
            let rest = &input[i..];
            // A blank line (every frame's end) needs no search.
            let found = if rest[0] == b'\n' || rest[0] == b'\r' {
                Some(0)
            } else {
                memchr2(b'\n', b'\r', rest)
            };
            let Some(j) = found else {
                // A partial line: keep it (within the bound) until its end arrives.
                self.frame_raw += rest.len();
                self.line_len += rest.len();
                if !self.oversized && self.frame_raw > self.max_frame {
                    self.overflow(input, out);
                }
                if self.oversized {
                    self.skip_line_bytes(rest, out);
                } else {
                    self.line.extend_from_slice(rest);
                }
                self.own_data(input);
                return;
            };
            let blank = self.line_len == 0 && j == 0;
            let line_start = i;
            self.line_len = 0;
            self.frame_raw += j + 1;
            self.after_cr = rest[j] == b'\r';
            i += j + 1;
            if !self.oversized && self.frame_raw > self.max_frame {
                self.overflow(input, out);
            }
            if blank {
                self.end_frame(i, input, out);
            } else if self.oversized {
                self.skip_line_bytes(&rest[..j], out);
                self.skip_line_end(out);
            } else if self.line.is_empty() {
                self.field(input, line_start, line_start + j);
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&rest[..j]);
                self.own_data(input);
                self.field_owned(&line);
                line.clear();
                self.line = line;
            }
        }
        self.own_data(input);
    }

    /// Copies a `data` value still in `input` into the parser, before `input` goes away or
    /// another line joins it.
    fn own_data(&mut self, input: &[u8]) {
        if let Some((a, b)) = self.data_at.take() {
            self.data.extend_from_slice(&input[a..b]);
        }
    }

    /// End of the body. The standard discards an unterminated last frame; this parser instead
    /// dispatches it if it has data (a stream cut after its last `data:` line still carries the
    /// usage the gateway must count, and the client already received those bytes). An
    /// unterminated oversized frame is counted unparsed.
    pub fn finish(&mut self, out: &mut impl FnMut(SseEvent<'_>)) {
        if self.oversized {
            if self.frame_raw > 0 {
                self.unparsed += 1;
            }
        } else {
            if self.line_len > 0 {
                let line = std::mem::take(&mut self.line);
                self.field_owned(&line);
            }
            if self.has_data {
                out(SseEvent {
                    event: &self.event,
                    data: &self.data,
                    raw_len: self.frame_raw,
                });
            }
        }
        self.reset_frame();
        self.line.clear();
        self.line_len = 0;
    }

    /// The current frame passed `max_frame`: hand over the data gathered so far, drop every
    /// buffer, and from here on stream the frame's data instead of holding it.
    fn overflow(&mut self, input: &[u8], out: &mut impl FrameSink) {
        self.own_data(input);
        self.oversized = true;
        if self.has_data && !self.data.is_empty() {
            out.item(SseItem::OversizedData(&self.data));
        }
        self.data.clear();
        self.event.clear();
        // The partial line restarts through the streaming line machine.
        self.oline = OLine::Name {
            buf: [0; 5],
            len: 0,
        };
        let line = std::mem::take(&mut self.line);
        self.skip_line_bytes(&line, out);
    }

    /// Bytes of a line of an oversized frame: find its field name, stream `data` values.
    fn skip_line_bytes(&mut self, mut b: &[u8], out: &mut impl FrameSink) {
        while !b.is_empty() {
            match &mut self.oline {
                OLine::Name { buf, len } => {
                    let c = b[0];
                    b = &b[1..];
                    if c == b':' {
                        if &buf[..usize::from(*len)] == b"data" {
                            self.start_data_line(out);
                            self.oline = OLine::DataSpace;
                        } else {
                            self.oline = OLine::Skip;
                        }
                    } else if usize::from(*len) == buf.len() {
                        self.oline = OLine::Skip;
                    } else {
                        buf[usize::from(*len)] = c;
                        *len += 1;
                    }
                }
                OLine::DataSpace => {
                    if b[0] == b' ' {
                        b = &b[1..];
                    }
                    self.oline = OLine::Data;
                }
                OLine::Data => {
                    out.item(SseItem::OversizedData(b));
                    return;
                }
                OLine::Skip => return,
            }
        }
    }

    /// A line of an oversized frame ended.
    fn skip_line_end(&mut self, out: &mut impl FrameSink) {
        // A bare `data` line (no colon) is a data line with an empty value.
        if let OLine::Name { buf, len: 4 } = self.oline {
            if &buf[..4] == b"data" {
                self.start_data_line(out);
            }
        }
        self.oline = OLine::Name {
            buf: [0; 5],
            len: 0,
        };
    }

    fn start_data_line(&mut self, out: &mut impl FrameSink) {
        if self.has_data {
            out.item(SseItem::OversizedData(b"\n"));
        }
        self.has_data = true;
    }

    fn reset_frame(&mut self) {
        self.data.clear();
        self.data_at = None;
        self.event.clear();
        self.has_data = false;
        self.oversized = false;
        self.frame_raw = 0;
        self.oline = OLine::Name {
            buf: [0; 5],
            len: 0,
        };
    }

    fn end_frame(&mut self, end: usize, input: &[u8], out: &mut impl FrameSink) {
        let raw_len = self.frame_raw;
        if self.oversized {
            self.unparsed += 1;
        }
        let data = match self.data_at {
            Some((a, b)) => &input[a..b],
            None => &self.data[..],
        };
        out.item(SseItem::End(FrameEnd {
            end,
            raw_len,
            event: (self.has_data && !self.oversized).then_some(SseEvent {
                event: &self.event,
                data,
                raw_len,
            }),
            oversized: self.oversized,
        }));
        self.reset_frame();
    }

    /// One complete, non-blank line of the current frame: `input[start..end]`.
    fn field(&mut self, input: &[u8], start: usize, end: usize) {
        let line = &input[start..end];
        if line.first() == Some(&b':') {
            return;
        }
        let (name, value_at) = match line.get(..5) {
            // Nearly every line: no search for the colon.
            Some(b"data:") => (
                &line[..4],
                start + 5 + usize::from(line.get(5) == Some(&b' ')),
            ),
            _ => match memchr(b':', line) {
                Some(c) => (
                    &line[..c],
                    start + c + 1 + usize::from(line.get(c + 1) == Some(&b' ')),
                ),
                None => (line, end),
            },
        };
        if name == b"data" && !self.has_data {
            // Left where it is until the frame ends or the slice does.
            self.data_at = Some((value_at, end));
            self.has_data = true;
            return;
        }
        if name == b"data" {
            self.own_data(input);
        }
        self.field_value(name, &input[value_at..end]);
    }

    /// One complete, non-blank line of the current frame, gathered across slices.
    fn field_owned(&mut self, line: &[u8]) {
        if line.first() == Some(&b':') {
            return;
        }
        let (name, value) = match memchr(b':', line) {
            Some(c) => {
                let v = &line[c + 1..];
                (&line[..c], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        self.field_value(name, value);
    }

    fn field_value(&mut self, name: &[u8], value: &[u8]) {
        match name {
            b"data" => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"event" => {
                self.event.clear();
                self.event.extend_from_slice(value);
            }
            // `id` and `retry` matter to a browser reconnecting, not to the gateway.
            _ => {}
        }
    }
}

/// Recorded streams shared by the SSE and usage tests.
#[cfg(test)]
pub(crate) mod fixtures {
    /// OpenAI chat completions, `stream_options.include_usage`: usage-only last chunk.
    pub const OPENAI_INCLUDE_USAGE: &str = concat!(
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" wörld\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":19,\"completion_tokens\":3,\"total_tokens\":22,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n",
        "data: [DONE]\n\n",
    );

    /// A self-hosted server that sends `"usage": null` in every chunk, then a usage chunk.
    pub const OPENAI_USAGE_NULL: &str = concat!(
        "data: {\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" there\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n",
        "data: [DONE]\n\n",
    );

    /// OpenAI Responses API.
    pub const RESPONSES: &str = concat!(
        "event: response.created\n",
        "data: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"in_progress\",\"model\":\"gpt-4.1\",\"output\":[],\"usage\":null}}\n\n",
        "event: response.output_text.delta\n",
        "data: {\"type\":\"response.output_text.delta\",\"sequence_number\":4,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hi\"}\n\n",
        "event: response.output_text.delta\n",
        "data: {\"type\":\"response.output_text.delta\",\"sequence_number\":5,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\" there!\"}\n\n",
        "event: response.output_text.done\n",
        "data: {\"type\":\"response.output_text.done\",\"sequence_number\":6,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"text\":\"Hi there!\"}\n\n",
        "event: response.completed\n",
        "data: {\"type\":\"response.completed\",\"sequence_number\":9,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"completed\",\"model\":\"gpt-4.1\",\"output\":[{\"type\":\"message\",\"content\":[{\"type\":\"output_text\",\"text\":\"Hi there!\"}]}],\"usage\":{\"input_tokens\":36,\"input_tokens_details\":{\"cached_tokens\":0},\"output_tokens\":87,\"output_tokens_details\":{\"reasoning_tokens\":0},\"total_tokens\":123}}}\n\n",
    );

    /// Anthropic Messages with prompt caching.
    pub const ANTHROPIC: &str = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4\",\"content\":[],\"stop_reason\":null,\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":100,\"cache_read_input_tokens\":2000,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\n",
        "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: ping\n",
        "data: {\"type\": \"ping\"}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"!\"}}\n\n",
        "event: content_block_stop\n",
        "data: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":12}}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n",
        "event: message_stop\n",
        "data: {\"type\":\"message_stop\"}\n\n",
    );

    /// CRLF line endings throughout.
    pub const CRLF: &str = concat!(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\r\n\r\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"bc\"}}]}\r\n\r\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\r\n\r\n",
        "data: [DONE]\r\n\r\n",
    );

    /// Comments, `retry`, `id`, a bare CR line ending, multi-line data, keep-alive frames.
    pub const COMMENTS: &str = concat!(
        ": connected\n\n",
        "retry: 3000\n",
        "id: 1\n",
        "data: {\"choices\":[{\"delta\":\n",
        "data: {\"content\":\"x\"}}]}\n\n",
        ": keep-alive\r\r",
        "id: 2\r",
        ":comment inside a frame\r",
        "data:{\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\r\r",
        "event\n",
        "data\n\n",
        "data: [DONE]\n\n",
    );

    /// Every fixture, for tests that run them all.
    pub const ALL: [&str; 6] = [
        OPENAI_INCLUDE_USAGE,
        OPENAI_USAGE_NULL,
        RESPONSES,
        ANTHROPIC,
        CRLF,
        COMMENTS,
    ];
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    /// (event, data, raw_len, absolute end) for every frame, plus the unparsed count.
    type Trace = (Vec<(String, String, usize, usize)>, u64);

    fn run(stream: &[u8], max: usize, cuts: &[usize]) -> Trace {
        let mut p = SseParser::new(max);
        let mut frames = Vec::new();
        let mut prev = 0;
        let mut big = Vec::new();
        for &c in cuts.iter().chain(std::iter::once(&stream.len())) {
            let base = prev;
            p.feed_items(&stream[prev..c], &mut |item: SseItem<'_>| {
                let f = match item {
                    SseItem::OversizedData(d) => return big.extend_from_slice(d),
                    SseItem::End(f) => f,
                };
                let (e, d) = match f.event {
                    Some(ev) => {
                        assert_eq!(ev.raw_len, f.raw_len);
                        (
                            String::from_utf8_lossy(ev.event).into_owned(),
                            String::from_utf8_lossy(ev.data).into_owned(),
                        )
                    }
                    None if f.oversized => (
                        "<oversized>".into(),
                        String::from_utf8_lossy(&std::mem::take(&mut big)).into_owned(),
                    ),
                    None => ("<none>".into(), String::new()),
                };
                frames.push((e, d, f.raw_len, base + f.end));
            });
            assert!(p.held_bytes() <= max);
            prev = c;
        }
        (frames, p.unparsed_frames())
    }

    /// Whole, split at every offset and at every pair of offsets near CR/LF, one byte at a time.
    fn shotgun(stream: &[u8], max: usize) -> Trace {
        let whole = run(stream, max, &[]);
        for k in 0..=stream.len() {
            assert_eq!(run(stream, max, &[k]), whole, "split at {k}");
        }
        let bytes: Vec<usize> = (1..stream.len()).collect();
        assert_eq!(run(stream, max, &bytes), whole, "byte at a time");
        // Frames tile the stream: each ends where the next begins.
        let mut prev = 0;
        for f in &whole.0 {
            assert_eq!(f.3 - prev, f.2, "raw_len matches the offsets");
            prev = f.3;
        }
        whole
    }

    #[test]
    fn every_fixture_parses_the_same_at_every_split() {
        for s in ALL {
            let (frames, unparsed) = shotgun(s.as_bytes(), 4096);
            assert_eq!(unparsed, 0);
            assert!(frames.iter().any(|f| f.1 == "[DONE]"
                || f.0.starts_with("message_stop")
                || f.0 == "response.completed"));
        }
    }

    #[test]
    fn anthropic_event_types() {
        let (frames, _) = shotgun(ANTHROPIC.as_bytes(), 4096);
        let types: Vec<&str> = frames.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(
            types,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_delta",
                "message_stop"
            ]
        );
    }

    #[test]
    fn comments_retry_cr_and_multiline_data() {
        let (frames, _) = shotgun(COMMENTS.as_bytes(), 4096);
        let got: Vec<(&str, &str)> = frames
            .iter()
            .map(|f| (f.0.as_str(), f.1.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("<none>", ""),
                ("", "{\"choices\":[{\"delta\":\n{\"content\":\"x\"}}]}"),
                ("<none>", ""),
                (
                    "",
                    "{\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}"
                ),
                ("", ""),
                ("", "[DONE]")
            ]
        );
    }

    #[test]
    fn crlf_frames_end_after_the_cr() {
        let (frames, _) = shotgun(CRLF.as_bytes(), 4096);
        assert_eq!(frames.len(), 4);
        let first_len = CRLF.find("\r\n\r\n").map(|i| i + 3);
        assert_eq!(Some(frames[0].3), first_len);
        // The next frame begins with the LF that completes the CR.
        assert_eq!(&CRLF.as_bytes()[frames[0].3..frames[0].3 + 1], b"\n");
    }

    #[test]
    fn oversized_frame_is_counted_and_the_next_one_parses() {
        let big = format!("data: {}\ndata: more\n\ndata: after\n\n", "x".repeat(300));
        let (frames, unparsed) = shotgun(big.as_bytes(), 100);
        assert_eq!(unparsed, 1);
        assert_eq!(frames[0].0, "<oversized>");
        // Its data still streamed out, joined as the standard joins it.
        assert_eq!(frames[0].1, format!("{}\nmore", "x".repeat(300)));
        assert_eq!(frames[1].1, "after");
        // Exactly max_frame is still parsed; one more byte is not.
        let exact = "data: 0123456789\n\n";
        assert_eq!(run(exact.as_bytes(), exact.len(), &[]).1, 0);
        assert_eq!(run(exact.as_bytes(), exact.len() - 1, &[]).1, 1);
    }

    #[test]
    fn oversized_data_equals_what_a_large_max_frame_would_parse() {
        for s in ALL {
            let normal = shotgun(s.as_bytes(), 4096).0;
            for max in [1, 20, 90, 150] {
                let (small, unparsed) = shotgun(s.as_bytes(), max);
                assert_eq!(small.len(), normal.len());
                let mut n = 0;
                for (a, b) in small.iter().zip(&normal) {
                    if a.0 == "<oversized>" {
                        n += 1;
                        let want = if b.0 == "<none>" { "" } else { b.1.as_str() };
                        assert_eq!(a.1, want, "max {max}");
                    } else {
                        assert_eq!(a, b);
                    }
                    assert_eq!((a.2, a.3), (b.2, b.3));
                }
                assert_eq!(n, unparsed);
            }
        }
    }

    #[test]
    fn oversized_frame_reported_to_the_engine_while_in_progress() {
        let mut p = SseParser::new(10);
        p.feed(b"data: 0123456789", &mut |_| {});
        assert!(p.in_oversized_frame());
        assert_eq!(p.held_bytes(), 0);
        let mut n = 0;
        p.feed(b"\n\ndata: ok\n\n", &mut |e| {
            assert_eq!(e.data, b"ok");
            n += 1;
        });
        assert_eq!(
            (n, p.unparsed_frames(), p.in_oversized_frame()),
            (1, 1, false)
        );
    }

    #[test]
    fn bom_is_skipped_and_a_false_bom_is_data() {
        let s = b"\xEF\xBB\xBFdata: a\n\n";
        let (frames, _) = shotgun(s, 100);
        assert_eq!(frames[0].1, "a");
        let (frames, _) = shotgun(b"\xEFdata: a\n\ndata: b\n\n", 100);
        assert_eq!(frames[0].0, "<none>");
        assert_eq!(frames[1].1, "b");
    }

    #[test]
    fn finish_dispatches_an_unterminated_last_frame() {
        let mut p = SseParser::new(100);
        let mut got = Vec::new();
        p.feed(b"data: a\n\ndata: b\ndata: c", &mut |e| {
            got.push(e.data.to_vec())
        });
        p.finish(&mut |e| got.push(e.data.to_vec()));
        assert_eq!(got, [b"a".to_vec(), b"b\nc".to_vec()]);
    }

    /// The engine protocol from the module docs, run at every split: dropping the frames that
    /// match must leave exactly the stream without them.
    #[test]
    fn hold_back_removes_exactly_one_frame() {
        for s in [OPENAI_INCLUDE_USAGE, CRLF, COMMENTS] {
            let bytes = s.as_bytes();
            let is_target = |d: &[u8]| {
                d.starts_with(b"{\"") && memchr::memmem::find(d, b"\"choices\":[]").is_some()
            };
            let reference = {
                let mut out = Vec::new();
                engine(bytes, &[], &is_target, &mut out);
                out
            };
            for k in 0..=bytes.len() {
                for k2 in [k, (k + 1).min(bytes.len()), (k + 7).min(bytes.len())] {
                    let mut out = Vec::new();
                    engine(bytes, &[k, k2], &is_target, &mut out);
                    assert_eq!(out, reference, "cuts {k} {k2}");
                }
            }
            // What the client gets parses to the original events minus the removed one.
            let before: Vec<_> = run(bytes, 4096, &[])
                .0
                .into_iter()
                .filter(|f| !f.0.starts_with('<'))
                .map(|f| f.1)
                .collect();
            let after: Vec<_> = run(&reference, 4096, &[])
                .0
                .into_iter()
                .filter(|f| !f.0.starts_with('<'))
                .map(|f| f.1)
                .collect();
            assert_eq!(after.len() + 1, before.len(), "{s}");
            assert!(before
                .iter()
                .filter(|d| !is_target(d.as_bytes()))
                .eq(after.iter()));
        }
    }

    fn engine(stream: &[u8], cuts: &[usize], drop: &dyn Fn(&[u8]) -> bool, out: &mut Vec<u8>) {
        let mut p = SseParser::new(4096);
        let mut held = Vec::new();
        let mut prev = 0;
        for &c in cuts.iter().chain(std::iter::once(&stream.len())) {
            let input = &stream[prev..c.max(prev)];
            prev = c.max(prev);
            let mut from = 0;
            p.feed_frames(input, &mut |f: FrameEnd<'_>| {
                if !f.event.is_some_and(|e| drop(e.data)) {
                    out.extend_from_slice(&held);
                    out.extend_from_slice(&input[from..f.end]);
                }
                held.clear();
                from = f.end;
            });
            if p.in_oversized_frame() {
                out.extend_from_slice(&held);
                out.extend_from_slice(&input[from..]);
                held.clear();
            } else {
                held.extend_from_slice(&input[from..]);
            }
        }
        out.extend_from_slice(&held);
    }
}
