//! The chunked transfer coding decoder (RFC 9112 §7.1), a byte-level state machine.
//!
//! The decoder never copies payload: it reports the ranges of its input that
//! are chunk data, and consumes nothing past the end of the message, so bytes
//! of a pipelined message stay with the caller.

use std::ops::Range;

use super::error::ChunkError;
use super::head::is_token_byte;

/// Most hex digits in a chunk size; 16 digits fill a u64. Leading zeros count.
pub const CHUNK_SIZE_MAX_DIGITS: u8 = 16;

/// Most bytes of chunk extensions on one chunk-size line, from the first byte
/// after the size to the CR. Extensions are ignored, so this only bounds work.
pub const CHUNK_EXTENSIONS_LIMIT: usize = 4096;

/// Most bytes of the trailer section, from after the last-chunk line through
/// its final CRLF.
pub const TRAILERS_LIMIT: usize = 16 * 1024;

/// Where the decoder is in the chunked grammar:
///
/// ```text
/// chunked-body = *chunk last-chunk trailer-section CRLF
/// chunk        = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
/// chunk-ext    = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkState {
    /// Expecting the first hex digit of a chunk size.
    SizeStart,
    /// Inside the hex digits.
    Size,
    /// Whitespace after the size; only `;` may follow.
    SizeLws,
    /// After `;`: whitespace, then the first byte of an extension name.
    ExtStart,
    /// Inside an extension name.
    ExtName,
    /// Whitespace after an extension name; `=`, `;` or CR follow.
    ExtNameLws,
    /// After `=`: whitespace, then a token or a quoted string.
    ExtValueStart,
    /// Inside a token extension value.
    ExtToken,
    /// Inside a quoted-string extension value.
    ExtQuoted,
    /// After a backslash inside a quoted string.
    ExtQuotedEscape,
    /// After a complete extension value; whitespace, then `;` or CR.
    ExtValueLws,
    /// After the CR that ends a chunk-size line.
    SizeLf,
    /// Inside chunk data; `size` bytes remain.
    Data,
    /// Expecting the CR after chunk data.
    DataCr,
    /// Expecting the LF after chunk data.
    DataLf,
    /// At the start of a trailer field line or of the final CRLF.
    TrailerStart,
    /// Inside a trailer field name.
    TrailerName,
    /// Inside a trailer field value.
    TrailerValue,
    /// After the CR that ends a trailer field line.
    TrailerLf,
    /// After the CR of the final CRLF.
    EndLf,
    /// The message ended; further bytes belong to the next one.
    Done,
}

impl ChunkState {
    /// True for states whose bytes count against [`CHUNK_EXTENSIONS_LIMIT`].
    fn is_extension(self) -> bool {
        matches!(
            self,
            ChunkState::SizeLws
                | ChunkState::ExtStart
                | ChunkState::ExtName
                | ChunkState::ExtNameLws
                | ChunkState::ExtValueStart
                | ChunkState::ExtToken
                | ChunkState::ExtQuoted
                | ChunkState::ExtQuotedEscape
                | ChunkState::ExtValueLws
        )
    }

    /// True for states whose bytes count against [`TRAILERS_LIMIT`].
    fn is_trailer(self) -> bool {
        matches!(
            self,
            ChunkState::TrailerStart
                | ChunkState::TrailerName
                | ChunkState::TrailerValue
                | ChunkState::TrailerLf
                | ChunkState::EndLf
        )
    }
}

/// Decodes one chunked message body; after an error it must not be fed again.
#[derive(Clone, Debug)]
pub struct ChunkedDecoder {
    /// Position in the grammar.
    state: ChunkState,
    /// The chunk size being read, then the data bytes still expected.
    size: u64,
    /// Hex digits read for the current size, leading zeros included.
    digits: u8,
    /// Extension bytes on the current chunk-size line.
    ext_bytes: usize,
    /// Bytes of the trailer section so far.
    trailer_bytes: usize,
    /// Payload bytes delivered so far.
    body_bytes: u64,
    /// Largest payload accepted; more is [`ChunkError::BodyTooLarge`].
    max_body: u64,
}

/// What one [`ChunkedDecoder::decode`] call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct Progress {
    /// Bytes of the input that belong to this body; all of them unless `done`.
    pub consumed: usize,
    /// The final CRLF was read; the rest of the input is the next message.
    pub done: bool,
}

