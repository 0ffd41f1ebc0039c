//! Reading a Prometheus text exposition (what `/metrics` serves).

/// The value of `sample` in `body`: the line that starts with the sample as
/// rendered (`name` or `name{label="value",...}`) followed by a space; 0 when
/// there is no such line (a counter not yet incremented is not rendered).
pub fn sample_value(body: &str, sample: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_sample_by_name_and_labels() {
        let body = "# TYPE a counter\na 3\na{x=\"1\"} 4.5\nab 9\n";
        assert_eq!(sample_value(body, "a"), 3.0);
        assert_eq!(sample_value(body, "a{x=\"1\"}"), 4.5);
        assert_eq!(sample_value(body, "ab"), 9.0);
        assert_eq!(sample_value(body, "a{x=\"2\"}"), 0.0);
        assert_eq!(sample_value(body, "missing"), 0.0);
    }
}
