//! The demo's small world: a repository the coder searches
//! ([`REPOSITORY`], `code.search`), the change it proposes and the review
//! that checks it. Plain functions, no mesh: the agents in `agents.rs` call
//! them.

use serde::{Deserialize, Serialize};

/// The demo repository that the coder's `code.search` searches: path and
/// contents.
pub(crate) const REPOSITORY: &[(&str, &str)] = &[
    (
        "src/lib.rs",
        "//! The accounts service.\n\
         pub mod db;\n\
         pub mod error;\n\
         pub mod handlers;\n",
    ),
    (
        "src/handlers/login.rs",
        "use crate::db::Users;\n\
         use crate::error::ApiError;\n\
         \n\
         /// Checks a password and opens a session.\n\
         pub async fn login(users: &Users, email: &str, password: &str) -> Result<Session, ApiError> {\n\
         \x20   let user = users.find(email).await?.ok_or(ApiError::Unauthorized)?;\n\
         \x20   user.verify(password)?;\n\
         \x20   Ok(Session::open(&user))\n\
         }\n",
    ),
    (
        "src/handlers/signup.rs",
        "use crate::db::Users;\n\
         use crate::error::ApiError;\n\
         \n\
         /// What the signup form posts.\n\
         pub struct SignupForm {\n\
         \x20   pub email: String,\n\
         \x20   pub password: String,\n\
         }\n\
         \n\
         /// Creates an account.\n\
         pub async fn signup(users: &Users, form: SignupForm) -> Result<UserId, ApiError> {\n\
         \x20   let hash = hash_password(&form.password)?;\n\
         \x20   users.insert(&form.email, &hash).await\n\
         }\n",
    ),
    (
        "tests/signup.rs",
        "#[tokio::test]\n\
         async fn signup_creates_the_account() {\n\
         \x20   let users = Users::in_memory();\n\
         \x20   signup(&users, form(\"ada@example.com\", \"correct horse battery\")).await.unwrap();\n\
         }\n",
    ),
];

/// One line `code.search` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Match {
    /// The file.
    pub file: String,
    /// The line number, from 1.
    pub line: usize,
    /// The line, trimmed.
    pub text: String,
}

/// `code.search`: the lines of [`REPOSITORY`] files under `path` that
/// contain `query`.
pub(crate) fn search(query: &str, path: &str) -> Vec<Match> {
    REPOSITORY
        .iter()
        .filter(|(file, _)| file.starts_with(path))
        .flat_map(|(file, text)| {
            text.lines()
                .enumerate()
                .filter(|(_, line)| line.contains(query))
                .map(|(i, line)| Match {
                    file: (*file).to_owned(),
                    line: i + 1,
                    text: line.trim().to_owned(),
                })
        })
        .collect()
}

/// The arguments of `code.search`.
#[derive(Debug, Deserialize)]
pub(super) struct SearchArgs {
    pub(super) query: String,
    #[serde(default)]
    pub(super) path: String,
}

/// The change the coder proposes for the handler found at `at`: checks of
/// the email and the password at the top of the function, as a diff.
pub(crate) fn propose_change(at: &Match) -> String {
    format!(
        "--- a/{file}\n+++ b/{file}\n@@ -{line} +{line},3 @@\n {text}\n\
         +    if !form.email.contains('@') {{ return Err(ApiError::invalid(\"email\")); }}\n\
         +    if form.password.len() < 12 {{ return Err(ApiError::invalid(\"password\")); }}\n",
        file = at.file,
        line = at.line,
        text = at.text,
    )
}

/// What the reviewer makes of a diff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Review {
    /// The fields the added lines validate, in order.
    pub checks: Vec<String>,
    /// Whether both the email and the password are validated.
    pub approved: bool,
}

/// Reviews a diff: which fields its added lines reject with
/// `ApiError::invalid("<field>")`.
pub(crate) fn review(diff: &str) -> Review {
    let checks: Vec<String> = diff
        .lines()
        .filter(|l| l.starts_with('+') && !l.starts_with("+++") && l.contains("return Err"))
        .filter_map(|l| {
            let rest = l.split("ApiError::invalid(\"").nth(1)?;
            rest.split('"').next().map(str::to_owned)
        })
        .collect();
    let approved = ["email", "password"]
        .iter()
        .all(|field| checks.iter().any(|c| c == field));
    Review { checks, approved }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_finds_the_handler_under_the_path() {
        let found = search("fn signup", "src/");
        assert_eq!(
            found,
            vec![Match {
                file: "src/handlers/signup.rs".into(),
                line: 11,
                text: "pub async fn signup(users: &Users, form: SignupForm) -> Result<UserId, ApiError> {".into(),
            }]
        );
        // The test file matches `signup` too, but is not under `src/`.
        assert_eq!(search("signup(", "tests/").len(), 1);
        assert_eq!(search("signup(", "").len(), 2);
        assert!(search("fn nothing_like_this", "").is_empty());
    }

    #[test]
    fn the_proposed_change_passes_review_and_a_partial_one_does_not() {
        let hit = &search("fn signup", "src/")[0];
        let diff = propose_change(hit);
        assert!(diff.starts_with(
            "--- a/src/handlers/signup.rs\n+++ b/src/handlers/signup.rs\n@@ -11 +11,3 @@\n"
        ));
        assert_eq!(
            review(&diff),
            Review {
                checks: vec!["email".into(), "password".into()],
                approved: true
            }
        );
        let partial: String = diff
            .lines()
            .filter(|l| !l.contains("\"password\""))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            review(&partial),
            Review {
                checks: vec!["email".into()],
                approved: false
            }
        );
        // Removed lines are not checks.
        assert!(
            review("-    if x { return Err(ApiError::invalid(\"email\")); }")
                .checks
                .is_empty()
        );
    }
}
