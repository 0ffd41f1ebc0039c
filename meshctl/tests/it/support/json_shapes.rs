//! The `-o json` shapes docs/meshctl.md documents (its "Output: `-o json`"
//! table, generated from `reference::JSON_SHAPES`), read back so a test can
//! hold what a command prints against what the page promises.

use std::collections::BTreeSet;

use super::services::workspace;

/// The top-level fields the page documents for `meshctl <command>`: of the
/// document, or of each element where the shape is an array (`[{…}]`).
#[derive(Debug)]
pub(crate) struct Shape {
    /// The shape is a JSON array of objects.
    pub array: bool,
    /// The field names at the top level.
    pub fields: BTreeSet<String>,
    /// The fields written `name?`: printed only where they have a value.
    pub optional: BTreeSet<String>,
    /// The shape ends in `...`: more fields may follow.
    pub open: bool,
}

/// The documented shape of `meshctl <command>` (`"agents list"`).
pub(crate) fn documented(command: &str) -> Shape {
    let page = std::fs::read_to_string(workspace().join("docs/meshctl.md"))
        .unwrap_or_else(|e| panic!("docs/meshctl.md: {e}"));
    let row = format!("| `meshctl {command}` | ");
    let line = page
        .lines()
        .find(|l| l.starts_with(&row))
        .unwrap_or_else(|| panic!("docs/meshctl.md documents no `-o json` of `{command}`"));
    // The first code span that is a shape (`{…}` or `[{…}]`).
    line[row.len()..]
        .split('`')
        .skip(1)
        .step_by(2)
        .find_map(parse)
        .unwrap_or_else(|| panic!("`{command}`: no `{{…}}` shape in `{line}`"))
}

/// `{a, b: [..], c (note)}` or `[{…}]` as a [`Shape`].
fn parse(shape: &str) -> Option<Shape> {
    let (array, body) = match shape.strip_prefix('[') {
        Some(rest) => (true, rest),
        None => (false, shape),
    };
    let body = body.strip_prefix('{')?;
    let mut fields = BTreeSet::new();
    let mut optional = BTreeSet::new();
    let mut open = false;
    let mut depth = 0usize;
    let mut piece = String::new();
    let mut take = |piece: &str, open: &mut bool| {
        let piece = piece.trim();
        if piece.starts_with("...") {
            *open = true;
        }
        let name: String = piece
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if piece[name.len()..].starts_with('?') {
            optional.insert(name);
        } else if !name.is_empty() {
            fields.insert(name);
        }
    };
    for c in body.chars() {
        match c {
            '{' | '[' | '(' => depth += 1,
            '}' | ']' | ')' if depth == 0 => break,
            '}' | ']' | ')' => depth -= 1,
            ',' if depth == 0 => {
                take(&piece, &mut open);
                piece.clear();
                continue;
            }
            _ => {}
        }
        piece.push(c);
    }
    take(&piece, &mut open);
    Some(Shape {
        array,
        fields,
        optional,
        open,
    })
}

/// Holds `doc`, what `meshctl <command> -o json` printed, against the
/// documented shape: the same top-level fields (at least them, where the
/// shape is open; the optional ones where it prints them), of each element
/// where it is an array.
pub(crate) fn check(command: &str, doc: &serde_json::Value) {
    check_against(command, &documented(command), doc);
}

/// [`check`] against `shape`.
pub(crate) fn check_against(command: &str, shape: &Shape, doc: &serde_json::Value) {
    let objects: Vec<&serde_json::Value> = if shape.array {
        doc.as_array()
            .unwrap_or_else(|| panic!("`{command}`: documented as an array, printed {doc}"))
            .iter()
            .collect()
    } else {
        vec![doc]
    };
    for object in objects {
        let printed: BTreeSet<String> = object
            .as_object()
            .unwrap_or_else(|| panic!("`{command}`: not an object: {object}"))
            .keys()
            .filter(|k| !shape.optional.contains(*k))
            .cloned()
            .collect();
        if shape.open {
            let missing: Vec<&String> = shape.fields.difference(&printed).collect();
            assert!(
                missing.is_empty(),
                "`{command} -o json` lacks the documented {missing:?} (docs/meshctl.md): {object}"
            );
        } else {
            assert_eq!(
                printed, shape.fields,
                "`{command} -o json` prints other fields than docs/meshctl.md documents: {object}"
            );
        }
    }
}

#[test]
fn shapes_parse() {
    let s = parse("{ok, components: [{name, state}], tables: [{table, rows (null: missing)}], x {a, b} or null}").unwrap();
    assert!(!s.array && !s.open);
    assert_eq!(
        s.fields.into_iter().collect::<Vec<_>>(),
        ["components", "ok", "tables", "x"]
    );
    let s = parse("[{id, status, span?}]").unwrap();
    assert!(s.array);
    assert_eq!(s.fields.len(), 2);
    assert!(s.optional.contains("span"));
    let s = parse("{event_id, decision, ...}").unwrap();
    assert!(s.open && s.fields.len() == 2);
    assert!(parse("one object per line").is_none());
}
