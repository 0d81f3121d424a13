//! Framing: how a TCP listener cuts its byte stream into the messages a
//! plugin sees, and frames the plugin's replies the same way. TCP delivers
//! bytes, not messages: one `send` may arrive in pieces and several may
//! arrive together (the tutorial's 粘包/拆包), so a protocol handler needs
//! the host to reassemble messages before it sees them.
//!
//! The decoders are tokio-util's codecs; this module picks one per mode,
//! bounds the size of a message, and names what went wrong. Reading the
//! socket is the TCP listener's business.

use tokio_util::bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::{AnyDelimiterCodec, BytesCodec, Decoder, LengthDelimitedCodec};

use crate::plugin;

/// The framing modes a TCP listener can use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Framing {
    /// Each chunk read from the socket is one message, as in the tutorial.
    #[default]
    Raw,
    /// Messages end with `\n` (`\r\n` too); replies get a `\n` appended when
    /// they lack one.
    Lines,
    /// A big-endian u32 length, then that many bytes; replies are framed the
    /// same way.
    LengthPrefixed,
}

impl From<Framing> for plugin::Framing {
    fn from(framing: Framing) -> Self {
        match framing {
            Framing::Raw => Self::Raw,
            Framing::Lines => Self::Lines,
            Framing::LengthPrefixed => Self::LengthPrefixed,
        }
    }
}

/// The default bound on one message in `lines` and `length-prefixed` mode.
pub const DEFAULT_MAX_MESSAGE: usize = 1 << 20;

/// A peer broke the framing; its connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A message grew past the listener's bound. It is refused before it is
    /// buffered whole, so a peer cannot exhaust memory this way.
    #[error("protocol error: message longer than the {max}-byte limit")]
    TooLong {
        /// The listener's bound.
        max: usize,
    },
    /// The peer closed its side in the middle of a message.
    #[error("protocol error: connection closed in the middle of a frame{}", cut_short(*.arrived, *.expected))]
    Truncated {
        /// How many bytes of the frame had arrived: of its body once the
        /// length prefix is whole, else of the prefix.
        arrived: usize,
        /// The body's length, once the prefix is whole.
        expected: Option<usize>,
    },
}

/// How much of a cut-short frame came, in words.
fn cut_short(arrived: usize, expected: Option<usize>) -> String {
    match expected {
        Some(expected) => format!(
            " ({arrived} of its {expected} bytes arrived, {} missing)",
            expected.saturating_sub(arrived)
        ),
        None => format!("'s length ({arrived} of its {LENGTH_PREFIX} bytes arrived)"),
    }
}

/// The length prefix of `length-prefixed` framing: a big-endian u32.
const LENGTH_PREFIX: usize = 4;

/// Cuts a byte stream into messages.
pub struct MessageReader {
    decoder: Kind,
    max: usize,
    /// In `length-prefixed` mode, the length of the frame being read once
    /// its prefix is whole: the codec keeps it to itself, and a frame cut
    /// short is reported with it.
    expected: Option<usize>,
}

enum Kind {
    Raw(BytesCodec),
    Lines(AnyDelimiterCodec),
    LengthPrefixed(LengthDelimitedCodec),
}

impl MessageReader {
    /// A reader for `framing` that refuses messages longer than `max` bytes
    /// (`raw` chunks are bounded by the read size instead).
    pub fn new(framing: Framing, max: usize) -> Self {
        let decoder = match framing {
            Framing::Raw => Kind::Raw(BytesCodec::new()),
            Framing::Lines => Kind::Lines(AnyDelimiterCodec::new_with_max_length(
                b"\n".to_vec(),
                Vec::new(),
                max,
            )),
            Framing::LengthPrefixed => Kind::LengthPrefixed(
                LengthDelimitedCodec::builder()
                    .big_endian()
                    .length_field_type::<u32>()
                    .max_frame_length(max)
                    .new_codec(),
            ),
        };
        Self {
            decoder,
            max,
            expected: None,
        }
    }

