//! The policy directory's `entities.json`: which agents it names, and adding
//! or removing one (validated with the Cedar schema and the policies before
//! anything is written, and edited in place so the file stays as written).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// The agents in a policy directory's `entities.json`: (id, role attribute).
pub(crate) fn entity_agents(policies: &Path) -> anyhow::Result<Vec<(String, Option<String>)>> {
    let entities = read_entities(policies)?;
    Ok(entities
        .iter()
        .filter(|e| e["uid"]["type"] == "Agent")
        .filter_map(|e| {
            let id = e["uid"]["id"].as_str()?.to_owned();
            let role = e["attrs"]["role"].as_str().map(str::to_owned);
            Some((id, role))
        })
        .collect())
}

fn entities_path(policies: &Path) -> PathBuf {
    policies.join(policy_engine::ENTITIES_FILE)
}

pub(crate) fn read_entities(policies: &Path) -> anyhow::Result<Vec<Value>> {
    let path = entities_path(policies);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading `{}`", path.display()))?;
    let value: Value =
        serde_json::from_str(&text).with_context(|| format!("`{}` is not JSON", path.display()))?;
    match value {
        Value::Array(entities) => Ok(entities),
        _ => bail!("`{}` is not a JSON array of entities", path.display()),
    }
}

/// `entities` with agent `id` (role `role`, in roles `member` and `role`,
/// with `attrs`) added.
pub(crate) fn with_agent(
    mut entities: Vec<Value>,
    id: &str,
    role: &str,
    attrs: &BTreeMap<String, String>,
) -> anyhow::Result<Vec<Value>> {
    let is = |e: &Value, ty: &str, name: &str| e["uid"]["type"] == ty && e["uid"]["id"] == name;
    if entities.iter().any(|e| is(e, "Agent", id)) {
        bail!(
            "agent `{id}` is already in entities.json (remove it first: `meshctl agents remove {id}`)"
        );
    }
    let roles: Vec<&str> = entities
        .iter()
        .filter(|e| e["uid"]["type"] == "Role")
        .filter_map(|e| e["uid"]["id"].as_str())
        .collect();
    if !roles.contains(&role) {
        bail!(
            "--role `{role}` is not a role in entities.json (roles: {}); add the `Role` entity and the policies that use it first",
            roles.join(", ")
        );
    }
    let mut all_attrs = serde_json::Map::new();
    all_attrs.insert("role".into(), json!(role));
    for (k, v) in attrs {
        if k == "role" {
            bail!("--attr role=…: the role is set with --role");
        }
        all_attrs.insert(k.clone(), json!(v));
    }
    let mut parents = vec![json!({"type": "Role", "id": "member"})];
    if role != "member" {
        parents.push(json!({"type": "Role", "id": role}));
    }
    entities.push(json!({
        "uid": {"type": "Agent", "id": id},
        "attrs": all_attrs,
        "parents": parents,
    }));
    Ok(entities)
}

/// `entities` without agent `id`; `None` when it was not there.
pub(crate) fn without_agent(entities: Vec<Value>, id: &str) -> Option<Vec<Value>> {
    let before = entities.len();
    let rest: Vec<Value> = entities
        .into_iter()
        .filter(|e| !(e["uid"]["type"] == "Agent" && e["uid"]["id"] == id))
        .collect();
    (rest.len() != before).then_some(rest)
}

/// Checks `entities` with the directory's schema and policies, as the
/// policy worker would load them.
pub(crate) fn validate(policies: &Path, entities: &[Value]) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(entities)? + "\n";
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    for entry in
        std::fs::read_dir(policies).with_context(|| format!("reading `{}`", policies.display()))?
    {
        let path = entry?.path();
        let keep = path.extension().is_some_and(|e| e == "cedar")
            || path
                .file_name()
                .is_some_and(|n| n == policy_engine::SCHEMA_FILE);
        if keep && let Some(name) = path.file_name() {
            std::fs::copy(&path, scratch.path().join(name))?;
        }
    }
    std::fs::write(scratch.path().join(policy_engine::ENTITIES_FILE), &text)?;
    if let Err(e) = policy_engine::PolicyBundle::load(scratch.path()) {
        // Name the real file, not the scratch copy.
        let message = e.to_string().replace(
            &scratch.path().display().to_string(),
            &policies.display().to_string(),
        );
        bail!(
            "the new entities do not validate, nothing was changed: {message} (every attribute the schema's `Agent` requires must be given with --attr; the shipped schema requires `team`)"
        );
    }
    Ok(())
}

