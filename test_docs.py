"""README holds to the code: its configuration table is the settings rows, exactly."""

import pathlib
import sys

import smsp

ROOT = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "scripts"))

import settings_table  # noqa: E402


def test_readme_configuration_table_is_generated_from_the_settings_rows() -> None:
    readme = (ROOT / "README.md").read_text()
    assert settings_table.BEGIN in readme and settings_table.END in readme
    assert settings_table.readme_with_table(readme) == readme, \
        "README's table is stale: run python scripts/settings_table.py --write"


def test_the_table_names_every_variable_smsp_reads_once() -> None:
    rows = settings_table.table().splitlines()[2:]
    assert [row.split("`")[1] for row in rows] == [s.env for s in smsp.all_settings()]
    assert len({s.env for s in smsp.all_settings()}) == len(rows)


import provider_tables  # noqa: E402


def test_provider_classification_tables_are_generated_from_the_provider_classes() -> None:
    page = (ROOT / "docs" / "providers.md").read_text()
    assert provider_tables.BEGIN in page and provider_tables.END in page
    assert provider_tables.with_tables(page) == page, \
        "docs/providers.md is stale: run python scripts/provider_tables.py --write"
    for name in smsp.PROVIDERS:
        assert f"### {name}\n" in page or name == "smtp"


def test_the_manifest_runs_the_image_of_this_version() -> None:
    manifest = (ROOT / "deploy" / "kubernetes.yaml").read_text()
    tags = [line.split("image:")[1].split("#")[0].strip() for line in manifest.splitlines()
            if "image:" in line and "smsp" in line]
    assert tags and all(tag.endswith(f"/smsp:{smsp.VERSION}") for tag in tags)
