//! Helpers shared by the meshctl tests.

pub mod services;
pub mod webdriver;