impl ChunkedDecoder {
    /// A decoder for a body of at most `max_body` payload bytes.
    pub fn new(max_body: u64) -> Self {
        ChunkedDecoder {
            state: ChunkState::SizeStart,
            size: 0,
            digits: 0,
            ext_bytes: 0,
            trailer_bytes: 0,
            body_bytes: 0,
            max_body,
        }
    }

    /// Feeds bytes; returns how many were consumed and whether the message
    /// ended (after the final CRLF of the trailer section).
    ///
    /// `on_data(range)` is called with each range of `input` that is chunk
    /// payload, so the caller can de-chunk without copying. Bytes after the
    /// end are not consumed: they belong to the next pipelined message.
    pub fn decode(
        &mut self,
        input: &[u8],
        on_data: &mut impl FnMut(Range<usize>),
    ) -> Result<Progress, ChunkError> {
        let mut pos = 0;
        while pos < input.len() && self.state != ChunkState::Done {
            if self.state == ChunkState::Data {
                let avail = input.len() - pos;
                // Bounded by `avail`, so the cast back to usize is lossless.
                let take = self.size.min(avail as u64) as usize;
                on_data(pos..pos + take);
                pos += take;
                self.size -= take as u64;
                self.body_bytes += take as u64;
                if self.size == 0 {
                    self.state = ChunkState::DataCr;
                }
                continue;
            }
            if let Some(n) = self.line_at_once(&input[pos..]) {
                pos += n;
                continue;
            }
            let byte = input[pos];
            pos += 1;
            self.step(byte)?;
        }
        Ok(Progress {
            consumed: pos,
            done: self.state == ChunkState::Done,
        })
    }

    /// The common framing between chunks — `CRLF` after data, then a size line of
    /// bare hex digits and `CRLF` — read whole when `rest` holds all of it; the
    /// byte steps (which give every error its exact kind) read anything else.
    /// Returns the bytes consumed.
    fn line_at_once(&mut self, rest: &[u8]) -> Option<usize> {
        let skip = match self.state {
            ChunkState::DataCr if rest.starts_with(b"\r\n") => 2,
            ChunkState::SizeStart => 0,
            _ => return None,
        };
        let line = &rest[skip..];
        let mut size = 0u64;
        let mut digits = 0usize;
        // At most 16 digits: the shifts cannot overflow; a 17th goes to the byte steps.
        while digits < usize::from(CHUNK_SIZE_MAX_DIGITS) {
            let Some(v) = line.get(digits).and_then(|&b| hex_value(b)) else {
                break;
            };
            size = size << 4 | u64::from(v);
            digits += 1;
        }
        if digits == 0
            || line.get(digits..digits + 2) != Some(b"\r\n")
            || size > self.max_body - self.body_bytes
        {
            // Not the plain form, or an error: only the data CRLF is taken here.
            if skip > 0 {
                self.state = ChunkState::SizeStart;
            }
            return (skip > 0).then_some(skip);
        }
        self.size = size;
        // Bounded by CHUNK_SIZE_MAX_DIGITS, so the cast is lossless.
        self.digits = digits as u8;
        self.ext_bytes = 0;
        self.state = if size == 0 {
            ChunkState::TrailerStart
        } else {
            ChunkState::Data
        };
        Some(skip + digits + 2)
    }

    /// True once the whole body, trailers included, has been read.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Payload bytes seen so far.
    pub fn body_bytes(&self) -> u64 {
        self.body_bytes
    }

    /// Advances by one framing byte, enforcing the per-line and trailer limits.
    fn step(&mut self, b: u8) -> Result<(), ChunkError> {
        let from = self.state;
        if from.is_trailer() {
            self.trailer_bytes += 1;
            if self.trailer_bytes > TRAILERS_LIMIT {
                return Err(ChunkError::TrailerTooLong);
            }
        }
        let next = match from {
            ChunkState::SizeStart => self.read_size_start(b),
            ChunkState::Size => self.read_size(b),
            ChunkState::SizeLws => read_size_lws(b),
            ChunkState::ExtStart => read_ext_start(b),
            ChunkState::ExtName => read_ext_name(b),
            ChunkState::ExtNameLws => read_ext_name_lws(b),
            ChunkState::ExtValueStart => read_ext_value_start(b),
            ChunkState::ExtToken => read_ext_token(b),
            ChunkState::ExtQuoted => read_ext_quoted(b),
            ChunkState::ExtQuotedEscape => read_ext_quoted_escape(b),
            ChunkState::ExtValueLws => read_ext_value_lws(b),
            ChunkState::SizeLf => self.read_size_lf(b),
            ChunkState::DataCr => read_data_cr(b),
            ChunkState::DataLf => read_data_lf(b),
            ChunkState::TrailerStart => read_trailer_start(b),
            ChunkState::TrailerName => read_trailer_name(b),
            ChunkState::TrailerValue => read_trailer_value(b),
            ChunkState::TrailerLf => read_trailer_lf(b),
            ChunkState::EndLf => read_end_lf(b),
            // `decode` handles data in bulk and stops at Done.
            ChunkState::Data | ChunkState::Done => Ok(from),
        }?;
        if next.is_extension() {
            self.ext_bytes += 1;
            if self.ext_bytes > CHUNK_EXTENSIONS_LIMIT {
                return Err(ChunkError::ExtensionTooLong);
            }
        }
        self.state = next;
        Ok(())
    }

