//! Errors the gateway answers itself, as JSON in OpenAI's shape:
//! `{"error":{"message":"…","type":"…","code":"…"}}`.

/// A response Ringway writes itself instead of the upstream's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reject {
    /// HTTP status.
    pub status: u16,
    /// Human-readable message (static: no allocation to reject).
    pub message: &'static str,
    /// Machine-readable code.
    pub code: &'static str,
    /// Whether the client connection must close after this response.
    pub close: bool,
}

impl Reject {
    /// A rejection that closes the connection.
    pub const fn closing(status: u16, code: &'static str, message: &'static str) -> Self {
        Self {
            status,
            message,
            code,
            close: true,
        }
    }

    /// A rejection after which the connection may serve the next request.
    pub const fn keep(status: u16, code: &'static str, message: &'static str) -> Self {
        Self {
            status,
            message,
            code,
            close: false,
        }
    }

    /// The same rejection, closing the connection when `close` holds.
    pub const fn closing_if(mut self, close: bool) -> Self {
        self.close = self.close || close;
        self
    }

    /// The error `type` field for this status.
    pub fn kind(&self) -> &'static str {
        if self.code == BUDGET_EXCEEDED.code {
            // OpenAI's type for a spent quota, which SDKs and clients already recognise.
            return "insufficient_quota";
        }
        match self.status {
            400 | 405 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_exceeded",
            431 => "request_header_fields_too_large",
            502 => "bad_gateway",
            503 => "service_unavailable",
            504 => "gateway_timeout",
            501 | 505 => "not_implemented",
            _ => "api_error",
        }
    }

    /// The whole response, head and body. `head_only` leaves the body out
    /// (the request was HEAD) while keeping its Content-Length.
    pub fn render(&self, head_only: bool, extra_headers: &str) -> Vec<u8> {
        let body = format!(
            "{{\"error\":{{\"message\":{},\"type\":\"{}\",\"code\":\"{}\"}}}}\n",
            crate::admin::json_str(self.message),
            self.kind(),
            self.code
        );
        let mut out =
            format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}{}\r\n",
            self.status,
            reason(self.status),
            body.len(),
            if self.close { "connection: close\r\n" } else { "" },
            extra_headers,
        )
            .into_bytes();
        if !head_only {
            out.extend_from_slice(body.as_bytes());
        }
        out
    }
}

/// The standard reason phrase (RFC 9110 §15, IANA registry) for a status;
/// an unregistered code gets its class's generic phrase.
pub fn reason(status: u16) -> &'static str {
    registered_reason(status).unwrap_or(match status / 100 {
        1 => "Informational",
        2 => "Success",
        3 => "Redirection",
        4 => "Client Error",
        _ => "Server Error",
    })
}

/// The IANA-registered reason phrase, for registered codes.
fn registered_reason(status: u16) -> Option<&'static str> {
    Some(match status {
        100 => "Continue",
        101 => "Switching Protocols",
        102 => "Processing",
        103 => "Early Hints",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        203 => "Non-Authoritative Information",
        204 => "No Content",
        205 => "Reset Content",
        206 => "Partial Content",
        207 => "Multi-Status",
        208 => "Already Reported",
        226 => "IM Used",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        305 => "Use Proxy",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        423 => "Locked",
        424 => "Failed Dependency",
        425 => "Too Early",
        426 => "Upgrade Required",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        451 => "Unavailable For Legal Reasons",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        506 => "Variant Also Negotiates",
        507 => "Insufficient Storage",
        508 => "Loop Detected",
        511 => "Network Authentication Required",
        _ => return None,
    })
}

/// Key auth found no known key.
pub const UNAUTHORIZED: Reject = Reject::keep(401, "invalid_api_key", "missing or unknown API key");
/// A cost-limit's budget is spent for this key.
pub const BUDGET_EXCEEDED: Reject = Reject::keep(
    429,
    "budget_exceeded",
    "the spend budget for this key is used up for the current window; retry after it resets",
);
/// The model has no `[[prices]]` entry and a cost-limit on the route refuses unpriced models.
pub const MODEL_NOT_PRICED: Reject = Reject::keep(
    400,
    "model_not_priced",
    "no [[prices]] entry matches the requested model, and the route's spend budget cannot count it",
);
/// A request limit refused the request.
pub const RATE_LIMITED: Reject = Reject::keep(
    429,
    "rate_limit_exceeded",
    "rate limit exceeded for this key; retry later",
);
/// No route matched.
pub const NO_ROUTE: Reject = Reject::keep(404, "route_not_found", "no route matches this request");
/// The body announced by Content-Length exceeds `max_body_bytes`.
pub const BODY_TOO_LARGE: Reject =
    Reject::closing(413, "body_too_large", "request body exceeds max_body_bytes");
