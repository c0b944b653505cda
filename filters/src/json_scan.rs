//! A push-based JSON tokenizer: a state machine fed arbitrary slices of a document of any size.
//!
//! It exists so that the request/response body scanners (`model`, `usage`) can find a handful of
//! fields without ever holding the body or building a tree: the tokenizer keeps a few bytes of state
//! (current token state, a pending `\u` surrogate, a 128-bit container stack) and reports what it
//! sees through [`Sink`] callbacks carrying absolute byte offsets in the document.
//!
//! It validates strictly (RFC 8259 grammar, control characters in strings, one top-level value,
//! nesting bounded by [`MAX_DEPTH`]) so that a scanner never reports a field out of a body the
//! upstream would reject or read differently. It does not validate UTF-8: bytes pass through.
//! A sink may ask for an object or array to be skipped ([`Sink::skips`]): its end is found by
//! matching strings and brackets alone, without events and without validating what it holds
//! (the response scanner, which reads a response the client gets as it is, uses this).

use memchr::memchr2;

/// Deepest nesting accepted. Deeper documents are [`JsonError::TooDeep`]: a bound keeps the
/// container stack a fixed 16 bytes, and no API request needs more.
pub(crate) const MAX_DEPTH: usize = 128;

/// What kind of value starts or ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Object,
    Array,
    String,
    Number,
    True,
    False,
    Null,
}

/// Why a document was rejected. Offsets are absolute in the document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum JsonError {
    /// A byte that the grammar does not allow here.
    Syntax { at: u64 },
    /// Nesting deeper than [`MAX_DEPTH`].
    TooDeep { at: u64 },
    /// The document ended before its top-level value did (or was empty).
    Truncated,
}

/// Receives tokenizer events. Every method has an empty default so a scanner implements only what
/// it needs. `depth` is the number of containers enclosing the value (or key): the top-level value
/// has depth 0, the members of a top-level object depth 1.
pub(crate) trait Sink {
    /// A value begins; `at` is the offset of its first byte (`{`, `[`, `"`, digit, `-`, letter).
    fn value_start(&mut self, _kind: Kind, _depth: usize, _at: u64) {}
    /// A value ended; `end` is the offset just past its last byte (past the `}`/`]`/closing quote).
    fn value_end(&mut self, _kind: Kind, _depth: usize, _end: u64) {}
    /// An object key begins (its decoded bytes follow through `string_bytes(true, ..)`).
    fn key_start(&mut self, _depth: usize) {}
    /// The current object key is complete.
    fn key_end(&mut self, _depth: usize) {}
    /// Decoded bytes of the current key (`key == true`) or string value, in pieces of any size.
    fn string_bytes(&mut self, _key: bool, _bytes: &[u8]) {}
    /// Raw bytes of the current number or literal, in pieces of any size.
    fn scalar_bytes(&mut self, _bytes: &[u8]) {}
    /// Asked just after `value_start` of an object or array at `depth`: true to skip it. Its
    /// `value_end` still comes, but nothing in between, and what it holds is not validated.
    fn skips(&mut self, _depth: usize) -> bool {
        false
    }
}

/// Two sinks fed from one pass: every event goes to the first, then the second.
impl<A: Sink + ?Sized, B: Sink + ?Sized> Sink for (&mut A, &mut B) {
    fn value_start(&mut self, kind: Kind, depth: usize, at: u64) {
        self.0.value_start(kind, depth, at);
        self.1.value_start(kind, depth, at);
    }
    fn value_end(&mut self, kind: Kind, depth: usize, end: u64) {
        self.0.value_end(kind, depth, end);
        self.1.value_end(kind, depth, end);
    }
    fn key_start(&mut self, depth: usize) {
        self.0.key_start(depth);
        self.1.key_start(depth);
    }
    fn key_end(&mut self, depth: usize) {
        self.0.key_end(depth);
        self.1.key_end(depth);
    }
    fn string_bytes(&mut self, key: bool, bytes: &[u8]) {
        self.0.string_bytes(key, bytes);
        self.1.string_bytes(key, bytes);
    }
    fn scalar_bytes(&mut self, bytes: &[u8]) {
        self.0.scalar_bytes(bytes);
        self.1.scalar_bytes(bytes);
    }
    fn skips(&mut self, depth: usize) -> bool {
        // Both must agree, and both are asked.
        let first = self.0.skips(depth);
        self.1.skips(depth) && first
    }
}

/// Number grammar states (RFC 8259 §6); `Zero`, `Int`, `Frac`, `ExpDigits` may end a number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

/// Where a skip is: between tokens, in a string, or just after a backslash in one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Skipping {
    Out,
    Str,
    Esc,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    /// Before the top-level value, after `:`, or after `,` in an array: a value must come.
    Value,
    /// Just after `[`: a value or `]`.
    ArrayFirst,
    /// Just after `{`: a key or `}`.
    ObjectFirst,
    /// After `,` in an object: a key must come.
    Key,
    /// After a key: `:` must come.
    Colon,
    /// After a value inside a container: `,` or the closing bracket.
    AfterValue,
    /// Inside a string (key or value).
    Str {
        key: bool,
    },
    /// After a backslash in a string.
    Esc {
        key: bool,
    },
    /// Inside `\uXXXX`: `n` hex digits read so far.
    Uni {
        key: bool,
        n: u8,
        acc: u16,
    },
    Num(Num),
    /// Inside `true`/`false`/`null`: `i` bytes matched.
    Lit {
        kind: Kind,
        i: u8,
    },
    /// Inside an object or array being skipped: `nest` brackets open, `object` its kind.
    Skip {
        nest: u64,
        object: bool,
        at: Skipping,
    },
    /// The top-level value is complete: only whitespace may follow.
    Done,
    Failed(JsonError),
}

