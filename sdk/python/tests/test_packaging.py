"""The package as it is released: one version across the repository
(pyproject, the Cargo workspace, CHANGELOG), the Apache-2.0 license that
pyproject names, the type hints shipped (`py.typed`), and a distribution
name that is not `agentmesh` (held on PyPI by another project)."""

import re
from pathlib import Path

SDK = Path(__file__).resolve().parents[1]
ROOT = SDK.parents[1]


def field(text: str, name: str) -> str:
    found = re.search(rf'^{name}\s*=\s*"([^"]+)"', text, re.MULTILINE)
    assert found, f"no `{name}` in the file"
    return found.group(1)


def test_one_version_across_pyproject_cargo_and_the_changelog():
    version = field((SDK / "pyproject.toml").read_text(), "version")
    workspace = (ROOT / "Cargo.toml").read_text().split("[workspace.package]", 1)[1]
    assert field(workspace, "version") == version
    assert f"\n## {version}\n" in (ROOT / "CHANGELOG.md").read_text()


def test_the_license_is_the_apache_2_0_text_pyproject_names():
    pyproject = (SDK / "pyproject.toml").read_text()
    assert 'license = { text = "Apache-2.0" }' in pyproject
    workspace = (ROOT / "Cargo.toml").read_text().split("[workspace.package]", 1)[1]
    assert field(workspace, "license") == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_the_distribution_is_not_named_like_another_project_and_ships_its_hints():
    pyproject = (SDK / "pyproject.toml").read_text()
    name = field(pyproject, "name")
    assert name == "natsmesh-agents"
    assert not name.startswith("agentmesh")
    assert (SDK / "agentmesh" / "py.typed").exists()
    assert 'agentmesh = ["py.typed"]' in pyproject
    assert f"`{name}`" in (SDK / "README.md").read_text()
