//! Helpers shared by the meshctl tests.

pub(crate) mod json_shapes;
pub(crate) mod services;
pub(crate) mod webdriver;
