//! The verification server: sessions, scheduler loop, batch runner and gRPC
//! service. Filled in by the verification-service work (see DESIGN.md).