    /// The first hex digit of a chunk size.
    fn read_size_start(&mut self, b: u8) -> Result<ChunkState, ChunkError> {
        match b {
            b'\n' => Err(ChunkError::MissingCrlf),
            _ => {
                self.size = 0;
                self.digits = 0;
                self.ext_bytes = 0;
                self.push_digit(b)?;
                Ok(ChunkState::Size)
            }
        }
    }

    /// More hex digits, or the end of the size.
    fn read_size(&mut self, b: u8) -> Result<ChunkState, ChunkError> {
        match b {
            b'\r' => Ok(ChunkState::SizeLf),
            b'\n' => Err(ChunkError::MissingCrlf),
            b';' => Ok(ChunkState::ExtStart),
            b' ' | b'\t' => Ok(ChunkState::SizeLws),
            _ => {
                self.push_digit(b)?;
                Ok(ChunkState::Size)
            }
        }
    }

    /// Adds one hex digit to the size, checking digits, overflow and `max_body`.
    fn push_digit(&mut self, b: u8) -> Result<(), ChunkError> {
        let value = hex_value(b).ok_or(ChunkError::InvalidSize)?;
        self.digits += 1;
        if self.digits > CHUNK_SIZE_MAX_DIGITS {
            return Err(ChunkError::SizeOverflow);
        }
        self.size = self
            .size
            .checked_mul(16)
            .and_then(|s| s.checked_add(u64::from(value)))
            .ok_or(ChunkError::SizeOverflow)?;
        // Report as soon as the announced size exceeds what is left.
        if self.size > self.max_body - self.body_bytes {
            return Err(ChunkError::BodyTooLarge);
        }
        Ok(())
    }

    /// The LF ending a chunk-size line; size 0 is the last chunk.
    fn read_size_lf(&mut self, b: u8) -> Result<ChunkState, ChunkError> {
        match b {
            b'\n' if self.size == 0 => Ok(ChunkState::TrailerStart),
            b'\n' => Ok(ChunkState::Data),
            _ => Err(ChunkError::MissingCrlf),
        }
    }
}

/// The value of one hex digit.
fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Whitespace after the size: more whitespace or `;`.
fn read_size_lws(b: u8) -> Result<ChunkState, ChunkError> {
    match b {
        b' ' | b'\t' => Ok(ChunkState::SizeLws),
        b';' => Ok(ChunkState::ExtStart),
        b'\n' => Err(ChunkError::MissingCrlf),
        _ => Err(ChunkError::InvalidSize),
    }
}

/// After `;`: whitespace, then an extension name.
fn read_ext_start(b: u8) -> Result<ChunkState, ChunkError> {
    match b {
        b' ' | b'\t' => Ok(ChunkState::ExtStart),
        b'\n' => Err(ChunkError::MissingCrlf),
        _ if is_token_byte(b) => Ok(ChunkState::ExtName),
        _ => Err(ChunkError::InvalidExtension),
    }
}

/// Inside an extension name.
fn read_ext_name(b: u8) -> Result<ChunkState, ChunkError> {
    match b {
        b'\r' => Ok(ChunkState::SizeLf),
        b'\n' => Err(ChunkError::MissingCrlf),
        b';' => Ok(ChunkState::ExtStart),
        b'=' => Ok(ChunkState::ExtValueStart),
        b' ' | b'\t' => Ok(ChunkState::ExtNameLws),
        _ if is_token_byte(b) => Ok(ChunkState::ExtName),
        _ => Err(ChunkError::InvalidExtension),
    }
}

