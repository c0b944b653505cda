//! Failures on demand, for a flaky demo upstream: the `x-demo-fail` request header picks an
//! error status, a stall or a reset, so `ringway demo` can show a fallback to a second
//! provider.
//!
//! Only an instance started flaky looks at the header. A fallback forwards the same request,
//! header included, to the next provider, and that one must answer normally.

use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::Duration;

use super::anthropic;
use super::http::{After, Conn, Request, Response};
use super::openai;
use super::prompt::Dialect;

/// The request header a flaky instance obeys.
pub const HEADER: &str = "x-demo-fail";
/// How long a stalled request is held before the connection is closed: longer than any
/// sensible upstream timeout, short enough that a forgotten client does not pin a thread.
const STALL_LIMIT: Duration = Duration::from_secs(60);
/// The values the header accepts, for the error that refuses any other.
const VALUES: &str = "429, 500, 502, 503, 504, 529, stall or reset";

/// Whether an instance acts on `x-demo-fail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Faults {
    /// A healthy provider: the header is ignored.
    Ignore,
    /// A flaky provider: the header is obeyed.
    OnDemand,
}

/// An error status a request can ask for, with the body fields each provider would send.
#[derive(Debug, PartialEq, Eq)]
struct StatusFault {
    status: u16,
    /// The header value that asks for it.
    value: &'static str,
    /// The end of the error message.
    what: &'static str,
    openai_type: &'static str,
    openai_code: &'static str,
    anthropic_type: &'static str,
}

const fn status_fault(
    status: u16,
    value: &'static str,
    what: &'static str,
    openai: (&'static str, &'static str),
    anthropic_type: &'static str,
) -> StatusFault {
    StatusFault {
        status,
        value,
        what,
        openai_type: openai.0,
        openai_code: openai.1,
        anthropic_type,
    }
}

/// The error statuses on offer; the types are the ones OpenAI and Anthropic use for them.
const STATUS_FAULTS: [StatusFault; 6] = [
    status_fault(
        429,
        "429",
        "rate limit reached, retry after 1 s",
        ("requests", "rate_limit_exceeded"),
        "rate_limit_error",
    ),
    status_fault(
        500,
        "500",
        "internal server error",
        ("server_error", "internal_error"),
        "api_error",
    ),
    status_fault(
        502,
        "502",
        "bad gateway",
        ("server_error", "bad_gateway"),
        "api_error",
    ),
    status_fault(
        503,
        "503",
        "service unavailable",
        ("server_error", "service_unavailable"),
        "api_error",
    ),
    status_fault(
        504,
        "504",
        "gateway timeout",
        ("server_error", "timeout"),
        "timeout_error",
    ),
    status_fault(
        529,
        "529",
        "overloaded",
        ("server_error", "overloaded"),
        "overloaded_error",
    ),
];

/// A failure a request asked for.
#[derive(Debug, PartialEq, Eq)]
enum Fault {
    /// Answer this error status with a JSON error body.
    Status(&'static StatusFault),
    /// Read the request, then send nothing until the client leaves or `STALL_LIMIT` passes.
    Stall,
    /// Close the connection with a TCP reset, without answering.
    Reset,
}

impl Fault {
    /// The failure a header value names, or `None` for a value that names none.
    fn parse(value: &[u8]) -> Option<Fault> {
        let value = value.trim_ascii();
        if value.eq_ignore_ascii_case(b"stall") {
            return Some(Fault::Stall);
        }
        if value.eq_ignore_ascii_case(b"reset") {
            return Some(Fault::Reset);
        }
        STATUS_FAULTS
            .iter()
            .find(|f| f.value.as_bytes() == value)
            .map(Fault::Status)
    }
}

/// Carries out the failure the request's `x-demo-fail` asks for: `None` when it has no such
/// header (answer normally), else how the connection ends. An unknown value is answered 400.
pub fn inject(conn: &mut Conn<'_>, req: &Request) -> Option<io::Result<After>> {
    let value = req.header(HEADER)?;
    let dialect = Dialect::of_path(&req.path);
    Some(match Fault::parse(value) {
        Some(Fault::Status(f)) => {
            status_error(f, dialect).and_then(|r| r.write(conn.stream(), req.mode))
        }
        Some(Fault::Stall) => {
            conn.discard_until_eof(STALL_LIMIT);
            Ok(After::Close)
        }
        Some(Fault::Reset) => {
            reset_on_close(conn.stream());
            Ok(After::Abandon)
        }
        None => unknown_value(value, dialect).and_then(|r| r.write(conn.stream(), req.mode)),
    })
}

/// The answer for an error-status fault, in the shape of the endpoint's API.
fn status_error(f: &StatusFault, dialect: Dialect) -> io::Result<Response> {
    let message = format!(
        "The demo upstream failed on request ({HEADER}: {}): {}.",
        f.value, f.what
    );
    let answer = match dialect {
        Dialect::OpenAi => {
            let e = openai::ErrorBody::new(&message, f.openai_type, f.openai_code);
            Response::json(f.status, &e)?
        }
        Dialect::Anthropic => {
            let e = anthropic::ErrorBody::new(f.anthropic_type, &message);
            Response::json(f.status, &e)?
        }
    };
    // What providers send with a 429, and what a gateway's retry logic reads.
    Ok(if f.status == 429 {
        answer.with_header("Retry-After", "1")
    } else {
        answer
    })
}

/// The 400 for a header value that names no failure; it names the header and what it takes.
fn unknown_value(value: &[u8], dialect: Dialect) -> io::Result<Response> {
    // The value is echoed for the caller's benefit, cut short: it came off the network.
    let shown: String = String::from_utf8_lossy(value).chars().take(64).collect();
    let message = format!("Unknown {HEADER} value {shown:?}: use {VALUES}.");
    match dialect {
        Dialect::OpenAi => {
            let e = openai::ErrorBody::with_param(
                &message,
                "invalid_request_error",
                "invalid_demo_fail",
                Some(HEADER),
            );
            Response::json(400, &e)
        }
        Dialect::Anthropic => {
            let e = anthropic::ErrorBody::new("invalid_request_error", &message);
            Response::json(400, &e)
        }
    }
}

/// Makes closing the socket send a RST rather than a FIN (`SO_LINGER` with a zero timeout), so
/// the client sees a reset connection. Should the option fail, the close is an ordinary FIN:
/// still a connection closed without an answer.
fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the descriptor is an open socket owned by `stream`; setsockopt only reads one
    // `linger` we own, of the length passed.
    let _ = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast::<libc::c_void>(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values() {
        for f in &STATUS_FAULTS {
            assert_eq!(Fault::parse(f.value.as_bytes()), Some(Fault::Status(f)));
            assert_eq!(f.value, f.status.to_string());
        }
        assert_eq!(
            Fault::parse(b" 503\t"),
            Some(Fault::Status(&STATUS_FAULTS[3]))
        );
        assert_eq!(Fault::parse(b"stall"), Some(Fault::Stall));
        assert_eq!(Fault::parse(b"Reset"), Some(Fault::Reset));
        for unknown in [
            &b""[..],
            b"404",
            b"0429",
            b"+429",
            b"5033",
            b"stal",
            b"\xff",
        ] {
            assert_eq!(Fault::parse(unknown), None, "{unknown:?}");
        }
    }
}
