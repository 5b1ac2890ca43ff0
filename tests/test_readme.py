"""The README's two opening commands stay true: CI runs exactly the README's test command."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _indented_commands(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.startswith("    ") and
            line.strip().startswith("python3 -m venv")]


def test_readme_starts_with_an_install_and_run_command_and_a_test_command():
    commands = _indented_commands((REPO / "README.md").read_text())
    assert len(commands) >= 2
    assert "pip install" in commands[0] and "mantle" in commands[0]
    assert "'.[test]'" in commands[1] and commands[1].endswith("python -m pytest")


def test_ci_runs_exactly_the_readme_test_command():
    test_command = _indented_commands((REPO / "README.md").read_text())[1]
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines
