//! The configuration of a local `clickhouse-server`: its `config.xml`
//! (127.0.0.1 only, data, tmp, user files, format schemas and logs under
//! one directory) and its `users.xml` (user `default` without a password,
//! or the operator, the audit sink's writer and a read-only reader with
//! passwords), as `meshctl up` and the test harness (`testkit`) write them.
//!
//! The `<yandex>` root is what ClickHouse 18.16 reads; current servers
//! accept it too. No dependency on a crate of ours: `meshctl` and `testkit`
//! both use it.

use std::io;
use std::path::{Path, PathBuf};

/// The ClickHouse user the audit sink writes with.
pub const SINK_USER: &str = "agentmesh_sink";
/// The read-only ClickHouse user (`meshctl trace`, `demo`, `status`, `ui`).
pub const READER_USER: &str = "agentmesh_reader";

/// The server's log, relative to its directory.
pub const LOG: &str = "log/clickhouse-server.log";
/// The server's error log, relative to its directory.
pub const ERROR_LOG: &str = "log/clickhouse-server.err.log";

/// The directories below the server's directory that it needs.
const SUBDIRS: [&str; 5] = ["data", "tmp", "user_files", "format_schemas", "log"];

/// One local server.
#[derive(Debug, Clone, Copy)]
pub struct Server<'a> {
    /// The directory everything lives in (made absolute by [`write()`]).
    pub dir: &'a Path,
    /// HTTP port on 127.0.0.1.
    pub http_port: u16,
    /// Native-protocol port on 127.0.0.1.
    pub tcp_port: u16,
    /// Who writes the files (in their comments): `meshctl up`, the test harness.
    pub writer: &'a str,
    /// `<macros>` entries (`system.macros`), e.g. an instance id that tells
    /// this server from another one on the same port.
    pub macros: &'a [(&'a str, &'a str)],
    /// More XML elements for the config's root, as written (e.g. a
    /// replica's `<zookeeper>` and interserver port); `""` for none.
    pub extra: &'a str,
}

/// The passwords of the three users of a server with authentication.
#[derive(Clone, Copy)]
pub struct Passwords<'a> {
    /// User `default`, the operator: DDL (the schema).
    pub admin: &'a str,
    /// User [`SINK_USER`]: inserts the audit rows.
    pub sink: &'a str,
    /// User [`READER_USER`]: reads them.
    pub reader: &'a str,
    /// Where the passwords are kept (said in a comment of `users.xml`).
    pub kept_in: &'a str,
}

impl std::fmt::Debug for Passwords<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passwords(<redacted>)")
    }
}