/// The tokenizer. Its size is fixed (a few dozen bytes) whatever the document.
#[derive(Debug)]
pub(crate) struct Scanner {
    st: St,
    /// Absolute offset of the next byte to be fed.
    pos: u64,
    /// Open containers.
    depth: usize,
    /// Bit `i` set: container at depth `i` is an object (else an array).
    objects: [u64; 2],
    /// A high surrogate from `\uD8xx` waiting for its low half (0: none).
    pending_high: u16,
}

impl Default for Scanner {
    fn default() -> Self {
        Self::new()
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn literal(kind: Kind) -> &'static [u8] {
    match kind {
        Kind::True => b"true",
        Kind::False => b"false",
        _ => b"null",
    }
}

impl Scanner {
    /// A tokenizer at offset 0 expecting one top-level value.
    pub(crate) fn new() -> Self {
        Self {
            st: St::Value,
            pos: 0,
            depth: 0,
            objects: [0; 2],
            pending_high: 0,
        }
    }

    /// Absolute offset of the next byte to be fed (bytes consumed so far).
    pub(crate) fn offset(&self) -> u64 {
        self.pos
    }

    /// True once the top-level value is complete (trailing whitespace may still come).
    pub(crate) fn is_done(&self) -> bool {
        self.st == St::Done
    }

    fn top_is_object(&self) -> bool {
        let d = self.depth - 1;
        self.objects[d / 64] & (1 << (d % 64)) != 0
    }

    fn push(&mut self, object: bool, at: u64) -> Result<(), JsonError> {
        if self.depth >= MAX_DEPTH {
            return Err(JsonError::TooDeep { at });
        }
        let d = self.depth;
        if object {
            self.objects[d / 64] |= 1 << (d % 64);
        } else {
            self.objects[d / 64] &= !(1 << (d % 64));
        }
        self.depth += 1;
        Ok(())
    }

    /// After any value ends: decide what may follow.
    fn after_value(&mut self) {
        self.st = if self.depth == 0 {
            St::Done
        } else {
            St::AfterValue
        };
    }

    /// Emits a decoded code point (from `\u`), pairing surrogates; unpaired halves become U+FFFD
    /// (lenient, like most decoders the upstreams use, rather than rejecting the body).
    fn emit_unit<S: Sink>(&mut self, key: bool, unit: u16, sink: &mut S) {
        let cp = if (0xD800..0xDC00).contains(&unit) {
            self.flush_high(key, sink);
            self.pending_high = unit;
            return;
        } else if (0xDC00..0xE000).contains(&unit) {
            if self.pending_high != 0 {
                let hi = u32::from(self.pending_high - 0xD800);
                self.pending_high = 0;
                0x10000 + (hi << 10) + u32::from(unit - 0xDC00)
            } else {
                0xFFFD
            }
        } else {
            self.flush_high(key, sink);
            u32::from(unit)
        };
        let c = char::from_u32(cp).unwrap_or('\u{FFFD}');
        let mut b = [0u8; 4];
        sink.string_bytes(key, c.encode_utf8(&mut b).as_bytes());
    }

    /// A high surrogate not followed by a low one decodes as U+FFFD.
    fn flush_high<S: Sink>(&mut self, key: bool, sink: &mut S) {
        if self.pending_high != 0 {
            self.pending_high = 0;
            sink.string_bytes(key, "\u{FFFD}".as_bytes());
        }
    }

    /// Starts the value whose first byte `b` sits at absolute offset `at`.
    fn start_value<S: Sink>(&mut self, b: u8, at: u64, sink: &mut S) -> Result<(), JsonError> {
        let depth = self.depth;
        match b {
            b'{' | b'[' => {
                let object = b == b'{';
                let kind = if object { Kind::Object } else { Kind::Array };
                sink.value_start(kind, depth, at);
                if sink.skips(depth) {
                    self.st = St::Skip {
                        nest: 1,
                        object,
                        at: Skipping::Out,
                    };
                } else {
                    self.push(object, at)?;
                    self.st = if object {
                        St::ObjectFirst
                    } else {
                        St::ArrayFirst
                    };
                }
            }
            b'"' => {
                sink.value_start(Kind::String, depth, at);
                self.st = St::Str { key: false };
            }
            b'-' | b'0'..=b'9' => {
                sink.value_start(Kind::Number, depth, at);
                sink.scalar_bytes(&[b]);
                self.st = St::Num(match b {
                    b'-' => Num::Minus,
                    b'0' => Num::Zero,
                    _ => Num::Int,
                });
            }
            b't' | b'f' | b'n' => {
                let kind = match b {
                    b't' => Kind::True,
                    b'f' => Kind::False,
                    _ => Kind::Null,
                };
                sink.value_start(kind, depth, at);
                sink.scalar_bytes(&[b]);
                self.st = St::Lit { kind, i: 1 };
            }
            _ => return Err(JsonError::Syntax { at }),
        }
        Ok(())
    }

