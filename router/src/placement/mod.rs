//! Where a key lives: the ring places new keys (`ring`); the index says
//! where each existing key is now (`index`).

pub mod index;
pub mod ring;
