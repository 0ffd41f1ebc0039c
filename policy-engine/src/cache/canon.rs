//! Canonical JSON for cache keys, after RFC 8785 (JCS): object members
//! sorted by their names' UTF-16 code units, no whitespace, strings escaped
//! as `JSON.stringify` does, integral numbers without a fraction.
//!
//! Two calls share a cache entry only when their canonical forms are equal.
//! The form is injective (different JSON values never print the same), so
//! where it departs from RFC 8785 — the exponent form of very large or very
//! small non-integral numbers — the cost is a miss, never a wrong answer.

use serde_json::{Number, Value};

/// `value` in canonical form.
pub fn canonical(value: &Value) -> String {
    let mut out = String::new();
    write(value, &mut out);
    out
}

fn write(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => number(n, out),
        Value::String(s) => string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_by(|(a, _), (b, _)| a.encode_utf16().cmp(b.encode_utf16()));
            out.push('{');
            for (i, (name, item)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                string(name, out);
                out.push(':');
                write(item, out);
            }
            out.push('}');
        }
    }
}

/// Largest integer an IEEE double holds exactly (2^53).
const EXACT: f64 = 9_007_199_254_740_992.0;

fn number(n: &Number, out: &mut String) {
    if let Some(i) = n.as_i64() {
        out.push_str(&i.to_string());
    } else if let Some(u) = n.as_u64() {
        out.push_str(&u.to_string());
    } else if let Some(f) = n.as_f64() {
        if f == 0.0 {
            // -0 prints as 0 (RFC 8785 3.2.2.3).
            out.push('0');
        } else if f.fract() == 0.0 && f.abs() < EXACT {
            // `1.0` and `1` are the same number.
            out.push_str(&(f as i64).to_string());
        } else {
            let text = n.to_string();
            // ECMAScript writes a positive exponent with its sign.
            match text.split_once('e') {
                Some((mantissa, exp)) if !exp.starts_with(['-', '+']) => {
                    out.push_str(mantissa);
                    out.push_str("e+");
                    out.push_str(exp);
                }
                _ => out.push_str(&text),
            }
        }
    }
}

fn string(s: &str, out: &mut String) {
    // serde_json escapes exactly what `JSON.stringify` does: `"`, `\`, and
    // control characters (short forms where they exist, else `\u00xx`).
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}")));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn canon(text: &str) -> String {
        canonical(&serde_json::from_str(text).unwrap())
    }

    #[test]
    fn member_order_and_whitespace_do_not_matter() {
        assert_eq!(
            canon(r#"{ "path": "src/", "query": "fn signup" }"#),
            canon(r#"{"query":"fn signup","path":"src/"}"#)
        );
        assert_eq!(
            canon(r#"{"b": [1, {"d": 1, "c": 2}], "a": null}"#),
            r#"{"a":null,"b":[1,{"c":2,"d":1}]}"#
        );
        assert_ne!(canon(r#"{"a":[1,2]}"#), canon(r#"{"a":[2,1]}"#));
    }

    #[test]
    fn rfc8785_numbers_and_strings() {
        assert_eq!(
            canon("[1.0, -0.0, 1e2, 0.5, 1e30, 12345678901234567890]"),
            "[1,0,100,0.5,1e+30,12345678901234567890]"
        );
        assert_eq!(
            canonical(&json!("a\"b\\c\n\u{1}é€")),
            "\"a\\\"b\\\\c\\n\\u0001é€\""
        );
        // UTF-16 order: U+E000 sorts after U+1F600's surrogates.
        assert_eq!(
            canonical(&json!({"\u{e000}": 1, "\u{1f600}": 2})),
            "{\"\u{1f600}\":2,\"\u{e000}\":1}"
        );
    }
}