    fn close<S: Sink>(&mut self, object: bool, at: u64, sink: &mut S) -> Result<(), JsonError> {
        if self.depth == 0 || self.top_is_object() != object {
            return Err(JsonError::Syntax { at });
        }
        self.depth -= 1;
        let kind = if object { Kind::Object } else { Kind::Array };
        sink.value_end(kind, self.depth, at + 1);
        self.after_value();
        Ok(())
    }

    /// Feeds the next slice of the document. Errors are sticky: once a document is rejected,
    /// every later call returns the same error.
    pub(crate) fn feed<S: Sink>(&mut self, input: &[u8], sink: &mut S) -> Result<(), JsonError> {
        if let St::Failed(e) = self.st {
            return Err(e);
        }
        let r = self.run(input, sink);
        if let Err(e) = r {
            self.st = St::Failed(e);
        }
        r
    }

    fn run<S: Sink>(&mut self, input: &[u8], sink: &mut S) -> Result<(), JsonError> {
        let base = self.pos;
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            let at = base + i as u64;
            match self.st {
                St::Skip { .. } => {
                    i = self.skip(input, i, base, sink);
                    continue;
                }
                St::Str { key } => {
                    // Bulk path: most of a large body is string content (base64 images, text).
                    let rest = &input[i..];
                    let j = string_run(rest);
                    if j > 0 {
                        self.flush_high(key, sink);
                        sink.string_bytes(key, &rest[..j]);
                    }
                    i += j;
                    if i < input.len() {
                        let at = base + i as u64;
                        match input[i] {
                            b'"' => {
                                self.flush_high(key, sink);
                                if key {
                                    sink.key_end(self.depth);
                                    self.st = St::Colon;
                                } else {
                                    sink.value_end(Kind::String, self.depth, at + 1);
                                    self.after_value();
                                }
                            }
                            b'\\' => self.st = St::Esc { key },
                            // A control byte: the valid prefix was reported first, so events do
                            // not depend on split points.
                            _ => return self.fail(base, input, at),
                        }
                        i += 1;
                    }
                    continue;
                }
                St::Esc { key } => {
                    let d = match b {
                        b'"' => b'"',
                        b'\\' => b'\\',
                        b'/' => b'/',
                        b'b' => 0x08,
                        b'f' => 0x0C,
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'u' => {
                            self.st = St::Uni { key, n: 0, acc: 0 };
                            i += 1;
                            continue;
                        }
                        _ => return self.fail(base, input, at),
                    };
                    self.flush_high(key, sink);
                    sink.string_bytes(key, &[d]);
                    self.st = St::Str { key };
                }
                St::Uni { key, n, acc } => {
                    let Some(h) = (b as char).to_digit(16) else {
                        return self.fail(base, input, at);
                    };
                    // `h < 16`, so the cast is lossless.
                    let acc = (acc << 4) | h as u16;
                    if n == 3 {
                        self.st = St::Str { key };
                        self.emit_unit(key, acc, sink);
                    } else {
                        self.st = St::Uni { key, n: n + 1, acc };
                    }
                }
                St::Num(n @ (Num::Int | Num::Frac | Num::ExpDigits)) if b.is_ascii_digit() => {
                    // A run of digits in one piece: the state does not change inside it.
                    let run = input[i..]
                        .iter()
                        .position(|c| !c.is_ascii_digit())
                        .unwrap_or(input.len() - i);
                    sink.scalar_bytes(&input[i..i + run]);
                    self.st = St::Num(n);
                    i += run;
                    continue;
                }
                St::Num(n) => match num_next(n, b) {
                    Some(s) => {
                        sink.scalar_bytes(&[b]);
                        self.st = St::Num(s);
                    }
                    None => {
                        if !num_can_end(n) {
                            return self.fail(base, input, at);
                        }
                        // The number ended at the previous byte; this byte is reread in the
                        // state that follows a value.
                        sink.value_end(Kind::Number, self.depth, at);
                        self.after_value();
                        continue;
                    }
                },
                St::Lit { kind, i: k } => {
                    let lit = literal(kind);
                    if lit.get(usize::from(k)) != Some(&b) {
                        return self.fail(base, input, at);
                    }
                    sink.scalar_bytes(&[b]);
                    if usize::from(k) + 1 == lit.len() {
                        sink.value_end(kind, self.depth, at + 1);
                        self.after_value();
                    } else {
                        self.st = St::Lit { kind, i: k + 1 };
                    }
                }
                St::Failed(e) => return Err(e),
                _ => match self.tokens(input, i, base, sink) {
                    Ok(next) => {
                        i = next;
                        continue;
                    }
                    Err(e) => {
                        self.pos = base + input.len() as u64;
                        return Err(e);
                    }
                },
            }
            i += 1;
        }
        self.pos = base + input.len() as u64;
        Ok(())
    }