    /// Takes the next whole message out of `buf`, if one is there.
    ///
    /// # Errors
    ///
    /// [`FrameError::TooLong`] once a message is known to exceed the bound.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        let max = self.max;
        match &mut self.decoder {
            Kind::Raw(codec) => Ok(codec.decode(buf).ok().flatten().map(BytesMut::freeze)),
            // Its only other error is I/O, which `decode` never does.
            Kind::Lines(codec) => codec
                .decode(buf)
                .map(|line| line.map(strip_cr))
                .map_err(|_| FrameError::TooLong { max }),
            // The only decode error of this codec is an oversized length.
            Kind::LengthPrefixed(codec) => {
                if self.expected.is_none()
                    && let Some(prefix) = buf.get(..LENGTH_PREFIX)
                {
                    let prefix: [u8; LENGTH_PREFIX] = prefix.try_into().unwrap_or_default();
                    self.expected = Some(u32::from_be_bytes(prefix) as usize);
                }
                match codec.decode(buf) {
                    Ok(Some(frame)) => {
                        self.expected = None;
                        Ok(Some(frame.freeze()))
                    }
                    Ok(None) => Ok(None),
                    Err(_) => Err(FrameError::TooLong { max }),
                }
            }
        }
    }

    /// Like [`MessageReader::next`], once the peer has closed its side. In
    /// `lines` mode a last line without its `\n` is still a message (the
    /// peer cannot send the rest any more, and `printf exit | nc` should
    /// work); in `length-prefixed` mode a partial frame is an error.
    ///
    /// # Errors
    ///
    /// [`FrameError::Truncated`] for a partial frame, or as for `next`.
    pub fn next_at_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        let max = self.max;
        match &mut self.decoder {
            Kind::Lines(codec) => codec
                .decode_eof(buf)
                .map(|line| line.map(strip_cr))
                .map_err(|_| FrameError::TooLong { max }),
            _ => match self.next(buf)? {
                Some(message) => Ok(Some(message)),
                None if buf.is_empty() => Ok(None),
                None => Err(FrameError::Truncated {
                    arrived: buf.len(),
                    expected: self.expected,
                }),
            },
        }
    }
}

/// A line's `\r` before its `\n` is part of the line ending.
fn strip_cr(line: Bytes) -> Bytes {
    match line.last() {
        Some(b'\r') => line.slice(..line.len() - 1),
        _ => line,
    }
}

/// A reply framed for the wire: what goes before it, the reply itself, and
/// what goes after it. It is written with one vectored write, so the reply
/// is never copied into a frame buffer. `raw` sends the bytes as they are,
/// `lines` appends a `\n` unless the reply ends with one, `length-prefixed`
/// puts the big-endian u32 length first.
#[derive(Debug)]
pub struct Framed<'a> {
    head: [u8; 4],
    head_len: usize,
    body: &'a [u8],
    tail: &'static [u8],
}

impl<'a> Framed<'a> {
    /// Frames `reply` for `framing`.
    ///
    /// # Errors
    ///
    /// A reply longer than `u32::MAX` bytes cannot be length-prefixed.
    pub fn new(framing: Framing, reply: &'a [u8]) -> Result<Self, FrameError> {
        let mut framed = Self {
            head: [0; 4],
            head_len: 0,
            body: reply,
            tail: b"",
        };
        match framing {
            Framing::Raw => {}
            Framing::Lines if reply.last() == Some(&b'\n') => {}
            Framing::Lines => framed.tail = b"\n",
            Framing::LengthPrefixed => {
                let len = u32::try_from(reply.len()).map_err(|_| FrameError::TooLong {
                    max: u32::MAX as usize,
                })?;
                framed.head = len.to_be_bytes();
                framed.head_len = 4;
            }
        }
        Ok(framed)
    }

    /// The bytes on the wire.
    pub fn len(&self) -> usize {
        self.head_len + self.body.len() + self.tail.len()
    }

