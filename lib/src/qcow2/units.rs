//! Typed positions: host offsets and clusters (in the image or data
//! file), guest offsets and clusters (in the virtual disk). The raw
//! `u64` is public, for arithmetic within one unit; turning one unit into
//! another goes through the conversions here, which know the cluster size.
//! A value read from disk is wrapped once, where it is decoded.

use super::state::Geometry;
use std::fmt;

macro_rules! unit {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub(crate) struct $name(pub u64);

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

unit!(
    /// A byte offset in the image file (or the external data file).
    HostOffset
);
unit!(
    /// A cluster index in the image file (offset / cluster size).
    HostCluster
);
unit!(
    /// A byte offset in the virtual disk.
    GuestOffset
);
unit!(
    /// A cluster index in the virtual disk.
    GuestCluster
);

impl HostOffset {
    /// The cluster holding this offset.
    pub fn cluster(self, g: &Geometry) -> HostCluster {
        HostCluster(self.0 >> g.cluster_bits)
    }
    /// Whether the offset starts a cluster.
    pub fn is_aligned(self, g: &Geometry) -> bool {
        self.0 & (g.cluster_size - 1) == 0
    }
    /// The offset `n` bytes further.
    pub fn add(self, n: u64) -> HostOffset {
        HostOffset(self.0 + n)
    }
}

impl HostCluster {
    /// The offset where this cluster starts.
    pub fn offset(self, g: &Geometry) -> HostOffset {
        HostOffset(self.0 << g.cluster_bits)
    }
    /// The cluster `n` clusters further.
    pub fn add(self, n: u64) -> HostCluster {
        HostCluster(self.0 + n)
    }
}

impl GuestOffset {
    /// The cluster holding this offset.
    pub fn cluster(self, g: &Geometry) -> GuestCluster {
        GuestCluster(self.0 >> g.cluster_bits)
    }
    /// Byte offset within its cluster.
    pub fn in_cluster(self, g: &Geometry) -> u64 {
        self.0 & (g.cluster_size - 1)
    }
}

impl GuestCluster {
    /// The offset where this cluster starts.
    pub fn offset(self, g: &Geometry) -> GuestOffset {
        GuestOffset(self.0 << g.cluster_bits)
    }
    /// L1 index and L2 index of this cluster.
    pub fn split(self, g: &Geometry) -> (usize, usize) {
        ((self.0 / g.l2_entries) as usize, (self.0 % g.l2_entries) as usize)
    }
}
