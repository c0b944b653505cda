//! Micro-benchmarks of the HTTP/1.1 codec: head parsing and chunked decoding, as throughput
//! (ns per byte = 1e9 / bytes per second).
//!
//! `cargo bench --bench h1`

use std::mem::MaybeUninit;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ringway::h1::{parse_request, parse_response, ChunkedDecoder, Limits, Parsed};

/// A browser-like request head (about 700 bytes, 12 fields).
const REQUEST: &[u8] = b"GET /api/v1/users/12345/orders?limit=50&cursor=eyJpZCI6MTIzfQ HTTP/1.1\r\n\
Host: api.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36\r\n\
Accept: application/json, text/plain, */*\r\n\
Accept-Language: en-US,en;q=0.9\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Authorization: Bearer sk-live-0123456789abcdef0123456789abcdef\r\n\
Cookie: session=3f9a1c2b7d; theme=dark; _ga=GA1.2.1234567890.1700000000\r\n\
X-Request-Id: 7b1f2d3e-4c5a-6b7c-8d9e-0f1a2b3c4d5e\r\n\
X-Forwarded-For: 203.0.113.7\r\n\
Connection: keep-alive\r\n\
Cache-Control: no-cache\r\n\
\r\n";

/// The small-GET request wrk sends.
const SMALL: &[u8] = b"GET /hello HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n";

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\n\
Server: nginx\r\n\
Date: Sun, 22 Nov 2026 21:00:00 GMT\r\n\
Content-Type: application/json; charset=utf-8\r\n\
Content-Length: 13\r\n\
Connection: keep-alive\r\n\
Cache-Control: private, max-age=0\r\n\
X-Request-Id: 7b1f2d3e-4c5a-6b7c-8d9e-0f1a2b3c4d5e\r\n\
\r\n";

fn heads(c: &mut Criterion) {
    let limits = Limits::default();
    let mut g = c.benchmark_group("head");
    for (name, req) in [("request-700B", REQUEST), ("request-small", SMALL)] {
        g.throughput(Throughput::Bytes(req.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut storage = [MaybeUninit::uninit(); 100];
                match parse_request(black_box(req), &mut storage, &limits) {
                    Ok(Parsed::Complete(h)) => h.head_len,
                    _ => unreachable!("the benchmark's request parses"),
                }
            })
        });
    }
    g.throughput(Throughput::Bytes(RESPONSE.len() as u64));
    g.bench_function("response", |b| {
        b.iter(|| {
            let mut storage = [MaybeUninit::uninit(); 100];
            match parse_response(black_box(RESPONSE), &mut storage, &limits, false) {
                Ok(Parsed::Complete(h)) => h.head_len,
                _ => unreachable!("the benchmark's response parses"),
            }
        })
    });
    g.finish();
}

/// `n` chunks of `size` bytes, then the last chunk.
fn chunked(n: usize, size: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.extend_from_slice(format!("{size:x}\r\n").as_bytes());
        v.extend(std::iter::repeat_n(b'x', size));
        v.extend_from_slice(b"\r\n");
    }
    v.extend_from_slice(b"0\r\n\r\n");
    v
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("chunked");
    // SSE-like (one small frame per chunk) and bulk (16 KiB chunks).
    for (name, body) in [
        ("150B-chunks", chunked(1000, 150)),
        ("16KiB-chunks", chunked(64, 16 * 1024)),
    ] {
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut d = ChunkedDecoder::new(u64::MAX);
                let mut payload = 0usize;
                for read in black_box(&body).chunks(16 * 1024) {
                    let p = d.decode(read, &mut |r| payload += r.len());
                    if p.is_err() {
                        unreachable!("the benchmark's body decodes");
                    }
                }
                payload
            })
        });
    }
    g.finish();
}

criterion_group!(benches, heads, decode);
criterion_main!(benches);