    /// The states between tokens, a token at a time: whitespace, punctuation, and every key,
    /// string, number or literal that ends inside `input`, without a trip through the byte loop
    /// for each of its bytes. Returns where the byte loop goes on: the end of `input`, or inside
    /// a token that runs past it or holds an escape (`self.st` then says which). Events and
    /// errors are the byte loop's, so split points change nothing.
    fn tokens<S: Sink>(
        &mut self,
        input: &[u8],
        mut i: usize,
        base: u64,
        sink: &mut S,
    ) -> Result<usize, JsonError> {
        loop {
            // Compact JSON has none; one compare rules whitespace out.
            while i < input.len() && input[i] <= b' ' && is_ws(input[i]) {
                i += 1;
            }
            let Some(&b) = input.get(i) else {
                return Ok(i);
            };
            let at = base + i as u64;
            match self.st {
                St::Colon if b == b':' => {
                    self.st = St::Value;
                    i += 1;
                }
                St::AfterValue => {
                    match b {
                        b',' if self.top_is_object() => self.st = St::Key,
                        b',' => self.st = St::Value,
                        b'}' => self.close(true, at, sink)?,
                        b']' => self.close(false, at, sink)?,
                        _ => return Err(JsonError::Syntax { at }),
                    }
                    i += 1;
                }
                St::ObjectFirst | St::Key if b == b'"' => {
                    sink.key_start(self.depth);
                    i = self.string(input, i + 1, true, base, sink);
                    if self.st != St::Colon {
                        return Ok(i);
                    }
                    // Compact JSON: the colon comes next.
                    if input.get(i) == Some(&b':') {
                        self.st = St::Value;
                        i += 1;
                    }
                }
                St::ObjectFirst if b == b'}' => {
                    self.close(true, at, sink)?;
                    i += 1;
                }
                St::ArrayFirst if b == b']' => {
                    self.close(false, at, sink)?;
                    i += 1;
                }
                St::Value | St::ArrayFirst => match b {
                    b'"' => {
                        sink.value_start(Kind::String, self.depth, at);
                        i = self.string(input, i + 1, false, base, sink);
                        if matches!(self.st, St::Str { .. }) {
                            return Ok(i);
                        }
                    }
                    b'-' | b'0'..=b'9' => match number(&input[i..]) {
                        Some((len, last)) => {
                            let end = i + len;
                            sink.value_start(Kind::Number, self.depth, at);
                            sink.scalar_bytes(&input[i..end]);
                            if !num_can_end(last) {
                                return Err(JsonError::Syntax {
                                    at: base + end as u64,
                                });
                            }
                            sink.value_end(Kind::Number, self.depth, base + end as u64);
                            self.after_value();
                            i = end;
                        }
                        // It runs to the end of the input: the byte loop follows it.
                        None => {
                            self.start_value(b, at, sink)?;
                            return Ok(i + 1);
                        }
                    },
                    b't' | b'f' | b'n' => {
                        let kind = match b {
                            b't' => Kind::True,
                            b'f' => Kind::False,
                            _ => Kind::Null,
                        };
                        let lit = literal(kind);
                        if input.get(i..i + lit.len()) != Some(lit) {
                            // Split, or wrong: the byte loop finds which, and where.
                            self.start_value(b, at, sink)?;
                            return Ok(i + 1);
                        }
                        sink.value_start(kind, self.depth, at);
                        sink.scalar_bytes(lit);
                        sink.value_end(kind, self.depth, at + lit.len() as u64);
                        self.after_value();
                        i += lit.len();
                    }
                    _ => {
                        self.start_value(b, at, sink)?;
                        i += 1;
                    }
                },
                // Done, or a byte no state here allows.
                St::Done | St::Colon | St::ObjectFirst | St::Key => {
                    return Err(JsonError::Syntax { at })
                }
                // A token's state: the byte loop carries it on.
                _ => return Ok(i),
            }
        }
    }

    /// A key's or string value's bytes from `from` (just past its opening quote). When its
    /// closing quote is in `input`, ends it (as the byte loop would) and returns the index past
    /// the quote; otherwise leaves `self.st` inside the string and returns where its bytes stop
    /// (an escape, a control byte or the end of `input`), for the byte loop to go on from.
    fn string<S: Sink>(
        &mut self,
        input: &[u8],
        from: usize,
        key: bool,
        base: u64,
        sink: &mut S,
    ) -> usize {
        let rest = input.get(from..).unwrap_or_default();
        let j = string_run(rest);
        if j > 0 {
            sink.string_bytes(key, &rest[..j]);
        }
        if rest.get(j) != Some(&b'"') {
            self.st = St::Str { key };
            return from + j;
        }
        if key {
            sink.key_end(self.depth);
            self.st = St::Colon;
        } else {
            sink.value_end(Kind::String, self.depth, base + (from + j + 1) as u64);
            self.after_value();
        }
        from + j + 1
    }