/// The elements of a JSON array's text: the byte ranges of each element
/// (trimmed), and the position of the closing `]`. `None` when `text` is not
/// one array.
fn array_elements(text: &str) -> Option<(Vec<(usize, usize)>, usize)> {
    let open = text.find(|c: char| !c.is_whitespace())?;
    if text.as_bytes()[open] != b'[' {
        return None;
    }
    let mut elements = Vec::new();
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let mut current: Option<(usize, usize)> = None;
    for (i, c) in text.char_indices().skip_while(|&(i, _)| i < open) {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            if let Some(e) = current.as_mut() {
                e.1 = i + c.len_utf8();
            }
            continue;
        }
        match c {
            '[' | '{' => depth += 1,
            ']' | '}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    elements.extend(current.take());
                    return Some((elements, i));
                }
            }
            ',' if depth == 1 => {
                elements.push(current.take()?);
                continue;
            }
            _ => {}
        }
        if depth == 1 && c == '[' {
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        if !c.is_whitespace() && depth >= 1 {
            let end = i + c.len_utf8();
            match current.as_mut() {
                Some(e) => e.1 = end,
                None => current = Some((i, end)),
            }
        }
    }
    None
}

/// `text` (an entities file as its author wrote it) edited in place to hold
/// `entities`, when they differ from it by one entity appended or removed:
/// an added entity is one new line after the last, a removed one leaves
/// everything else byte for byte. `None` when no such edit gives them.
fn edited_entities(text: &str, entities: &[Value]) -> Option<String> {
    let (spans, close) = array_elements(text)?;
    let edited = if entities.len() == spans.len() + 1 {
        let added = serde_json::to_string(entities.last()?).ok()?;
        match spans.last() {
            Some(&(start, end)) => {
                let line_start = text[..start].rfind('\n').map_or(0, |n| n + 1);
                let indent = &text[line_start..start];
                let indent = if indent.trim().is_empty() {
                    indent
                } else {
                    "  "
                };
                format!("{},\n{indent}{added}{}", &text[..end], &text[end..])
            }
            None => format!("{}\n  {added}\n{}", &text[..close], &text[close..]),
        }
    } else if entities.len() + 1 == spans.len() {
        let kept: Vec<Value> = spans
            .iter()
            .map(|&(a, b)| serde_json::from_str(&text[a..b]).ok())
            .collect::<Option<_>>()?;
        let gone = (0..kept.len()).find(|&i| {
            let mut rest = kept.clone();
            rest.remove(i);
            rest == entities
        })?;
        let (start, end) = spans[gone];
        if gone > 0 {
            format!("{}{}", &text[..spans[gone - 1].1], &text[end..])
        } else if let Some(&(next, _)) = spans.get(1) {
            format!("{}{}", &text[..start], &text[next..])
        } else {
            let line_start = text[..start].rfind('\n').unwrap_or(start);
            format!("{}{}", &text[..line_start], &text[end..])
        }
    } else {
        return None;
    };
    // Only an edit that reads back as exactly `entities` is kept.
    let back: Vec<Value> = serde_json::from_str(&edited).ok()?;
    (back == entities).then_some(edited)
}

