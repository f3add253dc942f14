//! Small per-request byte strings (request ids, upstream targets) cut from a per-thread
//! slab: one allocation per slab instead of one per string, and clones are reference
//! counts on the slab. A slab is freed with the last string cut from it.

use std::cell::RefCell;

use bytes::{Bytes, BytesMut};

/// Bytes per slab: a hundred or so ids and targets.
const SLAB: usize = 16 * 1024;

thread_local! {
    static CURRENT: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// `text`, copied into this thread's slab.
pub fn copy(text: &[u8]) -> Bytes {
    write(text.len(), |slab| slab.extend_from_slice(text))
}

/// The `len` bytes `fill` appends, in this thread's slab.
pub fn write(len: usize, fill: impl FnOnce(&mut BytesMut)) -> Bytes {
    CURRENT.with_borrow_mut(|slab| {
        if slab.capacity() < len {
            *slab = BytesMut::with_capacity(SLAB.max(len));
        }
        fill(slab);
        slab.split().freeze()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_keep_their_bytes_across_slabs() {
        let texts: Vec<Vec<u8>> = (0..2000)
            .map(|i| format!("/api/v1/campaigns/{i}?api_key=k").into_bytes())
            .collect();
        let cut: Vec<Bytes> = texts.iter().map(|t| copy(t)).collect();
        for (t, c) in texts.iter().zip(&cut) {
            assert_eq!(&c[..], &t[..]);
        }
        let big = vec![b'x'; 3 * SLAB];
        assert_eq!(copy(&big).len(), 3 * SLAB);
    }
}
