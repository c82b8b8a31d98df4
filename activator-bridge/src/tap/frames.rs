//! Reading websocket frames (RFC 6455) out of the bytes the activator sends,
//! to look at its stat messages. The tap forwards the bytes themselves
//! untouched; this only decodes a copy.

/// The largest message the tap decodes (the activator's batches are a few
/// hundred bytes per revision); a larger one ends the inspection of that
/// connection, never its forwarding.
pub const MAX_MESSAGE: usize = 16 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("websocket message larger than {MAX_MESSAGE} bytes")]
    TooLarge,
    #[error("websocket continuation frame without a message to continue")]
    StrayContinuation,
    #[error("websocket data frame inside a fragmented message")]
    Interleaved,
}

/// A complete data message.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    Binary(Vec<u8>),
    Text(Vec<u8>),
}

/// Reassembles messages from a byte stream that may split frames anywhere.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    /// Opcode and payload of a fragmented message in progress.
    partial: Option<(u8, Vec<u8>)>,
}

struct Header {
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    /// Header length in bytes.
    len: usize,
    payload: usize,
}

fn header(buf: &[u8]) -> Result<Option<Header>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let masked = buf[1] & 0x80 != 0;
    let (payload, mut len) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4),
        127 if buf.len() >= 10 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        126 | 127 => return Ok(None),
        n => (u64::from(n), 2),
    };
    let payload = usize::try_from(payload)
        .ok()
        .filter(|p| *p <= MAX_MESSAGE)
        .ok_or(FrameError::TooLarge)?;
    let mut mask = None;
    if masked {
        if buf.len() < len + 4 {
            return Ok(None);
        }
        mask = Some([buf[len], buf[len + 1], buf[len + 2], buf[len + 3]]);
        len += 4;
    }
    Ok(Some(Header {
        fin: buf[0] & 0x80 != 0,
        opcode: buf[0] & 0x0f,
        mask,
        len,
        payload,
    }))
}

impl FrameReader {
    /// Takes the next bytes of the stream; returns the messages they complete.
    /// Control frames (ping, pong, close) are skipped.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Message>, FrameError> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut used = 0;
        while let Some(h) = header(&self.buf[used..])? {
            let end = used + h.len + h.payload;
            if self.buf.len() < end {
                break;
            }
            let mut payload = self.buf[used + h.len..end].to_vec();
            if let Some(mask) = h.mask {
                payload
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, b)| *b ^= mask[i % 4]);
            }
            used = end;
            if let Some(m) = self.frame(h.fin, h.opcode, payload)? {
                out.push(m);
            }
        }
        self.buf.drain(..used);
        Ok(out)
    }

    fn frame(
        &mut self,
        fin: bool,
        opcode: u8,
        payload: Vec<u8>,
    ) -> Result<Option<Message>, FrameError> {
        let (opcode, payload) = match opcode {
            0 => {
                let (op, mut so_far) = self.partial.take().ok_or(FrameError::StrayContinuation)?;
                if so_far.len() + payload.len() > MAX_MESSAGE {
                    return Err(FrameError::TooLarge);
                }
                so_far.extend_from_slice(&payload);
                (op, so_far)
            }
            1 | 2 if self.partial.is_some() => return Err(FrameError::Interleaved),
            1 | 2 => (opcode, payload),
            _ => return Ok(None),
        };
        if !fin {
            self.partial = Some((opcode, payload));
            return Ok(None);
        }
        Ok(Some(match opcode {
            1 => Message::Text(payload),
            _ => Message::Binary(payload),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame as gorilla/websocket writes it (masked).
    fn frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    #[test]
    fn a_message_split_anywhere_comes_out_once_and_whole() {
        let bytes = [
            frame(true, 2, b"hello", [9, 8, 7, 6]),
            frame(true, 2, &[7u8; 300], [1, 2, 3, 4]),
        ]
        .concat();
        for cut in 0..bytes.len() {
            let mut r = FrameReader::default();
            let mut got = r.push(&bytes[..cut]).unwrap();
            got.extend(r.push(&bytes[cut..]).unwrap());
            assert_eq!(
                got,
                vec![
                    Message::Binary(b"hello".to_vec()),
                    Message::Binary(vec![7u8; 300])
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn fragments_are_joined_and_control_frames_skipped() {
        let mut r = FrameReader::default();
        let bytes = [
            frame(false, 2, b"ab", [0; 4]),
            frame(true, 9, b"ping", [1; 4]),
            frame(true, 0, b"cd", [2; 4]),
            frame(true, 1, b"text", [3; 4]),
        ]
        .concat();
        assert_eq!(
            r.push(&bytes).unwrap(),
            vec![
                Message::Binary(b"abcd".to_vec()),
                Message::Text(b"text".to_vec())
            ]
        );
    }

    #[test]
    fn large_lengths_and_protocol_errors_are_reported() {
        let mut r = FrameReader::default();
        assert_eq!(
            r.push(&frame(true, 2, &[1u8; 70_000], [5; 4]))
                .unwrap()
                .len(),
            1
        );
        let mut r = FrameReader::default();
        assert_eq!(
            r.push(&frame(true, 0, b"x", [0; 4])),
            Err(FrameError::StrayContinuation)
        );
        let mut r = FrameReader::default();
        let huge = [0x82u8, 0x80 | 127, 0, 0, 0, 1, 0, 0, 0, 0];
        assert_eq!(r.push(&huge), Err(FrameError::TooLarge));
        let mut r = FrameReader::default();
        let bytes = [frame(false, 2, b"a", [0; 4]), frame(true, 2, b"b", [0; 4])].concat();
        assert_eq!(r.push(&bytes), Err(FrameError::Interleaved));
    }
}
