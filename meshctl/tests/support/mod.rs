//! Helpers shared by the UI tests.

pub mod webdriver;
