//! Content codings of response bodies (RFC 9110 §8.4): which coding a `Content-Encoding` field
//! names, and a streaming [`Decoder`] for gzip, deflate and br.
//!
//! The engine asks AI upstreams for `identity`, but an upstream may compress anyway. Its bytes
//! then go to the client unchanged, and a decoded copy goes to the usage scanners, so the tokens
//! a compressed reply reports are still counted. The decoder never holds the body: it keeps the
//! coding's own state (the deflate window, 32 KiB; br's ring buffer, which grows with the output
//! up to the window the stream declares, at most 16 MiB as large windows are refused) and one
//! output buffer of [`OUT_CHUNK`] bytes, handed to a callback each time it fills.

use std::fmt;

use brotli_decompressor::{BrotliDecompressStream, BrotliResult, BrotliState, StandardAlloc};
use flate2::{Decompress, FlushDecompress, Status};

/// Bytes of decoded output handed to the callback at most at a time.
pub const OUT_CHUNK: usize = 16 * 1024;

/// Most bytes one body is decoded to. Usage sits in a JSON reply or an event stream of at
/// most a few MiB; past this, decoding (CPU on the worker) stops and the usage is estimated.
pub const MAX_DECODED: u64 = 64 * 1024 * 1024;

/// The content coding of a body, from its `Content-Encoding` field(s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentCoding {
    /// No coding (no field, or only `identity`).
    Identity,
    /// `gzip` (or its alias `x-gzip`): RFC 1952.
    Gzip,
    /// `deflate`: a zlib stream (RFC 1950), or the raw deflate (RFC 1951) some servers send.
    Deflate,
    /// `br`: Brotli (RFC 7932).
    Br,
    /// Any other coding, or several codings stacked: not decoded.
    Unsupported,
}

impl ContentCoding {
    /// The coding named by the values of every `Content-Encoding` field of a message, in order.
    /// Codings are listed in the order they were applied; more than one (other than `identity`)
    /// is [`ContentCoding::Unsupported`], as no real provider stacks them.
    pub fn from_fields<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> ContentCoding {
        let mut found = ContentCoding::Identity;
        for value in values {
            for name in value.split(|&b| b == b',') {
                let name = name.trim_ascii();
                let this = if name.is_empty() || name.eq_ignore_ascii_case(b"identity") {
                    continue;
                } else if name.eq_ignore_ascii_case(b"gzip") || name.eq_ignore_ascii_case(b"x-gzip")
                {
                    ContentCoding::Gzip
                } else if name.eq_ignore_ascii_case(b"deflate") {
                    ContentCoding::Deflate
                } else if name.eq_ignore_ascii_case(b"br") {
                    ContentCoding::Br
                } else {
                    ContentCoding::Unsupported
                };
                found = match found {
                    ContentCoding::Identity => this,
                    _ => ContentCoding::Unsupported,
                };
            }
        }
        found
    }

    /// A decoder for this coding; `None` for `Identity` (nothing to decode) and `Unsupported`.
    pub fn decoder(self) -> Option<Decoder> {
        let kind = match self {
            ContentCoding::Gzip => Kind::Gzip {
                phase: GzPhase::Header(GzHeader::default()),
                inflate: Box::new(Decompress::new(false)),
            },
            ContentCoding::Deflate => Kind::Deflate {
                first: None,
                inflate: None,
            },
            ContentCoding::Br => Kind::Br(Box::new(BrotliState::new_strict(
                StandardAlloc::default(),
                StandardAlloc::default(),
                StandardAlloc::default(),
            ))),
            ContentCoding::Identity | ContentCoding::Unsupported => return None,
        };
        Some(Decoder {
            kind,
            out: vec![0; OUT_CHUNK].into_boxed_slice(),
            error: None,
            done: false,
            decoded: 0,
        })
    }
}

