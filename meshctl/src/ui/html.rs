//! HTML building blocks: escaping (every value from the audit goes through
//! [`esc`] or [`q`]), times, and the frame every page shares.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};

/// `s` as HTML text or a quoted attribute value.
pub(super) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `s` percent-encoded for a query string value, then escaped for an
/// attribute.
pub(super) fn q(s: &str) -> String {
    esc(&utf8_percent_encode(s, NON_ALPHANUMERIC).to_string())
}

/// `2026-03-01 12:00:00` (UTC) for a time in µs since the epoch.
pub(super) fn time_us(us: u64) -> String {
    i64::try_from(us)
        .ok()
        .and_then(DateTime::<Utc>::from_timestamp_micros)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

/// A duration in µs as `850 ms`, `12.3 s` or `4 min 05 s`.
pub(super) fn duration_us(us: u64) -> String {
    let ms = us / 1000;
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        format!("{} min {:02} s", ms / 60_000, (ms / 1000) % 60)
    }
}

/// Which page the navigation marks as current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Nav {
    /// The trace list and trace pages.
    Traces,
    /// The denials page.
    Denials,
    /// An error page.
    None,
}

/// A whole page: head, navigation, `body`, and the live-update script when
/// `live` (the trace page).
pub(super) fn page(title: &str, nav: Nav, body: &str, live: bool) -> String {
    let link = |href: &str, label: &str, this: Nav| {
        let current = if nav == this {
            " aria-current=\"page\""
        } else {
            ""
        };
        format!("<a href=\"{href}\"{current}>{label}</a>")
    };
    let mut out = String::with_capacity(body.len() + 1024);
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{} — agentmesh</title>\n<link rel=\"stylesheet\" href=\"/assets/style.css\">\n\
         </head>\n<body>\n<header><span class=\"brand\">agentmesh audit</span> {} {}</header>\n\
         <main>\n{body}</main>\n",
        esc(title),
        link("/", "Traces", Nav::Traces),
        link("/denials", "Denials", Nav::Denials),
    );
    if live {
        out.push_str("<script src=\"/assets/live.js\"></script>\n");
    }
    out.push_str("</body>\n</html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc(r#"<script>alert("x" & 'y')</script>"#),
            "&lt;script&gt;alert(&quot;x&quot; &amp; &#39;y&#39;)&lt;/script&gt;"
        );
        assert_eq!(q("a b&c=<d>"), "a%20b%26c%3D%3Cd%3E");
    }

    #[test]
    fn formats_times() {
        assert_eq!(time_us(1_772_366_400_000_000), "2026-03-01 12:00:00");
        assert_eq!(duration_us(850_000), "850 ms");
        assert_eq!(duration_us(12_340_000), "12.3 s");
        assert_eq!(duration_us(245_000_000), "4 min 05 s");
    }
}
