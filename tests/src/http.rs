//! Reading the raw HTTP/1.0 responses that the fixtures' hand-written clients receive (the S3
//! server's API, the instance manager's endpoints), and one such client for local endpoints.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1.0 request to `127.0.0.1:port`: (status code, body); an error when nothing
/// answers, the answer has no status line, or it takes more than 20 s (a loaded machine's answer
/// takes a while, a stuck one must not hang a test).
pub async fn request(port: u16, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(
                format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        anyhow::Ok(status_and_body(&response))
    };
    let (code, body) = tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .map_err(|_| anyhow::anyhow!("{method} {path} on port {port}: no answer in 20 s"))??;
    anyhow::ensure!(
        code != 0,
        "{method} {path} on port {port}: no HTTP status in the answer"
    );
    Ok((code, body))
}

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