/// Why a coded body could not be decoded (what was decoded before the error still counts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Not a gzip member header (wrong magic bytes, method or reserved flags).
    GzipHeader,
    /// The deflate data (inside gzip, zlib or raw) is corrupt.
    Deflate,
    /// The br stream is corrupt, or declares a window larger than 16 MiB.
    Brotli,
    /// The body decodes to more than [`MAX_DECODED`] bytes (a decompression bomb, or a reply
    /// far larger than any usage report sits in): decoding stops, the usage is estimated.
    TooLarge,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DecodeError::GzipHeader => "not a gzip member header",
            DecodeError::Deflate => "corrupt deflate data",
            DecodeError::Brotli => "corrupt br data",
            DecodeError::TooLarge => "decodes to more than the decoding limit",
        })
    }
}

impl std::error::Error for DecodeError {}

/// Streaming decoder of one coded body: fed the coded bytes as they arrive, in any pieces, it
/// hands the decoded bytes to a callback. Bytes after the end of the coded stream are ignored.
pub struct Decoder {
    kind: Kind,
    /// Decoded bytes not yet handed over; reused for every piece.
    out: Box<[u8]>,
    /// The first error; later input is ignored and the error returned again.
    error: Option<DecodeError>,
    /// The coded stream ended.
    done: bool,
    /// Bytes decoded so far (bounded by [`MAX_DECODED`]).
    decoded: u64,
}

impl fmt::Debug for Decoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decoder")
            .field("error", &self.error)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

enum Kind {
    Gzip {
        phase: GzPhase,
        /// Raw deflate: gzip's own header and trailer are read by [`GzHeader`] and skipped.
        inflate: Box<Decompress>,
    },
    Deflate {
        /// The first byte, kept until the second tells a zlib header from raw deflate.
        first: Option<u8>,
        inflate: Option<Box<Decompress>>,
    },
    Br(Box<BrotliState<StandardAlloc, StandardAlloc, StandardAlloc>>),
}

/// Where a gzip stream is: RFC 1952 members, each a header, deflate data and an 8-byte trailer
/// (CRC-32 and size, not checked: the bytes reach the client unchanged and it checks them).
enum GzPhase {
    Header(GzHeader),
    Data,
    /// Trailer bytes still to skip.
    Trailer(u8),
    /// Between members: a next member starts with 0x1f, anything else ends the stream.
    Between,
}

/// Incremental parse of a gzip member header (RFC 1952 §2.3), byte by byte: it is a few bytes
/// long and may be split anywhere.
#[derive(Default)]
struct GzHeader {
    /// Bytes of the fixed 10-byte part seen.
    fixed: u8,
    flags: u8,
    step: GzStep,
    /// Bytes left of the current step (FEXTRA's length field, its data, the header CRC).
    left: u16,
    /// The low byte of FEXTRA's length, until the high one arrives.
    xlen_lo: u8,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum GzStep {
    #[default]
    Fixed,
    ExtraLen,
    Extra,
    Name,
    Comment,
    Crc,
}

const FHCRC: u8 = 0x02;
const FEXTRA: u8 = 0x04;
const FNAME: u8 = 0x08;
const FCOMMENT: u8 = 0x10;
const FRESERVED: u8 = 0xe0;

impl GzHeader {
    /// Reads header bytes from `input`; returns how many it took and whether the header ended.
    fn feed(&mut self, input: &[u8]) -> Result<(usize, bool), DecodeError> {
        for (i, &b) in input.iter().enumerate() {
            match self.step {
                GzStep::Fixed => {
                    let ok = match self.fixed {
                        0 => b == 0x1f,
                        1 => b == 0x8b,
                        // Compression method 8: deflate, the only one defined.
                        2 => b == 8,
                        3 => {
                            self.flags = b;
                            b & FRESERVED == 0
                        }
                        _ => true,
                    };
                    if !ok {
                        return Err(DecodeError::GzipHeader);
                    }
                    self.fixed += 1;
                    if self.fixed == 10 {
                        if self.flags & FEXTRA != 0 {
                            self.step = GzStep::ExtraLen;
                            self.left = 2;
                        } else {
                            self.next_after(GzStep::Extra);
                        }
                    }
                }
                GzStep::ExtraLen => {
                    // XLEN is little-endian: the low byte comes first.
                    self.left -= 1;
                    if self.left == 1 {
                        self.xlen_lo = b;
                    } else {
                        self.left = u16::from(self.xlen_lo) | (u16::from(b) << 8);
                        self.step = GzStep::Extra;
                        if self.left == 0 {
                            self.next_after(GzStep::Extra);
                        }
                    }
                }
                GzStep::Extra => {
                    self.left -= 1;
                    if self.left == 0 {
                        self.next_after(GzStep::Extra);
                    }
                }
                GzStep::Name => {
                    if b == 0 {
                        self.next_after(GzStep::Name);
                    }
                }
                GzStep::Comment => {
                    if b == 0 {
                        self.next_after(GzStep::Comment);
                    }
                }
                GzStep::Crc => self.left -= 1,
            }
            if self.step == GzStep::Crc && self.left == 0 {
                return Ok((i + 1, true));
            }
        }
        Ok((input.len(), false))
    }