/// The upstream refused or reset the connection, or answered garbage.
pub const BAD_GATEWAY: Reject =
    Reject::keep(502, "upstream_error", "the upstream failed to answer");
/// Plain HTTP arrived on a TLS listener.
pub const PLAIN_HTTP_TO_TLS: Reject = Reject::closing(
    400,
    "plain_http_to_tls_port",
    "the plain HTTP request was sent to an HTTPS port",
);
/// The TLS handshake with the upstream failed (unknown CA, wrong name,
/// expired certificate, protocol error); the log line names the reason.
pub const UPSTREAM_TLS_ERROR: Reject = Reject::keep(
    502,
    "upstream_tls_error",
    "the TLS handshake with the upstream failed",
);
/// The upstream could not be connected to.
pub const CONNECT_FAILED: Reject = Reject::keep(
    502,
    "upstream_connect_failed",
    "cannot connect to the upstream",
);
/// No upstream address is known.
pub const NO_ENDPOINT: Reject = Reject::keep(
    502,
    "no_upstream_endpoint",
    "the upstream has no resolved endpoint",
);
/// The upstream sent an invalid response head.
pub const BAD_RESPONSE: Reject = Reject::closing(
    502,
    "upstream_bad_response",
    "the upstream sent an invalid response",
);
/// Every endpoint of the upstream is ejected as unhealthy.
pub const ALL_DOWN: Reject = Reject::keep(
    503,
    "no_healthy_upstream",
    "every upstream endpoint is down",
);
/// All upstream connection slots stayed busy.
pub const NO_SLOT: Reject = Reject::keep(
    503,
    "upstream_busy",
    "no upstream connection slot became free in time",
);
/// Every provider key of the upstream was refused (401/403) since the last reload.
pub const NO_KEY: Reject = Reject::keep(
    503,
    "no_upstream_key",
    "every provider key of the upstream was refused by the provider; fix the keys and reload",
);
/// The buffer pool stayed empty.
pub const NO_BUFFER: Reject = Reject::keep(503, "gateway_busy", "the gateway is out of buffers");
/// Connecting took longer than `connect_timeout`.
pub const CONNECT_TIMEOUT: Reject = Reject::keep(
    504,
    "upstream_connect_timeout",
    "connecting to the upstream timed out",
);
/// The response head took longer than `response_timeout`.
pub const RESPONSE_TIMEOUT: Reject = Reject::closing(
    504,
    "upstream_timeout",
    "the upstream did not answer in time",
);
/// The request body was invalid or ended early.
pub const BAD_BODY: Reject = Reject::closing(400, "invalid_body", "invalid request body framing");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejection_is_json_with_length() {
        let out = String::from_utf8(NO_ROUTE.render(false, "")).unwrap();
        assert!(out.starts_with("HTTP/1.1 404 Not Found\r\n"));
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(body.contains("\"type\":\"not_found_error\""));
        assert!(!head.contains("connection: close"));
    }

    #[test]
    fn every_status_ringway_writes_has_its_standard_reason() {
        for (status, phrase) in [
            (400, "Bad Request"),
            (401, "Unauthorized"),
            (404, "Not Found"),
            (408, "Request Timeout"),
            (413, "Content Too Large"),
            (429, "Too Many Requests"),
            (431, "Request Header Fields Too Large"),
            (501, "Not Implemented"),
            (502, "Bad Gateway"),
            (503, "Service Unavailable"),
            (504, "Gateway Timeout"),
            (505, "HTTP Version Not Supported"),
        ] {
            assert_eq!(reason(status), phrase);
        }
        assert_eq!(reason(599), "Server Error");
        assert_eq!(reason(299), "Success");
    }

    #[test]
    fn head_request_gets_no_body() {
        let out = BAD_GATEWAY.render(true, "");
        assert!(out.ends_with(b"\r\n\r\n"));
    }
}