    /// Goes on skipping from `input[i..]`: strings (with their escapes) and brackets are
    /// followed, nothing else is looked at. Ends the skipped value when its bracket closes and
    /// returns the index past it, or the end of `input`.
    fn skip<S: Sink>(&mut self, input: &[u8], mut i: usize, base: u64, sink: &mut S) -> usize {
        let St::Skip {
            mut nest,
            object,
            mut at,
        } = self.st
        else {
            return i;
        };
        while i < input.len() {
            match at {
                Skipping::Str => {
                    // Control bytes are not looked for here.
                    let Some(j) = quote_or_backslash(&input[i..]) else {
                        break;
                    };
                    i += j;
                    at = if input[i] == b'"' {
                        Skipping::Out
                    } else {
                        Skipping::Esc
                    };
                    i += 1;
                }
                Skipping::Esc => {
                    at = Skipping::Str;
                    i += 1;
                }
                Skipping::Out => {
                    let b = input[i];
                    i += 1;
                    match b {
                        b'"' => at = Skipping::Str,
                        b'{' | b'[' => nest += 1,
                        b'}' | b']' => {
                            nest -= 1;
                            if nest == 0 {
                                let kind = if object { Kind::Object } else { Kind::Array };
                                sink.value_end(kind, self.depth, base + i as u64);
                                self.after_value();
                                return i;
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        self.st = St::Skip { nest, object, at };
        input.len()
    }

    fn fail(&mut self, base: u64, input: &[u8], at: u64) -> Result<(), JsonError> {
        self.pos = base + input.len() as u64;
        Err(JsonError::Syntax { at })
    }

    /// Marks the end of the document: a top-level number ends here; anything unfinished is
    /// [`JsonError::Truncated`].
    pub(crate) fn finish<S: Sink>(&mut self, sink: &mut S) -> Result<(), JsonError> {
        match self.st {
            St::Failed(e) => Err(e),
            St::Done => Ok(()),
            St::Num(Num::Zero | Num::Int | Num::Frac | Num::ExpDigits) if self.depth == 0 => {
                sink.value_end(Kind::Number, 0, self.pos);
                self.st = St::Done;
                Ok(())
            }
            _ => {
                self.st = St::Failed(JsonError::Truncated);
                Err(JsonError::Truncated)
            }
        }
    }
}

/// A small fixed buffer for the bytes of a key or short value a scanner wants to compare or keep.
/// Longer input sets `overflow` instead of growing: memory stays fixed whatever the document.
#[derive(Debug)]
pub(crate) struct SmallBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
    overflow: bool,
}

impl<const N: usize> Default for SmallBuf<N> {
    fn default() -> Self {
        Self {
            buf: [0; N],
            len: 0,
            overflow: false,
        }
    }
}

impl<const N: usize> SmallBuf<N> {
    pub(crate) fn clear(&mut self) {
        self.len = 0;
        self.overflow = false;
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        if self.overflow || self.len + bytes.len() > N {
            self.overflow = true;
            return;
        }
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    /// The bytes, or `None` if more than `N` were pushed.
    pub(crate) fn get(&self) -> Option<&[u8]> {
        (!self.overflow).then(|| &self.buf[..self.len])
    }
}

/// The number state after byte `b`, or None where `b` cannot continue a number in state `n`.
#[inline(always)]
fn num_next(n: Num, b: u8) -> Option<Num> {
    match (n, b) {
        (Num::Minus, b'0') => Some(Num::Zero),
        (Num::Minus | Num::Int, b'1'..=b'9') | (Num::Int, b'0') => Some(Num::Int),
        (Num::Zero | Num::Int, b'.') => Some(Num::Dot),
        (Num::Dot | Num::Frac, b'0'..=b'9') => Some(Num::Frac),
        (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Some(Num::Exp),
        (Num::Exp, b'+' | b'-') => Some(Num::ExpSign),
        (Num::Exp | Num::ExpSign | Num::ExpDigits, b'0'..=b'9') => Some(Num::ExpDigits),
        _ => None,
    }
}

/// Whether a number may end in state `n`.
fn num_can_end(n: Num) -> bool {
    matches!(n, Num::Zero | Num::Int | Num::Frac | Num::ExpDigits)
}

/// The length of the number that starts `s` (with `-` or a digit) and its last state, when a
/// byte that cannot continue it follows inside `s`; None when it runs to the end of `s`.
fn number(s: &[u8]) -> Option<(usize, Num)> {
    let mut n = match s.first()? {
        b'-' => Num::Minus,
        b'0' => Num::Zero,
        _ => Num::Int,
    };
    for (k, &b) in s.iter().enumerate().skip(1) {
        match num_next(n, b) {
            Some(next) => n = next,
            None => return Some((k, n)),
        }
    }
    None
}

/// How many bytes of `rest` (inside a string) come before its closing quote, its next escape or
/// a control byte (below 0x20, never valid inside a JSON string).
fn string_run(rest: &[u8]) -> usize {
    // Keys and most values end within a few bytes, where eight bytes tested at once beat both a
    // byte loop and the set-up of a vector search; long content takes the vector search.
    const SHORT: usize = 32;
    let head = &rest[..rest.len().min(SHORT)];
    let mut words = head.chunks_exact(8);
    let mut at = 0;
    for w in &mut words {
        let Ok(w) = <[u8; 8]>::try_from(w) else { break };
        if let Some(k) = string_end(u64::from_le_bytes(w)) {
            return at + k;
        }
        at += 8;
    }
    if let Some(k) = words
        .remainder()
        .iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
    {
        return at + k;
    }
    let tail = &rest[head.len()..];
    let end = memchr2(b'"', b'\\', tail).unwrap_or(tail.len());
    head.len() + first_control(&tail[..end]).unwrap_or(end)
}

/// The index of the first `"`, `\\` or control byte among the eight bytes of `w`
/// (little-endian), if any.
fn string_end(w: u64) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // A byte of `x` below `n` (n <= 0x80) sets its high bit in `below(x, n)`; bits above the
    // first such byte may be set wrongly (a borrow), but the lowest set bit is always exact, and
    // only it is read.
    let below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGHS;
    let hits = below(w ^ (ONES * u64::from(b'"')), 1)
        | below(w ^ (ONES * u64::from(b'\\')), 1)
        | below(w, 0x20);
    (hits != 0).then(|| hits.trailing_zeros() as usize / 8)
}

/// The index of the first `"` or `\\` in `rest`: most strings a skip passes are keys and
/// short values, found in the first eight-byte words without the set-up of a vector search.
fn quote_or_backslash(rest: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let mut at = 0;
    for w in rest.chunks_exact(8).take(2) {
        let Ok(w) = <[u8; 8]>::try_from(w) else { break };
        let w = u64::from_le_bytes(w);
        // The lowest set bit is exact (a borrow only sets bits above a true zero byte).
        let hits = zero(w ^ (ONES * u64::from(b'"'))) | zero(w ^ (ONES * u64::from(b'\\')));
        if hits != 0 {
            return Some(at + hits.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    memchr2(b'"', b'\\', &rest[at..]).map(|k| at + k)
}

/// The first control byte of `run`. The smallest byte of the run decides whether there is one:
/// a `min` fold the compiler turns into one vector instruction per 16 bytes, with a single
/// reduction at the end (per-block folds and lane arrays compiled to far worse code). Only a run
/// holding one is searched byte by byte.
fn first_control(run: &[u8]) -> Option<usize> {
    if run.iter().fold(u8::MAX, |m, &c| m.min(c)) >= 0x20 {
        return None;
    }
    run.iter().position(|&c| c < 0x20)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Records every event as text so two runs can be compared exactly.
    #[derive(Default, Debug, PartialEq)]
    pub(crate) struct Log(pub Vec<String>);

    impl Sink for Log {
        fn value_start(&mut self, kind: Kind, depth: usize, at: u64) {
            self.0.push(format!("start {kind:?} {depth} {at}"));
        }
        fn value_end(&mut self, kind: Kind, depth: usize, end: u64) {
            self.0.push(format!("end {kind:?} {depth} {end}"));
        }
        fn key_start(&mut self, depth: usize) {
            self.0.push(format!("key {depth}"));
        }
        fn key_end(&mut self, depth: usize) {
            self.0.push(format!("/key {depth}"));
        }
        fn string_bytes(&mut self, key: bool, bytes: &[u8]) {
            // Merge adjacent pieces so that split points do not change the log.
            let tag = if key { "k:" } else { "s:" };
            // Byte by byte, so that a character split between pieces shows the same.
            let s = bytes.escape_ascii().to_string();
            if let Some(last) = self.0.last_mut() {
                if last.starts_with(tag) {
                    last.push_str(&s);
                    return;
                }
            }
            self.0.push(format!("{tag}{s}"));
        }
        fn scalar_bytes(&mut self, bytes: &[u8]) {
            let s = bytes.escape_ascii().to_string();
            if let Some(last) = self.0.last_mut() {
                if last.starts_with("v:") {
                    last.push_str(&s);
                    return;
                }
            }
            self.0.push(format!("v:{s}"));
        }
    }

    fn scan_split(doc: &[u8], cuts: &[usize]) -> (Log, Result<(), JsonError>) {
        let mut s = Scanner::new();
        let mut log = Log::default();
        let mut prev = 0;
        for &c in cuts.iter().chain(std::iter::once(&doc.len())) {
            if let Err(e) = s.feed(&doc[prev..c], &mut log) {
                return (log, Err(e));
            }
            prev = c;
        }
        let r = s.finish(&mut log);
        (log, r)
    }

    /// Whole, split at every offset, and one byte at a time must agree.
    fn check_splits(doc: &[u8]) -> (Log, Result<(), JsonError>) {
        let whole = scan_split(doc, &[]);
        for k in 0..=doc.len() {
            assert_eq!(scan_split(doc, &[k]), whole, "split at {k}");
        }
        let bytes: Vec<usize> = (1..doc.len()).collect();
        assert_eq!(scan_split(doc, &bytes), whole, "byte at a time");
        whole
    }

    #[test]
    fn valid_documents_scan_the_same_at_every_split() {
        for doc in [
            &br#"{"a":[1,-2.5e+3,true,false,null,{}],"b":"x\"y\\u\u00e9\ud83d\ude00z","c":{"d":[]}}"#[..],
            b" 0 ",
            b"-0.0E-0",
            b"\"\\ud800x\"",
            b"[[[]],\"\"]",
        ] {
            let (_, r) = check_splits(doc);
            assert_eq!(r, Ok(()), "{}", String::from_utf8_lossy(doc));
        }
    }

    #[test]
    fn escapes_decode_including_surrogate_pairs() {
        let (log, r) = check_splits(br#"["\u00e9\ud83d\ude00\n\/", "\udc00"]"#);
        assert_eq!(r, Ok(()));
        let decoded = |text: &str| format!("s:{}", text.as_bytes().escape_ascii());
        assert!(log.0.contains(&decoded("é😀\n/")), "{log:?}");
        assert!(log.0.contains(&decoded("\u{FFFD}")), "{log:?}");
    }

    #[test]
    fn offsets_are_absolute() {
        let (log, _) = check_splits(br#" {"k": "vv"} "#);
        assert_eq!(
            log.0,
            vec![
                "start Object 0 1",
                "key 1",
                "k:k",
                "/key 1",
                "start String 1 7",
                "s:vv",
                "end String 1 11",
                "end Object 0 12"
            ]
        );
    }

    #[test]
    fn invalid_documents_are_rejected_at_every_split() {
        for doc in [
            &b"{"[..],
            b"",
            b"{\"a\" 1}",
            b"{\"a\":1,}",
            b"[1,]",
            b"[1 2]",
            b"{} {}",
            b"01",
            b"-",
            b"1.",
            b"1e",
            b"tru",
            b"trux",
            b"\"a\nb\"",
            b"\"\\x\"",
            b"\"\\u12g4\"",
            b"{]",
            b"[}",
            b"}",
            b"{1:2}",
        ] {
            let (_, r) = check_splits(doc);
            assert!(r.is_err(), "{}", String::from_utf8_lossy(doc));
        }
    }

    #[test]
    fn depth_is_bounded() {
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert_eq!(scan_split(ok.as_bytes(), &[]).1, Ok(()));
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert_eq!(
            scan_split(deep.as_bytes(), &[]).1,
            Err(JsonError::TooDeep {
                at: MAX_DEPTH as u64
            })
        );
    }

    #[test]
    fn errors_are_sticky() {
        let mut s = Scanner::new();
        let mut log = Log::default();
        assert!(s.feed(b"[x", &mut log).is_err());
        assert!(s.feed(b"]", &mut log).is_err());
        assert!(s.finish(&mut log).is_err());
    }

    /// A small deterministic generator (xorshift), so failures reproduce.
    struct Gen(u64);

    impl Gen {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }

        fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
            from[self.below(from.len())]
        }

        fn ws(&mut self, out: &mut String) {
            if self.below(4) == 0 {
                out.push_str(self.pick(&[" ", "\n", "\t ", "\r\n  "]));
            }
        }

        /// A valid document, with escapes, numbers of every shape and nesting.
        fn value(&mut self, depth: usize, out: &mut String) {
            let leaf = depth > 4 || self.below(3) == 0;
            match if leaf {
                2 + self.below(3)
            } else {
                self.below(2)
            } {
                0 => {
                    out.push('{');
                    for k in 0..self.below(4) {
                        if k > 0 {
                            out.push(',');
                        }
                        self.ws(out);
                        self.string(out);
                        self.ws(out);
                        out.push(':');
                        self.ws(out);
                        self.value(depth + 1, out);
                        self.ws(out);
                    }
                    out.push('}');
                }
                1 => {
                    out.push('[');
                    for k in 0..self.below(4) {
                        if k > 0 {
                            out.push(',');
                        }
                        self.ws(out);
                        self.value(depth + 1, out);
                        self.ws(out);
                    }
                    out.push(']');
                }
                2 => self.string(out),
                3 => out.push_str(self.pick(&[
                    "0",
                    "-0",
                    "12",
                    "-3.25",
                    "1e9",
                    "2E+3",
                    "7.5e-2",
                    "1700000000",
                ])),
                _ => out.push_str(self.pick(&["true", "false", "null"])),
            }
        }

        fn string(&mut self, out: &mut String) {
            out.push('"');
            for _ in 0..self.below(6) {
                out.push_str(self.pick(&[
                    "a",
                    "usage",
                    "x y z",
                    "\\\"",
                    "\\\\",
                    "\\n",
                    "\\u00e9",
                    "\\ud83d\\ude00",
                    "\u{e9}",
                    "{[",
                    "]}",
                    ",:",
                    "0123456789abcdefghij0123456789abcdefghij",
                ]));
            }
            out.push('"');
        }
    }

    /// The [`Log`] of a sink that skips containers from `depth` down.
    struct Skipper(Log, usize);

    impl Sink for Skipper {
        fn value_start(&mut self, kind: Kind, depth: usize, at: u64) {
            self.0.value_start(kind, depth, at);
        }
        fn value_end(&mut self, kind: Kind, depth: usize, end: u64) {
            self.0.value_end(kind, depth, end);
        }
        fn key_start(&mut self, depth: usize) {
            self.0.key_start(depth);
        }
        fn key_end(&mut self, depth: usize) {
            self.0.key_end(depth);
        }
        fn string_bytes(&mut self, key: bool, bytes: &[u8]) {
            self.0.string_bytes(key, bytes);
        }
        fn scalar_bytes(&mut self, bytes: &[u8]) {
            self.0.scalar_bytes(bytes);
        }
        fn skips(&mut self, depth: usize) -> bool {
            depth >= self.1
        }
    }

    /// `log` less the events inside objects and arrays at `from` or deeper (their own start and
    /// end kept): what a sink skipping from `from` should see.
    fn without_skipped(log: &Log, from: usize) -> Log {
        let depth = |line: &str| line.split(' ').nth(2).and_then(|d| d.parse::<usize>().ok());
        let container = |line: &str, what: &str| {
            line.starts_with(&format!("{what} Object"))
                || line.starts_with(&format!("{what} Array"))
        };
        let mut out = Vec::new();
        let mut inside: Option<usize> = None;
        for line in &log.0 {
            match inside {
                Some(d) => {
                    if container(line, "end") && depth(line) == Some(d) {
                        out.push(line.clone());
                        inside = None;
                    }
                }
                None => {
                    out.push(line.clone());
                    if container(line, "start") && depth(line).is_some_and(|d| d >= from) {
                        inside = depth(line);
                    }
                }
            }
        }
        Log(out)
    }

    fn scan_cuts<S: Sink>(doc: &[u8], cuts: &[usize], sink: &mut S) -> Result<(), JsonError> {
        let mut s = Scanner::new();
        let mut prev = 0;
        for &c in cuts.iter().chain(std::iter::once(&doc.len())) {
            s.feed(&doc[prev..c], sink)?;
            prev = c;
        }
        s.finish(sink)
    }

    /// The token path (whole tokens in one slice) and the byte loop (one byte at a time) give
    /// the same events and the same verdict, as do random splits, with and without skipping;
    /// the verdict is serde_json's wherever a document has no `\u` escape (lone surrogates are
    /// a matter of policy) and is not skipped.
    #[test]
    fn token_path_and_byte_loop_agree_on_generated_documents() {
        const BYTES: &[u8] = b"{}[]:,\"\\ \n0159-+.eEtrufalsn\x01\xc3";
        let mut g = Gen(0x2545_F491_4F6C_DD1D);
        for round in 0..20_000 {
            let mut text = String::new();
            g.ws(&mut text);
            g.value(0, &mut text);
            g.ws(&mut text);
            let mut doc = text.into_bytes();
            let valid = round % 3 != 0;
            if !valid {
                for _ in 0..=g.below(3) {
                    let at = g.below(doc.len() + 1);
                    let b = BYTES[g.below(BYTES.len())];
                    match g.below(3) {
                        0 if at < doc.len() => doc[at] = b,
                        1 if at < doc.len() => {
                            doc.remove(at);
                        }
                        _ => doc.insert(at, b),
                    }
                }
            }
            let bytes: Vec<usize> = (1..doc.len()).collect();
            let mut cuts: Vec<usize> = (0..3).map(|_| g.below(doc.len() + 1)).collect();
            cuts.sort_unstable();
            let shown = String::from_utf8_lossy(&doc).into_owned();

            let mut whole = Log::default();
            let verdict = scan_cuts(&doc, &[], &mut whole);
            for split in [&bytes, &cuts] {
                let mut log = Log::default();
                let r = scan_cuts(&doc, split, &mut log);
                assert_eq!((&log, r), (&whole, verdict), "{shown} cut at {split:?}");
            }
            if valid {
                assert_eq!(verdict, Ok(()), "{shown}");
            }
            if !doc.windows(2).any(|w| w == b"\\u") {
                let serde = serde_json::from_slice::<serde::de::IgnoredAny>(&doc).is_ok();
                assert_eq!(verdict.is_ok(), serde, "{shown}");
            }

            let from = 1 + g.below(3);
            let mut skipped = Skipper(Log::default(), from);
            let verdict = scan_cuts(&doc, &[], &mut skipped);
            for split in [&bytes, &cuts] {
                let mut log = Skipper(Log::default(), from);
                let r = scan_cuts(&doc, split, &mut log);
                assert_eq!(
                    (&log.0, r),
                    (&skipped.0, verdict),
                    "{shown} skip {from} cut at {split:?}"
                );
            }
            if valid {
                assert_eq!(verdict, Ok(()), "{shown} skip {from}");
                // What a skip reports is the full scan's events with those inside each skipped
                // container taken out: the same starts, and the same ends at the same offsets.
                assert_eq!(
                    skipped.0,
                    without_skipped(&whole, from),
                    "{shown} skip {from}"
                );
            }
        }
    }

    /// A skip's string ends at the first quote or backslash wherever it sits (in the words or
    /// the tail), and at no byte merely near one.
    #[test]
    fn a_skipped_string_ends_at_the_first_quote_or_backslash() {
        for len in 0..60 {
            let text: Vec<u8> = b" !#[]\x7f\x00\xc3\xa9x"
                .iter()
                .copied()
                .cycle()
                .take(len)
                .collect();
            assert_eq!(quote_or_backslash(&text), None, "{text:?}");
            for at in 0..len {
                for end in [b'"', b'\\'] {
                    let mut t = text.clone();
                    t[at] = end;
                    if at + 2 < len {
                        t[at + 2] = b'"';
                    }
                    assert_eq!(
                        quote_or_backslash(&t),
                        Some(at),
                        "{end:#x} at {at} of {len}"
                    );
                }
            }
        }
    }

    /// A string's run ends at the first quote, backslash or control byte wherever it sits (in
    /// the eight-byte words, their remainder or the long tail), and never at a byte merely near
    /// one in value (0x20, 0x21, 0x5b, 0x7f, 0x80 and up: UTF-8).
    #[test]
    fn string_runs_end_exactly_at_the_first_end_byte() {
        let fillers: [&[u8]; 3] = [b"x", b" !#[]\x7f", "\u{e9}\u{4e2d}\u{1f600}".as_bytes()];
        for filler in fillers {
            for len in 0..80 {
                let text: Vec<u8> = filler.iter().copied().cycle().take(len).collect();
                assert_eq!(string_run(&text), len, "no end in {text:?}");
                for at in 0..len {
                    for end in [b'"', b'\\', 0x00, 0x0a, 0x1f] {
                        let mut t = text.clone();
                        t[at] = end;
                        // A second end later must not move the first.
                        if at + 3 < len {
                            t[at + 3] = b'"';
                        }
                        assert_eq!(string_run(&t), at, "end {end:#x} at {at} of {len}");
                    }
                }
            }
        }
    }
}