    /// Whether nothing goes on the wire (an empty `raw` reply).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The frame as one buffer of up to three pieces.
    pub fn as_buf(&self) -> impl Buf + '_ {
        self.head[..self.head_len].chain(self.body).chain(self.tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards the empty reply's framing: an empty `raw` reply writes
    /// nothing, while `lines` still ends the line and `length-prefixed`
    /// still sends its zero length.
    #[test]
    fn an_empty_reply_is_empty_on_the_wire_only_when_raw() {
        let empty = |framing| {
            let framed = Framed::new(framing, b"").expect("frames");
            (framed.is_empty(), framed.len())
        };
        assert_eq!(empty(Framing::Raw), (true, 0));
        assert_eq!(empty(Framing::Lines), (false, 1));
        assert_eq!(empty(Framing::LengthPrefixed), (false, 4));
    }

    fn messages(
        framing: Framing,
        max: usize,
        pieces: &[&[u8]],
    ) -> Result<Vec<Vec<u8>>, FrameError> {
        let mut reader = MessageReader::new(framing, max);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in pieces {
            buf.extend_from_slice(piece);
            while let Some(message) = reader.next(&mut buf)? {
                out.push(message.to_vec());
            }
        }
        while let Some(message) = reader.next_at_eof(&mut buf)? {
            out.push(message.to_vec());
        }
        Ok(out)
    }

    #[test]
    fn lines_are_reassembled_and_lose_their_endings() {
        let got = messages(
            Framing::Lines,
            64,
            &[b"al", b"pha\nbe", b"ta\r", b"\n\ngam", b"ma"],
        )
        .expect("valid");
        assert_eq!(got, [&b"alpha"[..], b"beta", b"", b"gamma"]);
    }

    #[test]
    fn length_prefixed_frames_split_and_joined() {
        let got = messages(
            Framing::LengthPrefixed,
            64,
            &[b"\0\0", b"\0\x03ab", b"c\0\0\0\0\0\0\0\x01z"],
        )
        .expect("valid");
        assert_eq!(got, [&b"abc"[..], b"", b"z"]);
    }

    #[test]
    fn oversized_and_truncated_frames_are_errors() {
        assert!(matches!(
            messages(Framing::Lines, 4, &[b"toolong"]),
            Err(FrameError::TooLong { max: 4 })
        ));
        let huge = messages(Framing::LengthPrefixed, 1024, &[b"\x40\0\0\0"]);
        assert!(matches!(huge, Err(FrameError::TooLong { max: 1024 })));
        let cut = messages(Framing::LengthPrefixed, 1024, &[b"\0\0\0\x0aabc"]);
        let cut = cut.map(|_| ()).map_err(|error| error.to_string());
        assert_eq!(
            cut,
            Err("protocol error: connection closed in the middle of a frame (3 of its 10 bytes arrived, 7 missing)".to_owned())
        );
        let cut = messages(Framing::LengthPrefixed, 1024, &[b"\0\0\0\x01a\0\0"]);
        let cut = cut.map(|_| ()).map_err(|error| error.to_string());
        assert_eq!(
            cut,
            Err("protocol error: connection closed in the middle of a frame's length (2 of its 4 bytes arrived)".to_owned())
        );
    }

    #[test]
    fn replies_are_framed_like_requests() {
        let wire = |framing, reply: &[u8]| {
            let framed = Framed::new(framing, reply).expect("framed");
            let mut buf = framed.as_buf();
            let bytes = buf.copy_to_bytes(buf.remaining());
            assert_eq!(bytes.len(), framed.len());
            bytes
        };
        assert_eq!(&wire(Framing::Lines, b"hi")[..], b"hi\n");
        assert_eq!(&wire(Framing::Lines, b"hi\n")[..], b"hi\n");
        assert_eq!(&wire(Framing::LengthPrefixed, b"hi")[..], b"\0\0\0\x02hi");
        assert_eq!(&wire(Framing::LengthPrefixed, b"")[..], b"\0\0\0\0");
        assert_eq!(&wire(Framing::Raw, b"hi")[..], b"hi");
    }
}
