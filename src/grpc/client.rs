//! The transport types the client side of the binary (`cli`) uses, so that tonic stays
//! behind `grpc/` on both sides of the wire: a channel to a daemon and the status its
//! calls fail with.

pub use tonic::Status;
pub use tonic::transport::Channel;