/// Whitespace after an extension name: `=` or `;` must follow.
fn read_ext_name_lws(b: u8) -> Result<ChunkState, ChunkError> {
    match b {
        b' ' | b'\t' => Ok(ChunkState::ExtNameLws),
        b';' => Ok(ChunkState::ExtStart),
        b'=' => Ok(ChunkState::ExtValueStart),
        b'\n' => Err(ChunkError::MissingCrlf),
        _ => Err(ChunkError::InvalidExtension),
    }
}

/// After `=`: whitespace, then a token or a quoted string.
fn read_ext_value_start(b: u8) -> Result<ChunkState, ChunkError> {
    match b {
        b' ' | b'\t' => Ok(ChunkState::ExtValueStart),
        b'"' => Ok(ChunkState::ExtQuoted),
        b'\n' => Err(ChunkError::MissingCrlf),
        _ if is_token_byte(b) => Ok(ChunkState::ExtToken),
        _ => Err(ChunkError::InvalidExtension),
    }
}

/// Inside a token value.
fn read_ext_token(b: u8) -> Result<ChunkState, ChunkError> {
    match b {
        b'\r' => Ok(ChunkState::SizeLf),
        b'\n' => Err(ChunkError::MissingCrlf),
        b';' => Ok(ChunkState::ExtStart),
        b' ' | b'\t' => Ok(ChunkState::ExtValueLws),
        _ if is_token_byte(b) => Ok(ChunkState::ExtToken),
        _ => Err(ChunkError::InvalidExtension),
    }
}

/// Inside a quoted string: `qdtext`, a backslash, or the closing quote.
fn read_ext_quoted(b: u8) -> Result<ChunkState, ChunkError> {
    match b {
        b'"' => Ok(ChunkState::ExtValueLws),
        b'\\' => Ok(ChunkState::ExtQuotedEscape),
        b'\t' | b' ' | 0x21..=0x7e | 0x80..=0xff => Ok(ChunkState::ExtQuoted),
        b'\n' => Err(ChunkError::MissingCrlf),
        _ => Err(ChunkError::InvalidExtension),
    }
}

/// The byte after a backslash in a quoted string.
fn read_ext_quoted_escape(b: u8) -> Result<ChunkState, ChunkError> {
    match b {
        b'\t' | b' ' | 0x21..=0x7e | 0x80..=0xff => Ok(ChunkState::ExtQuoted),
        b'\n' => Err(ChunkError::MissingCrlf),
        _ => Err(ChunkError::InvalidExtension),
    }
}

/// After an extension value: whitespace, `;`, or the CR ending the line.
fn read_ext_value_lws(b: u8) -> Result<ChunkState, ChunkError> {
    match b {
        b'\r' => Ok(ChunkState::SizeLf),
        b'\n' => Err(ChunkError::MissingCrlf),
        b';' => Ok(ChunkState::ExtStart),
        b' ' | b'\t' => Ok(ChunkState::ExtValueLws),
        _ => Err(ChunkError::InvalidExtension),
    }
}

/// The CR after chunk data.
fn read_data_cr(b: u8) -> Result<ChunkState, ChunkError> {
    match b {
        b'\r' => Ok(ChunkState::DataLf),
        _ => Err(ChunkError::MissingCrlf),
    }
}

/// The LF after chunk data; a new chunk-size line follows.
fn read_data_lf(b: u8) -> Result<ChunkState, ChunkError> {
    match b {
        b'\n' => Ok(ChunkState::SizeStart),
        _ => Err(ChunkError::MissingCrlf),
    }
}

/// The start of a trailer line: a field name, or the CR of the final CRLF.
/// Whitespace here is obs-fold or a space before the name: both rejected.
fn read_trailer_start(b: u8) -> Result<ChunkState, ChunkError> {
    match b {
        b'\r' => Ok(ChunkState::EndLf),
        b'\n' => Err(ChunkError::MissingCrlf),
        _ if is_token_byte(b) => Ok(ChunkState::TrailerName),
        _ => Err(ChunkError::InvalidTrailer),
    }
}

/// Inside a trailer field name; the colon must follow it directly.
fn read_trailer_name(b: u8) -> Result<ChunkState, ChunkError> {
    match b {
        b':' => Ok(ChunkState::TrailerValue),
        _ if is_token_byte(b) => Ok(ChunkState::TrailerName),
        _ => Err(ChunkError::InvalidTrailer),
    }
}