    /// Moves past `done` to the next optional field the flags announce; `Crc` with nothing
    /// left means the header ended.
    fn next_after(&mut self, done: GzStep) {
        let order = [
            (GzStep::Extra, FEXTRA),
            (GzStep::Name, FNAME),
            (GzStep::Comment, FCOMMENT),
            (GzStep::Crc, FHCRC),
        ];
        let from = order
            .iter()
            .position(|(s, _)| *s == done)
            .map_or(0, |i| i + 1);
        for &(step, flag) in &order[from..] {
            if self.flags & flag != 0 {
                self.step = step;
                if step == GzStep::Crc {
                    self.left = 2;
                }
                return;
            }
        }
        self.step = GzStep::Crc;
        self.left = 0;
    }
}

impl Decoder {
    /// Decodes `input` (the next coded bytes, split anywhere) and hands every decoded byte to
    /// `sink`, in pieces of at most [`OUT_CHUNK`] bytes. After an error nothing more is decoded
    /// and the error is returned again.
    pub fn feed<F: FnMut(&[u8])>(&mut self, input: &[u8], sink: &mut F) -> Result<(), DecodeError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.done {
            return Ok(());
        }
        let r = self.run(input, sink);
        if let Err(e) = r {
            self.error = Some(e);
        }
        r
    }

    /// A whole coded stream has been read (for gzip: a whole member, which another may follow).
    pub fn is_done(&self) -> bool {
        self.done
            || matches!(
                self.kind,
                Kind::Gzip {
                    phase: GzPhase::Between,
                    ..
                }
            )
    }

    /// The first error met, if any.
    pub fn error(&self) -> Option<DecodeError> {
        self.error
    }

