// Each test binary uses a different part of the support code.
#![allow(dead_code, unused_imports)]

pub mod host;
pub use egress_testkit::receiver;
