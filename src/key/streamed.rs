//! A success body scrubbed of the proxy's secrets as it streams: an upstream 200 that
//! echoes the key (a settings page, a webhook's URL with `?api_key=`) reaches the client
//! with as many `*` in its place, so the body keeps its length and its `Content-Length`.
//! Nothing is buffered but a piece's trailing bytes that could be the start of a secret
//! (at most [`Secrets::longest_form`]), held until the next piece shows whether the
//! secret runs on into it.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

use super::Secrets;

pin_project_lite::pin_project! {
    /// `inner` with every secret replaced.
    pub struct Scrubbed<B> {
        #[pin]
        inner: B,
        secrets: Secrets,
        // Come from `inner`, not sent yet.
        pending: BytesMut,
        // A non-data frame (trailers) to send once `pending` is out.
        held: Option<Frame<Bytes>>,
        done: bool,
    }
}

impl<B> Scrubbed<B> {
    pub fn new(inner: B, secrets: Secrets) -> Self {
        Self {
            inner,
            secrets,
            pending: BytesMut::new(),
            held: None,
            done: false,
        }
    }
}

/// What can be sent of `pending` now, taken out of it.
fn take_sendable(secrets: &Secrets, pending: &mut BytesMut, end: bool) -> Bytes {
    let (clean, used) = secrets.scrub_streamed(pending, end);
    match clean {
        std::borrow::Cow::Borrowed(_) => pending.split_to(used).freeze(),
        std::borrow::Cow::Owned(clean) => {
            pending.advance(used);
            Bytes::from(clean)
        }
    }
}

/// What can be sent of a piece that came with nothing pending: a slice of it when it
/// holds no secret (no copy), and what must wait goes to `pending`.
fn sendable_of(secrets: &Secrets, data: &Bytes, pending: &mut BytesMut) -> Bytes {
    let (clean, used) = secrets.scrub_streamed(data, false);
    let ready = match clean {
        std::borrow::Cow::Borrowed(_) => data.slice(..used),
        std::borrow::Cow::Owned(clean) => Bytes::from(clean),
    };
    pending.extend_from_slice(&data[used..]);
    ready
}

impl<B> Body for Scrubbed<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        loop {
            if *this.done || this.held.is_some() {
                let rest = take_sendable(this.secrets, this.pending, true);
                if !rest.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
                return Poll::Ready(this.held.take().map(Ok));
            }
            match ready!(this.inner.as_mut().poll_frame(cx)) {
                None => *this.done = true,
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if this.pending.is_empty() => {
                        // Most pieces: scanned where they are, only their tail kept.
                        let ready = sendable_of(this.secrets, &data, this.pending);
                        if !ready.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(ready))));
                        }
                    }
                    Ok(data) => {
                        this.pending.extend_from_slice(&data);
                        let ready = take_sendable(this.secrets, this.pending, false);
                        if !ready.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(ready))));
                        }
                    }
                    Err(other) => *this.held = Some(other),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pending.is_empty() && self.held.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // Secrets are masked in place: the length is the inner body's.
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    const KEY: &str = "sk-0f3c9a7d2b8e4c61a5f09e3d7b2c8a41";

    /// The body `pieces` make, through the scrubber, and the pieces it came out in.
    async fn through(pieces: Vec<Vec<u8>>) -> (String, usize) {
        let frames = pieces
            .into_iter()
            .map(|p| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(p))));
        let body = StreamBody::new(futures_util::stream::iter(frames));
        let mut scrubbed = Scrubbed::new(body, super::super::ApiKey::new(KEY).secrets());
        let (mut out, mut n) = (Vec::new(), 0);
        while let Some(frame) = scrubbed.frame().await {
            out.extend_from_slice(&frame.unwrap().into_data().unwrap());
            n += 1;
        }
        (String::from_utf8(out).unwrap(), n)
    }

    #[tokio::test]
    async fn a_key_split_across_pieces_is_replaced_and_the_rest_kept() {
        let text = format!(r#"{{"webhook":"https://x/y?api_key={KEY}","n":1}}"#);
        let want = format!(
            r#"{{"webhook":"https://x/y?api_key={}","n":1}}"#,
            "*".repeat(KEY.len())
        );
        for cut in 1..text.len() {
            let (a, b) = text.as_bytes().split_at(cut);
            let (got, _) = through(vec![a.to_vec(), b.to_vec()]).await;
            assert_eq!(got, want, "cut at {cut}");
        }
        let bytes: Vec<Vec<u8>> = text.bytes().map(|b| vec![b]).collect();
        assert_eq!(through(bytes).await.0, want, "a byte at a time");
    }

    #[tokio::test]
    async fn a_body_without_a_key_streams_unchanged_holding_back_only_a_tail() {
        let piece = vec![b'a'; 64 * 1024];
        let (got, frames) = through(vec![piece.clone(), piece.clone(), piece]).await;
        assert_eq!(got.len(), 3 * 64 * 1024);
        assert!(frames >= 3, "streamed, not gathered: {frames}");
        // A piece that ends in a byte no secret has goes on whole, at once.
        let (got, frames) = through(vec![b"[1,2,".to_vec(), b"3]".to_vec()]).await;
        assert_eq!((got.as_str(), frames), ("[1,2,3]", 2));
    }
}