    fn run<F: FnMut(&[u8])>(&mut self, mut input: &[u8], sink: &mut F) -> Result<(), DecodeError> {
        let out = &mut self.out;
        let decoded = &mut self.decoded;
        match &mut self.kind {
            Kind::Gzip { phase, inflate } => {
                while !input.is_empty() {
                    match phase {
                        GzPhase::Header(h) => {
                            let (used, ended) = h.feed(input)?;
                            input = &input[used..];
                            if ended {
                                inflate.reset(false);
                                *phase = GzPhase::Data;
                            }
                        }
                        GzPhase::Data => {
                            let (used, end) = inflate_into(inflate, input, out, sink, decoded)?;
                            input = &input[used..];
                            if end {
                                *phase = GzPhase::Trailer(8);
                            }
                        }
                        GzPhase::Trailer(left) => {
                            let n = (*left as usize).min(input.len());
                            input = &input[n..];
                            *left -= n as u8;
                            if *left == 0 {
                                *phase = GzPhase::Between;
                            }
                        }
                        GzPhase::Between => {
                            if input[0] != 0x1f {
                                // Padding or garbage after the last member: the stream ended.
                                self.done = true;
                                return Ok(());
                            }
                            *phase = GzPhase::Header(GzHeader::default());
                        }
                    }
                }
                Ok(())
            }
            Kind::Deflate { first, inflate } => {
                if inflate.is_none() {
                    let Some(&b) = input.first() else {
                        return Ok(());
                    };
                    let Some(b0) = *first else {
                        *first = Some(b);
                        return self.run(&input[1..], sink);
                    };
                    // RFC 1950: CM = 8, CINFO <= 7, and the two bytes a multiple of 31. A raw
                    // deflate stream can start the same way only by chance (about 1 in 250).
                    let zlib = b0 & 0x0f == 8
                        && b0 >> 4 <= 7
                        && ((u16::from(b0) << 8) | u16::from(b)) % 31 == 0;
                    let mut d = Box::new(Decompress::new(zlib));
                    let (_, end) = inflate_into(&mut d, &[b0], out, sink, decoded)?;
                    *inflate = Some(d);
                    if end {
                        self.done = true;
                        return Ok(());
                    }
                }
                if let Some(d) = inflate {
                    let (_, end) = inflate_into(d, input, out, sink, decoded)?;
                    self.done = end;
                }
                Ok(())
            }
            Kind::Br(state) => {
                let mut avail_in = input.len();
                let mut in_at = 0;
                loop {
                    let mut avail_out = out.len();
                    let mut out_at = 0;
                    let mut total = 0;
                    let r = BrotliDecompressStream(
                        &mut avail_in,
                        &mut in_at,
                        input,
                        &mut avail_out,
                        &mut out_at,
                        out,
                        &mut total,
                        state,
                    );
                    if out_at > 0 {
                        sink(&out[..out_at]);
                        *decoded += out_at as u64;
                        if *decoded > MAX_DECODED {
                            return Err(DecodeError::TooLarge);
                        }
                    }
                    match r {
                        BrotliResult::NeedsMoreOutput => continue,
                        BrotliResult::NeedsMoreInput => return Ok(()),
                        BrotliResult::ResultSuccess => {
                            self.done = true;
                            return Ok(());
                        }
                        BrotliResult::ResultFailure => return Err(DecodeError::Brotli),
                    }
                }
            }
        }
    }
}

