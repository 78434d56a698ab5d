pub mod receiver;
