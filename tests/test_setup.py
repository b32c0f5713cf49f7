"""README's two set-up commands and CI agree: CI creates the same environment and runs the same tests."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Set-up"):readme.index("\n## ", readme.index("## Set-up") + 1)]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_has_two_setup_commands_that_use_a_project_environment():
    install, tests = setup_commands()
    assert install.startswith("python3 -m venv .venv && .venv/bin/python -m pip install -r requirements.txt")
    assert "pip install" not in tests and tests.startswith(".venv/bin/")


def test_ci_runs_the_readme_setup_and_test_command():
    install, tests = setup_commands()
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install.split(" && .venv/bin/revlens")[0].replace("pip install -r", "pip install -q -r") in lines
    assert lines[-1] == tests