/// Replaces `entities.json` atomically (the policy worker reloads it),
/// keeping the file as its author formatted it where the change is one
/// entity added or removed.
pub(crate) fn write_entities(policies: &Path, entities: &[Value]) -> anyhow::Result<()> {
    let path = entities_path(policies);
    let text = std::fs::read_to_string(&path)
        .ok()
        .and_then(|original| edited_entities(&original, entities))
        .map_or_else(
            || serde_json::to_string_pretty(entities).map(|t| t + "\n"),
            Ok,
        )?;
    let tmp = policies.join(".entities.json.meshctl-tmp");
    std::fs::write(&tmp, &text).with_context(|| format!("writing `{}`", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing `{}`", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> Vec<Value> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        read_entities(&dir).unwrap()
    }

    #[test]
    fn adding_an_agent_adds_member_and_role_parents() {
        let attrs = BTreeMap::from([("team".to_owned(), "data".to_owned())]);
        let entities = with_agent(shipped(), "analyst", "worker", &attrs).unwrap();
        let added = entities.last().unwrap();
        assert_eq!(added["uid"], json!({"type": "Agent", "id": "analyst"}));
        assert_eq!(added["attrs"], json!({"role": "worker", "team": "data"}));
        assert_eq!(
            added["parents"],
            json!([{"type": "Role", "id": "member"}, {"type": "Role", "id": "worker"}])
        );
        assert!(with_agent(shipped(), "coder", "worker", &attrs).is_err());
        let err = with_agent(shipped(), "x", "wizard", &attrs).unwrap_err();
        assert!(err.to_string().contains("roles: member"), "{err}");
        let back = without_agent(entities, "analyst").unwrap();
        assert_eq!(back, shipped());
        assert!(without_agent(back, "analyst").is_none());
    }

    #[test]
    fn adding_then_removing_an_agent_keeps_the_file_as_written() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let original = std::fs::read_to_string(dir.join(policy_engine::ENTITIES_FILE)).unwrap();
        let attrs = BTreeMap::from([("team".to_owned(), "data".to_owned())]);
        let added = with_agent(shipped(), "analyst", "worker", &attrs).unwrap();
        let text = edited_entities(&original, &added).unwrap();
        // One new line, in the file's indentation; everything else as it was.
        let new_lines: Vec<&str> = text
            .lines()
            .filter(|l| !original.lines().any(|o| o == *l))
            .collect();
        assert_eq!(new_lines.len(), 2, "{new_lines:?}");
        assert!(new_lines[0].ends_with("},"), "{new_lines:?}");
        assert!(
            new_lines[1].starts_with("  {")
                && new_lines[1].contains("\"uid\":{\"type\":\"Agent\",\"id\":\"analyst\"}"),
            "{new_lines:?}"
        );
        assert_eq!(serde_json::from_str::<Vec<Value>>(&text).unwrap(), added);
        let removed = without_agent(added, "analyst").unwrap();
        assert_eq!(edited_entities(&text, &removed).unwrap(), original);

        // Any layout, strings with brackets and commas included.
        let odd = "[\t{\"uid\": {\"type\": \"Role\", \"id\": \"a,]}\\\"\"}},\n\n {\"uid\":{\"type\":\"Agent\",\"id\":\"x\"}}]";
        let parsed: Vec<Value> = serde_json::from_str(odd).unwrap();
        let without_x = without_agent(parsed.clone(), "x").unwrap();
        let text = edited_entities(odd, &without_x).unwrap();
        assert_eq!(
            text,
            "[\t{\"uid\": {\"type\": \"Role\", \"id\": \"a,]}\\\"\"}}]"
        );
        let without_first: Vec<Value> = parsed[1..].to_vec();
        assert_eq!(
            edited_entities(odd, &without_first).unwrap(),
            "[\t{\"uid\":{\"type\":\"Agent\",\"id\":\"x\"}}]"
        );
        let only: Vec<Value> = serde_json::from_str("[{\"a\":1}]").unwrap();
        assert_eq!(edited_entities("[{\"a\":1}]\n", &[]).unwrap(), "[]\n");
        assert_eq!(
            serde_json::from_str::<Vec<Value>>(&edited_entities("[]\n", &only).unwrap()).unwrap(),
            only
        );
        // Not an array, or more than one change: no edit (written anew).
        assert!(edited_entities("{}", &only).is_none());
        assert!(edited_entities("[]", &[json!(1), json!(2)]).is_none());
    }
}