/// `config.xml` for `server`, whose directory is `dir` (absolute).
pub fn config_xml(server: &Server<'_>, dir: &Path) -> String {
    let d = dir.display();
    let (http_port, tcp_port, writer, extra) = (
        server.http_port,
        server.tcp_port,
        server.writer,
        server.extra,
    );
    let macros = if server.macros.is_empty() {
        String::new()
    } else {
        let entries: String = server
            .macros
            .iter()
            .map(|(name, value)| format!("\n        <{name}>{value}</{name}>"))
            .collect();
        format!("\n    <macros>{entries}\n    </macros>")
    };
    format!(
        r#"<?xml version="1.0"?>
<!-- Written by {writer}; rewritten on every start. -->
<yandex>
    <logger>
        <level>warning</level>
        <log>{d}/{LOG}</log>
        <errorlog>{d}/{ERROR_LOG}</errorlog>
        <console>0</console>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>{http_port}</http_port>
    <tcp_port>{tcp_port}</tcp_port>
    <path>{d}/data/</path>
    <tmp_path>{d}/tmp/</tmp_path>
    <user_files_path>{d}/user_files/</user_files_path>
    <format_schema_path>{d}/format_schemas/</format_schema_path>
    <users_config>{d}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mark_cache_size>268435456</mark_cache_size>
    <max_concurrent_queries>100</max_concurrent_queries>{extra}{macros}
</yandex>
"#
    )
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// `users.xml`, written by `writer`.
///
/// Without `passwords`, user `default` has no password. With them,
/// `default` (the operator, DDL) has a password and two more users exist:
/// [`SINK_USER`], which may write but not run DDL, and [`READER_USER`],
/// read-only — each limited to `database`. All of them from 127.0.0.1 only.
///
/// ClickHouse 18.16 has no `GRANT`: what it can enforce per user is a
/// password, the client networks, the databases (`allow_databases`; the
/// `system` database stays readable) and the profile settings. `readonly =
/// 1` is enforced (no writes, no DDL, no changing settings), so the reader
/// is truly read-only. The sink's profile sets `allow_ddl = 0`, but with
/// `readonly = 0` a client may change that setting per query, so on 18.16
/// the sink's password can still run DDL inside its database; only
/// `GRANT INSERT` on a current server (see `docs/security.md`) makes it
/// insert-only.
///
/// Longer than most functions: it is one XML document written out, and
/// reads best as one.
pub fn users_xml(passwords: Option<&Passwords<'_>>, database: &str, writer: &str) -> String {
    let quota = r#"
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>"#;
    let networks = "<networks><ip>127.0.0.1</ip><ip>::1</ip></networks>";
    let Some(passwords) = passwords else {
        return format!(
            r#"<?xml version="1.0"?>
<!-- Written by {writer} without authentication: user `default`, no password, 127.0.0.1 only. -->
<yandex>
    <profiles>
        <default>
            <max_memory_usage>4000000000</max_memory_usage>
        </default>
    </profiles>
    <users>
        <default>
            <password></password>
            {networks}
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>{quota}
</yandex>
"#
        );
    };
    let (admin, sink, reader, kept_in) = (
        sha256_hex(passwords.admin),
        sha256_hex(passwords.sink),
        sha256_hex(passwords.reader),
        passwords.kept_in,
    );
    format!(
        r#"<?xml version="1.0"?>
<!-- Written by {writer}: passwords in {kept_in}; 127.0.0.1 only. -->
<yandex>
    <profiles>
        <default>
            <max_memory_usage>4000000000</max_memory_usage>
        </default>
        <!-- The audit sink: writes rows; no DDL by default (18.16 lets a writer re-enable it per query). -->
        <agentmesh_writer>
            <max_memory_usage>4000000000</max_memory_usage>
            <readonly>0</readonly>
            <allow_ddl>0</allow_ddl>
        </agentmesh_writer>
        <!-- Readers: SELECT only; cannot change settings. -->
        <agentmesh_reader>
            <max_memory_usage>4000000000</max_memory_usage>
            <readonly>1</readonly>
        </agentmesh_reader>
    </profiles>
    <users>
        <!-- The operator: creates the schema. -->
        <default>
            <password_sha256_hex>{admin}</password_sha256_hex>
            {networks}
            <profile>default</profile>
            <quota>default</quota>
        </default>
        <{SINK_USER}>
            <password_sha256_hex>{sink}</password_sha256_hex>
            {networks}
            <profile>agentmesh_writer</profile>
            <quota>default</quota>
            <allow_databases><database>{database}</database></allow_databases>
        </{SINK_USER}>
        <{READER_USER}>
            <password_sha256_hex>{reader}</password_sha256_hex>
            {networks}
            <profile>agentmesh_reader</profile>
            <quota>default</quota>
            <allow_databases><database>{database}</database></allow_databases>
        </{READER_USER}>
    </users>{quota}
</yandex>
"#
    )
}

/// Creates `server.dir` and the directories below it, and writes
/// `config.xml` and `users.xml` (readable by its owner only: it names
/// password hashes) into it; returns the path of `config.xml`, the file
/// `clickhouse-server --config-file=` takes.
pub fn write(
    server: &Server<'_>,
    passwords: Option<&Passwords<'_>>,
    database: &str,
) -> io::Result<PathBuf> {
    for sub in SUBDIRS {
        let path = server.dir.join(sub);
        std::fs::create_dir_all(&path).map_err(|e| annotate(e, "creating", &path))?;
    }
    let dir =
        std::fs::canonicalize(server.dir).map_err(|e| annotate(e, "resolving", server.dir))?;
    let config_path = dir.join("config.xml");
    std::fs::write(&config_path, config_xml(server, &dir))
        .map_err(|e| annotate(e, "writing", &config_path))?;
    let users_path = dir.join("users.xml");
    write_private(
        &users_path,
        users_xml(passwords, database, server.writer).as_bytes(),
    )
    .map_err(|e| annotate(e, "writing", &users_path))?;
    Ok(config_path)
}

fn annotate(error: io::Error, doing: &str, path: &Path) -> io::Error {
    io::Error::new(
        error.kind(),
        format!("{doing} `{}`: {error}", path.display()),
    )
}

/// Writes `bytes` to `path`, mode 0600 on Unix (also when it existed).
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        options.mode(0o600);
        let mut file = options.open(path)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(bytes)
    }
    #[cfg(not(unix))]
    {
        options.open(path)?.write_all(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_the_ports_the_directory_and_the_macros() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server {
            dir: &dir.path().join("ch"),
            http_port: 18123,
            tcp_port: 19000,
            writer: "the test",
            macros: &[("instance", "abc")],
            extra: "\n    <interserver_http_port>19009</interserver_http_port>",
        };
        let path = write(&server, None, "audit").unwrap();
        let root = std::fs::canonicalize(dir.path().join("ch")).unwrap();
        assert_eq!(path, root.join("config.xml"));
        let config = std::fs::read_to_string(&path).unwrap();
        assert!(config.contains("<http_port>18123</http_port>"), "{config}");
        assert!(config.contains("<tcp_port>19000</tcp_port>"), "{config}");
        assert!(config.contains(&format!("<path>{}/data/</path>", root.display())));
        assert!(config.contains("<instance>abc</instance>"), "{config}");
        assert!(config.contains("\n    <interserver_http_port>19009</interserver_http_port>"));
        for sub in SUBDIRS {
            assert!(root.join(sub).is_dir(), "{sub}");
        }
        let users = std::fs::read_to_string(root.join("users.xml")).unwrap();
        assert!(users.contains("<password></password>"), "{users}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(root.join("users.xml"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn users_with_passwords_hold_hashes_and_keep_to_the_database() {
        let passwords = Passwords {
            admin: "a",
            sink: "s",
            reader: "r",
            kept_in: "a file",
        };
        let users = users_xml(Some(&passwords), "audit", "meshctl up");
        assert!(!users.contains("<password></password>"));
        assert!(users.contains(&sha256_hex("s")));
        // sha256("a"), a known digest.
        assert!(users.contains("ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"));
        assert_eq!(
            users
                .matches("<allow_databases><database>audit</database></allow_databases>")
                .count(),
            2
        );
        assert!(users.contains(&format!("<{SINK_USER}>")));
        assert!(users.contains(&format!("<{READER_USER}>")));
        assert!(
            !users.contains(">a<") && !users.contains(">s<"),
            "no plain password"
        );
        assert!(format!("{passwords:?}").contains("redacted"));
    }
}