/// Inside a trailer field value: `field-vchar`, SP, HTAB, obs-text.
fn read_trailer_value(b: u8) -> Result<ChunkState, ChunkError> {
    match b {
        b'\r' => Ok(ChunkState::TrailerLf),
        b'\n' => Err(ChunkError::MissingCrlf),
        b'\t' | b' ' | 0x21..=0x7e | 0x80..=0xff => Ok(ChunkState::TrailerValue),
        _ => Err(ChunkError::InvalidTrailer),
    }
}

/// The LF ending a trailer field line.
fn read_trailer_lf(b: u8) -> Result<ChunkState, ChunkError> {
    match b {
        b'\n' => Ok(ChunkState::TrailerStart),
        _ => Err(ChunkError::MissingCrlf),
    }
}

/// The LF of the final CRLF.
fn read_end_lf(b: u8) -> Result<ChunkState, ChunkError> {
    match b {
        b'\n' => Ok(ChunkState::Done),
        _ => Err(ChunkError::MissingCrlf),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a whole decode produced.
    #[derive(Debug, PartialEq, Eq)]
    struct Outcome {
        payload: Vec<u8>,
        consumed: usize,
        done: bool,
    }

    /// Feeds `input` in the given pieces, copying payload ranges out.
    fn feed(pieces: &[&[u8]], max_body: u64) -> Result<Outcome, ChunkError> {
        let mut dec = ChunkedDecoder::new(max_body);
        let mut payload = Vec::new();
        let mut consumed = 0;
        for piece in pieces {
            let p = dec.decode(piece, &mut |r: Range<usize>| {
                payload.extend_from_slice(&piece[r])
            })?;
            consumed += p.consumed;
            if p.done {
                assert!(dec.is_done());
                break;
            }
            assert_eq!(p.consumed, piece.len(), "an unfinished decoder takes all");
        }
        assert_eq!(dec.body_bytes(), payload.len() as u64);
        Ok(Outcome {
            payload,
            consumed,
            done: dec.is_done(),
        })
    }

    /// Decodes a complete body and checks the payload, in one shot and split
    /// at every offset and byte by byte ("the shotgun approach"), with
    /// pipelined bytes after it that must be left unconsumed.
    fn read(body: &[u8], payload: &[u8]) {
        let mut input = body.to_vec();
        input.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let want = Outcome {
            payload: payload.to_vec(),
            consumed: body.len(),
            done: true,
        };
        let one_shot = feed(&[&input], u64::MAX);
        assert_eq!(one_shot.as_ref(), Ok(&want), "{:?}", show(body));
        for split in 0..=input.len() {
            let (a, b) = input.split_at(split);
            let got = feed(&[a, b], u64::MAX);
            assert_eq!(got.as_ref(), Ok(&want), "{:?} split at {split}", show(body));
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(
            feed(&bytes, u64::MAX),
            Ok(want),
            "{:?} bytewise",
            show(body)
        );
    }

    /// Asserts that `body` fails with `want`, in one shot and byte by byte.
    fn read_err(body: &[u8], want: ChunkError) {
        read_err_max(body, u64::MAX, want)
    }

    /// Like `read_err` with a payload limit.
    fn read_err_max(body: &[u8], max_body: u64, want: ChunkError) {
        assert_eq!(feed(&[body], max_body), Err(want), "{:?}", show(body));
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(
            feed(&bytes, max_body),
            Err(want),
            "{:?} bytewise",
            show(body)
        );
    }

    /// Asserts that `body` is a valid but unfinished prefix.
    fn read_incomplete(body: &[u8]) {
        let got = feed(&[body], u64::MAX).map(|o| (o.consumed, o.done));
        assert_eq!(got, Ok((body.len(), false)), "{:?}", show(body));
    }

    fn show(buf: &[u8]) -> String {
        String::from_utf8_lossy(buf).into_owned()
    }

    #[test]
    fn valid_chunked_bodies_decode_at_every_split() {
        // Valid
        read(b"0\r\n\r\n", b"");
        read(b"1\r\na\r\n0\r\n\r\n", b"a");
        read(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world");
        read(b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789");
        read(b"a\r\n0123456789\r\n0\r\n\r\n", b"0123456789");
        read(b"0001\r\nx\r\n0000\r\n\r\n", b"x");
        read(b"0000000000000001\r\nx\r\n0\r\n\r\n", b"x");
        read(b"3\r\n\r\n\n\r\n0\r\n\r\n", b"\r\n\n");
        // Extensions
        read(b"1;a\r\nx\r\n0\r\n\r\n", b"x");
        read(b"1;a=b\r\nx\r\n0;last\r\n\r\n", b"x");
        read(b"1 ; a = b ; c\r\nx\r\n0\r\n\r\n", b"x");
        read(b"1;a=\"q \\\" ;\"\r\nx\r\n0\r\n\r\n", b"x");
        read(b"1\t;\ta\t=\t\"\"\t\r\nx\r\n0\r\n\r\n", b"x");
        // Trailers
        read(b"1\r\nx\r\n0\r\nChecksum: abc\r\n\r\n", b"x");
        read(b"0\r\nA: 1\r\nB:\r\nC: x y\t\r\n\r\n", b"");
    }

    #[test]
    fn invalid_hex_digit_is_rejected() {
        // Invalid hex digit
        read_err(b"g\r\n", ChunkError::InvalidSize);
        read_err(b"1g\r\n", ChunkError::InvalidSize);
        read_err(b"-1\r\n", ChunkError::InvalidSize);
        read_err(b"+1\r\n", ChunkError::InvalidSize);
        read_err(b"0x1\r\n", ChunkError::InvalidSize);
        read_err(b"\r\n", ChunkError::InvalidSize);
        read_err(b";a\r\n", ChunkError::InvalidSize);
        read_err(b" 1\r\n", ChunkError::InvalidSize);
        read_err(b"1 \r\n", ChunkError::InvalidSize);
        read_err(b"1 2\r\n", ChunkError::InvalidSize);
    }

    #[test]
    fn chunked_size_overflow_is_rejected() {
        // Overflow
        read_err(b"10000000000000000\r\n", ChunkError::SizeOverflow);
        read_err(b"FFFFFFFFFFFFFFFF0\r\n", ChunkError::SizeOverflow);
        read_err(b"00000000000000001\r\n", ChunkError::SizeOverflow);
        read_incomplete(b"FFFFFFFFFFFFFFFF\r\n");
        // After a whole chunk, where the size line is read at once when complete.
        read_err(b"1\r\nx\r\n10000000000000000\r\n", ChunkError::SizeOverflow);
        read_err(
            b"1\r\nx\r\nfffffffffffffffff1\r\n",
            ChunkError::BodyTooLarge,
        );
        read_err(b"1\r\nx\r\n5g\r\n", ChunkError::InvalidSize);
        read_err(b"1\r\nx\r\n1\n", ChunkError::MissingCrlf);
        read_err(b"1\r\nx\n1\r\n", ChunkError::MissingCrlf);
    }

    #[test]
    fn body_over_max_is_rejected_when_the_size_arrives() {
        read_err_max(b"6\r\n", 5, ChunkError::BodyTooLarge);
        read_err_max(b"3\r\nabc\r\n3\r\n", 5, ChunkError::BodyTooLarge);
        read_err_max(b"100", 5, ChunkError::BodyTooLarge);
        let exact = feed(&[b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"], 5);
        assert_eq!(exact.map(|o| o.payload), Ok(b"abcde".to_vec()));
    }

    #[test]
    fn extensions_are_validated() {
        // Extensions
        read_err(b"1;\r\n", ChunkError::InvalidExtension);
        read_err(b"1;=b\r\n", ChunkError::InvalidExtension);
        read_err(b"1;a=\r\n", ChunkError::InvalidExtension);
        read_err(b"1;a b\r\n", ChunkError::InvalidExtension);
        read_err(b"1;a=b c\r\n", ChunkError::InvalidExtension);
        read_err(b"1;a=\"b\"c\r\n", ChunkError::InvalidExtension);
        read_err(b"1;a=\"b\0\"\r\n", ChunkError::InvalidExtension);
        read_err(b"1;a=\"b\\\0\"\r\n", ChunkError::InvalidExtension);
        read_err(b"1;a=b\0\r\n", ChunkError::InvalidExtension);
        read_err(b"1;a\x7f\r\n", ChunkError::InvalidExtension);
        read_err(b"1;a=\"\r\n\"\r\n", ChunkError::InvalidExtension);
    }

    #[test]
    fn extension_limit_is_per_line() {
        let name = "a".repeat(CHUNK_EXTENSIONS_LIMIT - 1);
        // ';' plus the name is exactly the limit, on every line.
        let ok = format!("1;{name}\r\nx\r\n0;{name}\r\n\r\n");
        let got = feed(&[ok.as_bytes()], u64::MAX).map(|o| o.payload);
        assert_eq!(got, Ok(b"x".to_vec()));
        let long = format!("1;{name}a\r\n");
        read_err(long.as_bytes(), ChunkError::ExtensionTooLong);
    }

    #[test]
    fn trailers_are_validated() {
        // Trailers
        read_err(b"0\r\n: x\r\n\r\n", ChunkError::InvalidTrailer);
        read_err(b"0\r\nA : x\r\n\r\n", ChunkError::InvalidTrailer);
        read_err(b"0\r\nA: x\r\n\tfold\r\n\r\n", ChunkError::InvalidTrailer);
        read_err(b"0\r\nA: x\r\n fold\r\n\r\n", ChunkError::InvalidTrailer);
        read_err(b"0\r\nA x\r\n\r\n", ChunkError::InvalidTrailer);
        read_err(b"0\r\nA\r\n\r\n", ChunkError::InvalidTrailer);
        read_err(b"0\r\nA: x\0\r\n\r\n", ChunkError::InvalidTrailer);
        read_err(b"0\r\n(A): x\r\n\r\n", ChunkError::InvalidTrailer);
    }

    #[test]
    fn trailer_section_over_the_limit_is_rejected() {
        let value = "v".repeat(TRAILERS_LIMIT);
        let body = format!("0\r\nX: {value}\r\n\r\n");
        read_err(body.as_bytes(), ChunkError::TrailerTooLong);
        // "X: " + value + CRLF + CRLF is exactly the limit.
        let value = "v".repeat(TRAILERS_LIMIT - 7);
        let body = format!("0\r\nX: {value}\r\n\r\n");
        assert!(feed(&[body.as_bytes()], u64::MAX).is_ok_and(|o| o.done));
    }

    #[test]
    fn line_endings_must_be_crlf() {
        // Line endings
        read_err(b"1\nx\r\n0\r\n\r\n", ChunkError::MissingCrlf);
        read_err(b"1\rx\r\n0\r\n\r\n", ChunkError::MissingCrlf);
        read_err(b"1;a\nx\r\n", ChunkError::MissingCrlf);
        read_err(b"1;a=b\nx\r\n", ChunkError::MissingCrlf);
        read_err(b"1\r\nx\n0\r\n\r\n", ChunkError::MissingCrlf);
        read_err(b"1\r\nx\r0\r\n\r\n", ChunkError::MissingCrlf);
        read_err(b"1\r\nxy\r\n0\r\n\r\n", ChunkError::MissingCrlf);
        read_err(b"0\r\n\n", ChunkError::MissingCrlf);
        read_err(b"0\r\n\r\r", ChunkError::MissingCrlf);
        read_err(b"0\r\nA: 1\n\r\n", ChunkError::MissingCrlf);
        read_err(b"0\r\nA: 1\r\r\n", ChunkError::MissingCrlf);
        read_err(b"0\n\r\n", ChunkError::MissingCrlf);
    }

    #[test]
    fn unfinished_bodies_consume_everything() {
        read_incomplete(b"");
        read_incomplete(b"5\r\nhel");
        read_incomplete(b"5\r\nhello\r\n");
        read_incomplete(b"0\r\n");
        read_incomplete(b"0\r\nA: 1\r\n");
        read_incomplete(b"0\r\n\r");
    }

    #[test]
    fn decoding_after_done_consumes_nothing() {
        let mut dec = ChunkedDecoder::new(u64::MAX);
        let mut sink = |_: Range<usize>| {};
        assert_eq!(
            dec.decode(b"0\r\n\r\n", &mut sink),
            Ok(Progress {
                consumed: 5,
                done: true
            })
        );
        assert_eq!(
            dec.decode(b"1\r\n", &mut sink),
            Ok(Progress {
                consumed: 0,
                done: true
            })
        );
    }

    #[test]
    fn data_ranges_point_into_the_input() {
        let input = b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let mut ranges = Vec::new();
        let mut dec = ChunkedDecoder::new(u64::MAX);
        let p = dec.decode(input, &mut |r: Range<usize>| ranges.push(r));
        assert_eq!(
            p,
            Ok(Progress {
                consumed: input.len(),
                done: true
            })
        );
        assert_eq!(ranges, [3..6, 11..13]);
    }
}
