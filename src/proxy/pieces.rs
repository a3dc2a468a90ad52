//! An Apache child's 64 KiB body buffers, recycled: response pieces that the client keeps
//! after `write_piece` returns, and each request's buffer for body pulls. Only connections
//! without a shared region use them (big bodies otherwise cross in its slots).
//!
//! Apache's output filters hold on to data they could not write at once (a slow client); data
//! they do not own they copy first. A response piece is handed over instead, and comes back
//! here when Apache is done with it, so a big response costs no copy inside Apache, and the
//! pieces are reused rather than allocated and freed for every 64 KiB (which made the
//! allocator hand pages back and fault them in again). The free list is bounded: a burst of
//! slow clients leaves at most `MAX_FREE` pieces behind.

#![forbid(unsafe_code)]

use std::sync::Mutex;

/// The size of every piece: one Data relay step.
pub const PIECE: usize = super::DATA_PIECE;

/// Pieces kept for reuse by one Apache child (1 MiB); more are freed.
const MAX_FREE: usize = 16;

/// A free list of pieces.
struct Spares(Mutex<Vec<Box<[u8]>>>);

impl Spares {
    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Box<[u8]>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self) -> Box<[u8]> {
        let reused = self.list().pop();
        reused.unwrap_or_else(|| vec![0; PIECE].into_boxed_slice())
    }

    fn give_back(&self, piece: Box<[u8]>) {
        if piece.len() != PIECE {
            return;
        }
        let mut free = self.list();
        if free.len() < MAX_FREE {
            free.push(piece);
        }
    }

    fn release(&self) -> usize {
        std::mem::take(&mut *self.list()).len()
    }
}

static FREE: Spares = Spares(Mutex::new(Vec::new()));

/// A buffer of exactly PIECE bytes (contents unspecified), reused when one is free.
pub fn take() -> Box<[u8]> {
    FREE.take()
}

/// Gives a piece back (from any thread). A buffer of another size is simply freed.
pub fn give_back(piece: Box<[u8]>) {
    FREE.give_back(piece);
}

/// Frees the pieces kept for reuse (the child has gone quiet); returns how many.
pub fn release_spares() -> usize {
    FREE.release()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_free_list_is_bounded_and_holds_only_whole_pieces() {
        let spares = Spares(Mutex::new(Vec::new()));
        let taken: Vec<Box<[u8]>> = (0..MAX_FREE + 4).map(|_| spares.take()).collect();
        assert!(taken.iter().all(|p| p.len() == PIECE));
        for piece in taken {
            spares.give_back(piece);
        }
        assert_eq!(spares.list().len(), MAX_FREE);
        spares.give_back(vec![0; 10].into_boxed_slice());
        assert!(spares.list().iter().all(|p| p.len() == PIECE));
        let again = spares.take();
        assert_eq!(again.len(), PIECE);
        assert_eq!(spares.list().len(), MAX_FREE - 1);
    }

    #[test]
    fn spares_can_be_released() {
        let spares = Spares(Mutex::new(Vec::new()));
        spares.give_back(spares.take());
        spares.give_back(spares.take());
        assert_eq!(
            spares.list().len(),
            1,
            "the piece taken was the one given back"
        );
        assert_eq!(spares.release(), 1);
        assert!(spares.list().is_empty());
    }
}
