//! Helpers shared by the meshctl tests.

pub(crate) mod services;
pub(crate) mod webdriver;
