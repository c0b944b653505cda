//! Cross-module tests: no input may make the parsers panic.

use std::mem::MaybeUninit;

use super::*;

/// A tiny deterministic xorshift64 generator, so failures reproduce.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Fragments that steer random inputs into the interesting parts of the grammar.
const FRAGMENTS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"OPTIONS ",
    b"CONNECT ",
    b"/",
    b"*",
    b"http://a/",
    b" HTTP/1.1",
    b" HTTP/1.0",
    b"HTTP/1.1 200 OK",
    b"\r\n",
    b"\r",
    b"\n",
    b"Host: a",
    b"Content-Length: ",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: ",
    b"Connection: ",
    b"close, keep-alive, upgrade",
    b"Upgrade: x",
    b"Expect: 100-continue",
    b": ",
    b":",
    b" ",
    b"\t",
    b",",
    b";",
    b"=",
    b"\"",
    b"\\",
    b"0",
    b"5",
    b"f",
    b"FFFFFFFFFFFFFFFF",
    b"\0",
    b"\x7f",
    b"\xff",
];

/// Header lines for structured request and response heads.
const HEADER_LINES: &[&[u8]] = &[
    b"Host: a.example\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: 0\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Connection: close\r\n",
    b"Connection: keep-alive, Upgrade\r\n",
    b"Upgrade: websocket\r\n",
    b"Expect: 100-continue\r\n",
    b"X-A: b\r\n",
];

/// Pieces of chunked bodies.
const CHUNK_PIECES: &[&[u8]] = &[
    b"5\r\nhello\r\n",
    b"1;a=b\r\nx\r\n",
    b"3;q=\"v\"\r\nabc\r\n",
    b"0\r\n",
    b"T: 1\r\n",
    b"\r\n",
];

/// Writes a random input: fragment soup, a structured request or response
/// head, or a structured chunked body, then flips a few bytes.
fn random_input(rng: &mut XorShift, out: &mut Vec<u8>) {
    out.clear();
    match rng.below(4) {
        0 => {
            for _ in 0..rng.below(24) {
                if rng.below(4) == 0 {
                    out.push(rng.next() as u8);
                } else {
                    out.extend_from_slice(FRAGMENTS[rng.below(FRAGMENTS.len())]);
                }
            }
        }
        1 | 2 => {
            let start: &[&[u8]] = &[
                b"GET / HTTP/1.1\r\n",
                b"POST http://a/x HTTP/1.1\r\n",
                b"OPTIONS * HTTP/1.0\r\n",
                b"HTTP/1.1 200 OK\r\n",
                b"HTTP/1.0 204 No Content\r\n",
            ];
            out.extend_from_slice(start[rng.below(start.len())]);
            for _ in 0..rng.below(6) {
                out.extend_from_slice(HEADER_LINES[rng.below(HEADER_LINES.len())]);
            }
            out.extend_from_slice(b"\r\n");
        }
        _ => {
            for _ in 0..rng.below(8) {
                out.extend_from_slice(CHUNK_PIECES[rng.below(CHUNK_PIECES.len())]);
            }
        }
    }
    // Mutate: a few replaced, inserted or removed bytes; sometimes none.
    for _ in 0..rng.below(4) {
        if out.is_empty() {
            break;
        }
        let at = rng.below(out.len());
        match rng.below(3) {
            0 => out[at] = rng.next() as u8,
            1 => out.insert(at, b"\r\n \t:;\"0"[rng.below(8)]),
            _ => {
                out.remove(at);
            }
        }
    }
}

#[test]
fn random_inputs_never_panic() {
    let limits = Limits {
        max_header_bytes: 256,
        max_headers: 8,
    };
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut input = Vec::new();
    for _ in 0..20_000 {
        random_input(&mut rng, &mut input);

        let mut headers = [const { MaybeUninit::uninit() }; 8];
        if let Ok(Parsed::Complete(head)) = parse_request(&input, &mut headers, &limits) {
            assert!(head.head_len <= input.len());
            let _ = split_absolute_form(head.target);
        }
        let mut headers = [const { MaybeUninit::uninit() }; 8];
        if let Ok(Parsed::Complete(head)) = parse_response(&input, &mut headers, &limits, false) {
            assert!(head.head_len <= input.len());
        }

        let max_body = match rng.below(2) {
            0 => rng.next() % 64,
            _ => u64::MAX,
        };
        let mut dec = ChunkedDecoder::new(max_body);
        let split = rng.below(input.len() + 1);
        let mut payload = 0u64;
        let mut fed = 0;
        for piece in [&input[..split], &input[split..]] {
            let mut on_data = |r: std::ops::Range<usize>| {
                assert!(r.end <= piece.len());
                payload += r.len() as u64;
            };
            match dec.decode(piece, &mut on_data) {
                Ok(p) => {
                    assert!(p.consumed <= piece.len());
                    fed += p.consumed;
                    if p.done {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        assert!(fed <= input.len());
        assert!(payload <= max_body);
        assert_eq!(payload, dec.body_bytes());
    }
}
