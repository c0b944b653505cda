//! The SNI name in a ClientHello, read from the first bytes a client sends.
//!
//! rustls's unbuffered server connection does not expose the name it saw, and the access log
//! and limit keys want it; this reads it from the record rustls is about to process. A hello
//! that does not parse here yields `None`; rustls still judges the real handshake.

/// The server_name (host_name) of the ClientHello at the start of `buf`, if complete there.
pub(crate) fn client_hello_sni(buf: &[u8]) -> Option<String> {
    // TLSPlaintext: type 22 (handshake), version, length.
    let mut r = Reader(buf);
    if r.u8()? != 22 {
        return None;
    }
    r.take(2)?;
    let rec_len = r.u16()? as usize;
    let mut rec = Reader(r.take(rec_len)?);
    // Handshake: type 1 (client_hello), 24-bit length.
    if rec.u8()? != 1 {
        return None;
    }
    let hs_len = rec.u24()?;
    let mut ch = Reader(rec.take(hs_len)?);
    ch.take(2 + 32)?; // legacy_version, random
    let sid = ch.u8()? as usize;
    ch.take(sid)?;
    let suites = ch.u16()? as usize;
    ch.take(suites)?;
    let comp = ch.u8()? as usize;
    ch.take(comp)?;
    let ext_len = ch.u16()? as usize;
    let mut exts = Reader(ch.take(ext_len)?);
    while !exts.0.is_empty() {
        let typ = exts.u16()?;
        let len = exts.u16()? as usize;
        let body = exts.take(len)?;
        if typ != 0 {
            continue;
        }
        // ServerNameList: u16 length, then (type u8, u16 length, name).
        let mut list = Reader(body);
        let list_len = list.u16()? as usize;
        let mut names = Reader(list.take(list_len)?);
        while !names.0.is_empty() {
            let kind = names.u8()?;
            let n = names.u16()? as usize;
            let name = names.take(n)?;
            let printable = name
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(b));
            if kind == 0 && !name.is_empty() && printable {
                return std::str::from_utf8(name).ok().map(str::to_ascii_lowercase);
            }
        }
        return None;
    }
    None
}

/// A bounds-checked cursor; every read that would pass the end gives `None`.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello record with one extension list.
    fn hello(exts: &[u8]) -> Vec<u8> {
        let mut ch = vec![3, 3];
        ch.extend([7u8; 32]);
        ch.extend([0]); // session id
        ch.extend([0, 2, 0x13, 0x01]); // one suite
        ch.extend([1, 0]); // null compression
        ch.extend((exts.len() as u16).to_be_bytes());
        ch.extend(exts);
        let mut hs = vec![1, 0, (ch.len() >> 8) as u8, ch.len() as u8];
        hs.extend(ch);
        let mut rec = vec![22, 3, 1, (hs.len() >> 8) as u8, hs.len() as u8];
        rec.extend(hs);
        rec
    }

    fn sni_ext(name: &[u8]) -> Vec<u8> {
        let mut list = vec![0];
        list.extend((name.len() as u16).to_be_bytes());
        list.extend(name);
        let mut body = (list.len() as u16).to_be_bytes().to_vec();
        body.extend(list);
        let mut ext = vec![0, 0];
        ext.extend((body.len() as u16).to_be_bytes());
        ext.extend(body);
        ext
    }

    #[test]
    fn finds_the_name_after_other_extensions() {
        let mut exts = vec![0, 10, 0, 2, 0, 0]; // supported_groups, junk body
        exts.extend(sni_ext(b"API.Example.com"));
        assert_eq!(
            client_hello_sni(&hello(&exts)).as_deref(),
            Some("api.example.com")
        );
    }

    #[test]
    fn no_sni_truncated_or_garbage_gives_none() {
        assert_eq!(client_hello_sni(&hello(&[])), None);
        let full = hello(&sni_ext(b"a.test"));
        for cut in 0..full.len() {
            assert_eq!(client_hello_sni(&full[..cut]), None, "cut at {cut}");
        }
        assert_eq!(client_hello_sni(b"GET / HTTP/1.1\r\n\r\n"), None);
        assert_eq!(client_hello_sni(&hello(&sni_ext(b"bad name\n"))), None);
    }
}