/// Inflates `input` into `out`, handing each filled piece to `sink`. Returns the input bytes
/// used and whether the deflate stream ended (bytes after its end are left unused).
fn inflate_into<F: FnMut(&[u8])>(
    d: &mut Decompress,
    mut input: &[u8],
    out: &mut [u8],
    sink: &mut F,
    decoded: &mut u64,
) -> Result<(usize, bool), DecodeError> {
    let mut used = 0;
    loop {
        let (in0, out0) = (d.total_in(), d.total_out());
        let status = d
            .decompress(input, out, FlushDecompress::None)
            .map_err(|_| DecodeError::Deflate)?;
        // Both differences are bounded by the slices' lengths.
        let took = (d.total_in() - in0) as usize;
        let made = (d.total_out() - out0) as usize;
        if made > 0 {
            sink(&out[..made]);
            *decoded += made as u64;
            if *decoded > MAX_DECODED {
                return Err(DecodeError::TooLarge);
            }
        }
        input = &input[took..];
        used += took;
        match status {
            Status::StreamEnd => return Ok((used, true)),
            // Output full: more may be pending even with no input left.
            _ if made == out.len() => continue,
            _ if input.is_empty() || (took == 0 && made == 0) => return Ok((used, false)),
            _ => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_decompression_bomb_stops_at_the_limit() {
        // 80 MiB of zeros gzip to about 80 KiB: decoding stops past MAX_DECODED.
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..80 {
            let _ = e.write_all(&zeros);
        }
        let coded = e.finish().unwrap_or_default();
        let mut d = ContentCoding::Gzip.decoder().expect("gzip decoder");
        let mut got = 0u64;
        let mut res = Ok(());
        for piece in coded.chunks(16 * 1024) {
            res = d.feed(piece, &mut |b| got += b.len() as u64);
            if res.is_err() {
                break;
            }
        }
        assert_eq!(res, Err(DecodeError::TooLarge));
        assert!(
            got > MAX_DECODED - 1024 * 1024 && got <= MAX_DECODED + 16 * 1024,
            "{got}"
        );
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let _ = e.write_all(data);
        e.finish().unwrap_or_default()
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        let _ = e.write_all(data);
        e.finish().unwrap_or_default()
    }

    fn raw_deflate(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        let _ = e.write_all(data);
        e.finish().unwrap_or_default()
    }

    fn br(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
            let _ = w.write_all(data);
        }
        out
    }

    /// A reply-like body: JSON with a long generated text, so the codings really compress.
    fn body() -> Vec<u8> {
        let text = "alpha bravo naïve 日本語 charlie ".repeat(2000);
        format!(
            "{{\"id\":\"x\",\"choices\":[{{\"message\":{{\"content\":\"{text}\"}}}}],\"usage\":{{\"prompt_tokens\":12,\"completion_tokens\":16000}}}}"
        )
        .into_bytes()
    }

    /// Decodes `coded` fed in pieces cut at `cuts`, checking every piece's size bound.
    fn decode(
        coding: ContentCoding,
        coded: &[u8],
        cuts: &[usize],
    ) -> (Vec<u8>, Result<(), DecodeError>) {
        let Some(mut d) = coding.decoder() else {
            return (Vec::new(), Ok(()));
        };
        let mut got = Vec::new();
        let mut prev = 0;
        let mut res = Ok(());
        for &c in cuts.iter().chain(std::iter::once(&coded.len())) {
            res = d.feed(&coded[prev..c], &mut |p: &[u8]| {
                assert!(!p.is_empty() && p.len() <= OUT_CHUNK);
                got.extend_from_slice(p);
            });
            prev = c;
        }
        (got, res)
    }

    #[test]
    fn field_values_name_the_coding() {
        let one = |v: &str| ContentCoding::from_fields([v.as_bytes()]);
        assert_eq!(ContentCoding::from_fields([]), ContentCoding::Identity);
        assert_eq!(one("identity"), ContentCoding::Identity);
        assert_eq!(one("GZip"), ContentCoding::Gzip);
        assert_eq!(one("x-gzip"), ContentCoding::Gzip);
        assert_eq!(one(" deflate "), ContentCoding::Deflate);
        assert_eq!(one("br"), ContentCoding::Br);
        assert_eq!(one("identity, br"), ContentCoding::Br);
        assert_eq!(one("zstd"), ContentCoding::Unsupported);
        assert_eq!(one("gzip, br"), ContentCoding::Unsupported);
        assert_eq!(
            ContentCoding::from_fields([&b"gzip"[..], &b"gzip"[..]]),
            ContentCoding::Unsupported
        );
        assert!(ContentCoding::Identity.decoder().is_none());
        assert!(ContentCoding::Unsupported.decoder().is_none());
    }

    #[test]
    fn every_coding_decodes_whole_and_split_anywhere() {
        let plain = body();
        for (coding, coded) in [
            (ContentCoding::Gzip, gzip(&plain)),
            (ContentCoding::Deflate, zlib(&plain)),
            (ContentCoding::Deflate, raw_deflate(&plain)),
            (ContentCoding::Br, br(&plain)),
        ] {
            assert!(coded.len() * 4 < plain.len(), "{coding:?} did not compress");
            let (got, res) = decode(coding, &coded, &[]);
            assert_eq!(res, Ok(()), "{coding:?}");
            assert!(got == plain, "{coding:?}: decoded bytes differ");
            // One byte at a time, and cuts inside the header, the data and the trailer.
            let every: Vec<usize> = (1..coded.len()).collect();
            let (got, res) = decode(coding, &coded, &every);
            assert_eq!(res, Ok(()), "{coding:?} byte by byte");
            assert!(
                got == plain,
                "{coding:?} byte by byte: decoded bytes differ"
            );
            for step in [3, 7, 1000] {
                let cuts: Vec<usize> = (step..coded.len()).step_by(step).collect();
                let (got, _) = decode(coding, &coded, &cuts);
                assert!(got == plain, "{coding:?} cut every {step}");
            }
        }
    }

    /// A br stream of uncompressed meta-blocks (RFC 7932 §9.2), byte for byte what the e2e
    /// upstream (`BrStored` in tests/e2e/ai_upstream.py) writes for two SSE frames.
    #[test]
    fn br_stream_of_stored_meta_blocks_decodes() {
        let coded = b"\x80\x00\x10data: 1\n\n@\x00\x08data: 2\n\n\x03";
        let every: Vec<usize> = (1..coded.len()).collect();
        let (got, res) = decode(ContentCoding::Br, coded, &every);
        assert_eq!((res, &got[..]), (Ok(()), &b"data: 1\n\ndata: 2\n\n"[..]));
    }

    #[test]
    fn gzip_optional_header_fields_multiple_members_and_padding() {
        let plain = body();
        let mut e = flate2::GzBuilder::new()
            .filename("reply.json")
            .comment("a comment")
            .extra(vec![1, 2, 3, 4, 5])
            .write(Vec::new(), flate2::Compression::default());
        let _ = e.write_all(&plain[..1000]);
        let mut coded = e.finish().unwrap_or_default();
        let (got, res) = decode(ContentCoding::Gzip, &coded, &[11, 13, 20]);
        assert_eq!((res, &got[..]), (Ok(()), &plain[..1000]));
        // The header CRC flag, set by hand on a plain header (flate2 does not write it): two
        // more header bytes, right after the fixed part when no other optional field is there.
        let mut with_crc = gzip(&plain[..1000]);
        with_crc[3] |= FHCRC;
        with_crc.splice(10..10, [0xaa, 0xbb]);
        let (got, res) = decode(ContentCoding::Gzip, &with_crc, &[11]);
        assert_eq!((res, &got[..]), (Ok(()), &plain[..1000]));
        // A second member continues the body; zero padding after it is ignored.
        coded.extend(gzip(&plain[1000..]));
        coded.extend([0u8; 16]);
        let every: Vec<usize> = (1..coded.len()).collect();
        let (got, res) = decode(ContentCoding::Gzip, &coded, &every);
        assert_eq!(res, Ok(()));
        assert!(got == plain, "two gzip members: decoded bytes differ");
    }

    #[test]
    fn corrupt_streams_are_errors_that_stick() {
        let plain = body();
        let mut bad_magic = gzip(&plain);
        bad_magic[0] = 0x1e;
        assert_eq!(
            decode(ContentCoding::Gzip, &bad_magic, &[]).1,
            Err(DecodeError::GzipHeader)
        );
        let mut reserved = gzip(&plain);
        reserved[3] |= 0x80;
        assert_eq!(
            decode(ContentCoding::Gzip, &reserved, &[]).1,
            Err(DecodeError::GzipHeader)
        );
        let mut bad_data = gzip(&plain);
        for b in &mut bad_data[12..40] {
            *b = 0xff;
        }
        assert_eq!(
            decode(ContentCoding::Gzip, &bad_data, &[]).1,
            Err(DecodeError::Deflate)
        );
        let mut bad_br = br(&plain);
        for b in &mut bad_br[4..40] {
            *b = 0xff;
        }
        let Some(mut d) = ContentCoding::Br.decoder() else {
            panic!("br has a decoder");
        };
        let first = d.feed(&bad_br, &mut |_: &[u8]| {});
        assert_eq!(first, Err(DecodeError::Brotli));
        // Sticky: later input is not decoded.
        let mut more = 0;
        assert_eq!(
            d.feed(&br(b"{}"), &mut |p: &[u8]| more += p.len()),
            Err(DecodeError::Brotli)
        );
        assert_eq!((more, d.error()), (0, Some(DecodeError::Brotli)));
    }

    #[test]
    fn output_is_handed_over_in_bounded_pieces() {
        // 4 MB of one byte compresses to a few KB: decoding must hand it over piece by piece,
        // never as one allocation the size of the body.
        let plain = vec![b'a'; 4 << 20];
        for (coding, coded) in [
            (ContentCoding::Gzip, gzip(&plain)),
            (ContentCoding::Br, br(&plain)),
        ] {
            let Some(mut d) = coding.decoder() else {
                panic!("{coding:?} has a decoder");
            };
            let (mut pieces, mut total) = (0usize, 0usize);
            let res = d.feed(&coded, &mut |p: &[u8]| {
                assert!(p.len() <= OUT_CHUNK);
                pieces += 1;
                total += p.len();
            });
            assert_eq!((res, total), (Ok(()), plain.len()), "{coding:?}");
            assert!(
                pieces >= plain.len() / OUT_CHUNK,
                "{coding:?}: {pieces} pieces"
            );
            assert!(d.is_done(), "{coding:?}: end of stream not seen");
        }
    }

    /// The engine's use: the coded reply goes on unchanged, its decoded copy feeds the usage
    /// scanners. Usage is exact for JSON and event streams in every coding, split anywhere.
    #[test]
    fn usage_is_read_from_the_decoded_copy() {
        use crate::sse::fixtures::{ANTHROPIC, OPENAI_INCLUDE_USAGE, RESPONSES};
        use crate::sse::SseParser;
        use crate::usage::{JsonUsageScanner, UsageSource, UsageTracker};

        /// A coding and the encoder that makes a body in it.
        type Codec = (ContentCoding, fn(&[u8]) -> Vec<u8>);
        /// Hands the bytes of a stream, in pieces, to the sink it is given.
        type Feeder<'a> = &'a mut dyn FnMut(&mut dyn FnMut(&[u8]));

        let json = body();
        let codecs: [Codec; 4] = [
            (ContentCoding::Gzip, gzip),
            (ContentCoding::Deflate, zlib),
            (ContentCoding::Deflate, raw_deflate),
            (ContentCoding::Br, br),
        ];
        for (coding, encode) in codecs {
            let coded = encode(&json);
            for step in [1, 5, coded.len()] {
                let Some(mut d) = coding.decoder() else {
                    panic!("{coding:?} has a decoder");
                };
                let mut scan = JsonUsageScanner::new();
                for piece in coded.chunks(step) {
                    assert_eq!(d.feed(piece, &mut |p: &[u8]| scan.feed(p)), Ok(()));
                }
                scan.finish();
                let u = scan.usage().map(|u| (u.input, u.output, u.source));
                assert_eq!(
                    u,
                    Some((12, 16000, UsageSource::Reported)),
                    "{coding:?} step {step}"
                );
            }
            // The plain tracker's answer for each stream is what the decoded copy must give.
            for stream in [OPENAI_INCLUDE_USAGE, RESPONSES, ANTHROPIC] {
                let track = |feed: Feeder<'_>| {
                    let mut p = SseParser::new(64 * 1024);
                    let mut t = UsageTracker::new();
                    feed(&mut |b: &[u8]| {
                        p.feed(b, &mut |ev| {
                            let _ = t.on_event(&ev);
                        })
                    });
                    p.finish(&mut |ev| {
                        let _ = t.on_event(&ev);
                    });
                    t.usage(0)
                };
                let want = track(&mut |f| f(stream.as_bytes()));
                assert_eq!(want.source, UsageSource::Reported);
                let coded = encode(stream.as_bytes());
                let got = track(&mut |f| {
                    let Some(mut d) = coding.decoder() else {
                        return;
                    };
                    for piece in coded.chunks(3) {
                        let _ = d.feed(piece, &mut |p: &[u8]| f(p));
                    }
                });
                assert_eq!(got, want, "{coding:?}");
            }
        }
    }
}
