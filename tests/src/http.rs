//! Reading the raw HTTP/1.0 responses that the fixtures' hand-written clients receive (the S3
//! server's API, the instance manager's endpoints).

/// The status code (0 when there is none) and the body (empty when there is none) of a whole
/// HTTP response.
pub fn status_and_body(response: &str) -> (u16, String) {
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (code, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_code_and_the_body_and_tolerates_a_cut_response() {
        assert_eq!(
            status_and_body("HTTP/1.0 404 Not Found\r\nServer: x\r\n\r\nno such key"),
            (404, "no such key".to_string())
        );
        assert_eq!(status_and_body(""), (0, String::new()));
    }
}
