//! One exchange on one QUIC stream: write a frame, read a frame, stream a blob. Every read is
//! bounded: a header first (fixed 8 bytes), then exactly the declared body if it is within the
//! caller's limit; blob bytes are copied in bounded pieces to a file, never collected whole.

use std::path::Path;

use quinn::{RecvStream, SendStream};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::AsyncWriteExt;

use super::TransportError;
use crate::protocol::FrameError;
use crate::protocol::blob::CHUNK_BYTES;
use crate::protocol::frame::{self, FrameHeader, HEADER_LEN};

/// Writes one message as a frame.
pub async fn write_message<T: Serialize>(
    send: &mut SendStream,
    message: &T,
) -> Result<(), TransportError> {
    let bytes = frame::encode(message)?;
    send.write_all(&bytes)
        .await
        .map_err(|e| TransportError::Write(e.to_string()))
}

/// Reads one frame's header and body, refusing a body over `limit` before reading it.
pub async fn read_frame(recv: &mut RecvStream, limit: usize) -> Result<Vec<u8>, TransportError> {
    let mut header = [0u8; HEADER_LEN];
    recv.read_exact(&mut header).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(got) => TransportError::Frame(FrameError::Truncated {
            expected: HEADER_LEN,
            got,
        }),
        quinn::ReadExactError::ReadError(e) => TransportError::Read(e.to_string()),
    })?;
    let header = FrameHeader::parse(&header, limit)?;
    // Memory grows with the bytes that arrive, not with the length a peer declares: a header
    // claiming the limit and then silence costs one chunk.
    let len = header.len as usize;
    let mut body = Vec::with_capacity(len.min(CHUNK_BYTES));
    while body.len() < len {
        match recv.read_chunk(len - body.len(), true).await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                return Err(TransportError::Frame(FrameError::Truncated {
                    expected: len,
                    got: body.len(),
                }));
            }
            Err(e) => return Err(TransportError::Read(e.to_string())),
        }
    }
    Ok(body)
}

/// Reads one message of at most `limit` body bytes.
pub async fn read_message<T: DeserializeOwned>(
    recv: &mut RecvStream,
    limit: usize,
) -> Result<T, TransportError> {
    let body = read_frame(recv, limit).await?;
    Ok(frame::decode_body(&body)?)
}

/// Streams `len` bytes of `file` from `offset` to `send`.
pub async fn send_file(
    send: &mut SendStream,
    path: &Path,
    offset: u64,
    len: u64,
) -> Result<(), TransportError> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(std::io::SeekFrom::Start(offset)).await?;
    let mut left = len;
    let mut buf = vec![0u8; CHUNK_BYTES];
    while left > 0 {
        let want = (left as usize).min(buf.len());
        file.read_exact(&mut buf[..want]).await?;
        send.write_all(&buf[..want])
            .await
            .map_err(|e| TransportError::Write(e.to_string()))?;
        left -= want as u64;
    }
    Ok(())
}

/// Sends bytes held in memory.
pub async fn send_bytes(send: &mut SendStream, bytes: &[u8]) -> Result<(), TransportError> {
    for chunk in bytes.chunks(CHUNK_BYTES) {
        send.write_all(chunk)
            .await
            .map_err(|e| TransportError::Write(e.to_string()))?;
    }
    Ok(())
}

/// Appends what arrives on `recv` (until the peer finishes the stream) to the file at `path`,
/// at most `max` bytes; returns the bytes appended. Data already written stays on disk when the
/// stream breaks, so the transfer can resume from the file's length.
pub async fn receive_to_file(
    recv: &mut RecvStream,
    path: &Path,
    max: u64,
) -> Result<u64, TransportError> {
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await?;
    let mut written = 0u64;
    let outcome = loop {
        match recv.read_chunk(CHUNK_BYTES, true).await {
            Ok(Some(chunk)) => {
                if written + chunk.bytes.len() as u64 > max {
                    break Err(TransportError::Frame(FrameError::TooLarge {
                        len: written + chunk.bytes.len() as u64,
                        limit: max,
                    }));
                }
                if let Err(e) = file.write_all(&chunk.bytes).await {
                    break Err(e.into());
                }
                written += chunk.bytes.len() as u64;
            }
            Ok(None) => break Ok(written),
            Err(e) => break Err(TransportError::Read(e.to_string())),
        }
    };
    file.flush().await?;
    file.sync_data().await?;
    outcome
}
