"""Packaging for metal-defect (src layout). `pip install -e .` gives the `metal-defect` command."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def _requirements(name: str = "requirements.txt") -> list[str]:
    """The pins of a requirements file, following its `-r other.txt` includes."""
    pins = []
    for line in (HERE / name).read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if requirement.startswith("-r "):
            pins += _requirements(requirement[3:].strip())
        elif requirement and not requirement.startswith("-"):
            pins.append(requirement)
    return pins


setup(
    name="metal-defect",
    version="0.1.0",
    description="Train, judge and serve a steel surface defect classifier (NEU and your own images).",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir={"": "src"},
    packages=find_packages("src"),
    install_requires=_requirements(),
    # the default configuration, for the installed command run outside a checkout (cli.installed_defaults)
    data_files=[("share/metal-defect", ["params.yaml", "schema.yaml"]), ("share/metal-defect/config", ["config/config.yaml"])],
    entry_points={"console_scripts": ["metal-defect=metal_defect.cli:main"]},
)
