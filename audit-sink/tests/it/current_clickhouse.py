"""Runs audit DDL, rows and shipped queries on current ClickHouse (chdb).

Reads one JSON object on stdin:
  {"database": "...", "ddl": ["CREATE ..."],
   "rows": {"<table>": ["<JSONEachRow line>", ...]},
   "queries": {"<name>": "<rendered SQL>"},
   "native": {"<name>": {"sql": "<SQL with {name:Type}>", "params": {...}}}}
and prints one JSON object:
  {"chdb": "<chdb-core version>", "version": "<server version>",
   "results": {"<name>": [<row objects>]}, "native": {"<name>": [<row objects>]}}
(`native`: the same queries with ClickHouse binding the parameters itself,
as `clickhouse-client --param_<name>=...` does; the session is in UTC.)
On any failure it prints which statement failed and exits 1. Used by
audit-sink/tests/it/current_clickhouse.rs (the package: PyPI `chdb-core`).
"""

import json
import sys

try:
    import chdb
    from chdb import session
except ImportError as err:
    sys.exit(
        f"chdb-core is not importable by {sys.executable} ({err}): "
        "run ./scripts/install-deps.sh (it installs the pinned chdb-core "
        "into .agentmesh/venv), or point AGENTMESH_PYTHON at a Python with it"
    )


def run(sess, what, sql, fmt="CSV", params=None):
    try:
        return sess.query(sql, fmt, params=params)
    except Exception as err:  # chdb raises its own error types
        sys.exit(f"{what} failed on ClickHouse (chdb): {err}\n--- SQL ---\n{sql}")


def main():
    job = json.load(sys.stdin)
    sess = session.Session()  # temporary, in-memory: removed on exit
    version = json.loads(str(run(sess, "version", "SELECT version() AS v", "JSONEachRow")))["v"]
    run(sess, "SET", "SET session_timezone = 'UTC'")
    for i, stmt in enumerate(job["ddl"]):
        run(sess, f"DDL statement {i + 1}", stmt)
    db = job["database"]
    for table, lines in job["rows"].items():
        if lines:
            sql = f"INSERT INTO `{db}`.`{table}` FORMAT JSONEachRow\n" + "\n".join(lines) + "\n"
            run(sess, f"insert into {table}", sql)
    run(sess, "USE", f"USE `{db}`")
    results = {}
    for name, sql in job["queries"].items():
        out = str(run(sess, f"query {name}", sql, "JSONEachRow"))
        results[name] = [json.loads(line) for line in out.splitlines() if line.strip()]
    native = {}
    for name, q in job.get("native", {}).items():
        out = str(run(sess, f"query {name} (native parameters)", q["sql"], "JSONEachRow", q["params"]))
        native[name] = [json.loads(line) for line in out.splitlines() if line.strip()]
    sess.close()
    print(json.dumps({"chdb": chdb.__version__, "version": version, "results": results, "native": native}))


if __name__ == "__main__":
    main()
