"""The README documents every setting and the two commands; the CI script runs the README's test command."""

from pathlib import Path

from store.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def test_every_setting_is_in_the_readme_table():
    readme = (REPO / "README.md").read_text()
    for name in Settings.model_fields:
        env = "DATABASE_URL" if name == "database_url" else f"SAE_ATLAS_{name.upper()}"
        assert f"`{env}`" in readme, env


def test_readme_commands_and_ci():
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci
