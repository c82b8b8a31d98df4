//! Where a key lives: the ring places new keys (`ring`); the index says
//! where each existing key is now (`index`); the value cache kept with
//! the index (`values`).

pub mod index;
pub mod ring;
pub mod values;
