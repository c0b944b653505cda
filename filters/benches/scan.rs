//! Micro-benchmarks of the sans-IO scanners, in bytes per second (criterion reports ns per
//! iteration and throughput; ns per byte = 1e9 / bytes-per-second).
//!
//! `cargo bench -p ringway-filters --bench scan`

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ringway_filters::{
    model::ModelScanner,
    sse::{SseItem, SseParser},
    usage::{JsonUsageScanner, UsageTracker},
};

/// An OpenAI chat completion stream like the one `benches/backend/sse_backend.py` sends:
/// `frames` content chunks with `"usage":null`, the usage-only chunk and `[DONE]`.
fn chat_stream(frames: usize) -> Vec<u8> {
    let mut s = String::new();
    for i in 0..frames {
        let finish = if i + 1 == frames { "\"stop\"" } else { "null" };
        s.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"system_fingerprint\":\"fp_44709d6fcb\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" token{i}\"}},\"logprobs\":null,\"finish_reason\":{finish}}}],\"usage\":null}}\n\n"
        ));
    }
    s.push_str("data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":200,\"total_tokens\":209}}\n\n");
    s.push_str("data: [DONE]\n\n");
    s.into_bytes()
}

/// An Anthropic Messages stream with `frames` text deltas.
fn anthropic_stream(frames: usize) -> Vec<u8> {
    let mut s = String::from("event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4\",\"content\":[],\"stop_reason\":null,\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n");
    for i in 0..frames {
        s.push_str(&format!("event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\" token{i}\"}}}}\n\n"));
    }
    s.push_str("event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":200}}\n\n");
    s.push_str("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
    s.into_bytes()
}

/// Feeds `stream` in reads of `read` bytes, as the engine would.
fn parse_and_track(stream: &[u8], read: usize, track: bool) -> u64 {
    let mut p = SseParser::new(256 * 1024);
    let mut t = UsageTracker::new();
    let mut frames = 0u64;
    for piece in stream.chunks(read) {
        p.feed_items(piece, &mut |item| {
            if let SseItem::End(f) = item {
                frames += 1;
                if let (true, Some(ev)) = (track, f.event) {
                    black_box(t.on_event(&ev));
                }
            }
        });
    }
    black_box(t.usage(0));
    frames
}

fn sse(c: &mut Criterion) {
    let mut g = c.benchmark_group("sse");
    for (name, stream) in [
        ("openai-chat", chat_stream(200)),
        ("anthropic", anthropic_stream(200)),
    ] {
        g.throughput(Throughput::Bytes(stream.len() as u64));
        g.bench_function(format!("{name}/parse"), |b| {
            b.iter(|| parse_and_track(black_box(&stream), 16 * 1024, false))
        });
        g.bench_function(format!("{name}/parse+usage"), |b| {
            b.iter(|| parse_and_track(black_box(&stream), 16 * 1024, true))
        });
    }
    g.finish();
}

/// A chat request with an 8 MB base64 image before `"model"`.
fn big_request() -> Vec<u8> {
    let image = "A".repeat(8 * 1024 * 1024);
    format!("{{\"messages\":[{{\"role\":\"user\",\"content\":[{{\"type\":\"text\",\"text\":\"What is in this image?\"}},{{\"type\":\"image_url\",\"image_url\":{{\"url\":\"data:image/png;base64,{image}\"}}}}]}}],\"stream\":true,\"max_tokens\":300,\"model\":\"gpt-4o\"}}").into_bytes()
}

fn scanners(c: &mut Criterion) {
    let req = big_request();
    let mut g = c.benchmark_group("scan");
    g.throughput(Throughput::Bytes(req.len() as u64));
    g.sample_size(20);
    g.bench_function("model/8MB-image-request", |b| {
        b.iter(|| {
            let mut s = ModelScanner::new();
            for piece in req.chunks(16 * 1024) {
                black_box(s.feed(piece));
            }
            black_box(s.finish())
        })
    });
    let mut resp = String::from("{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"");
    resp.push_str(&"lorem ipsum \\\"quoted\\\" dolor ".repeat(20_000));
    resp.push_str("\"},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":12,\"total_tokens\":21}}");
    let resp = resp.into_bytes();
    g.throughput(Throughput::Bytes(resp.len() as u64));
    g.bench_function("usage/json-response", |b| {
        b.iter(|| {
            let mut s = JsonUsageScanner::new();
            for piece in resp.chunks(16 * 1024) {
                s.feed(piece);
            }
            s.finish();
            black_box(s.usage())
        })
    });
    g.finish();
}

criterion_group!(benches, sse, scanners);
criterion_main!(benches);
