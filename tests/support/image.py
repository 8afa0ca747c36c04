"""The container files read as data: the Dockerfile's final stage and compose.yaml's services, so tests start what
the image and compose start (commands, environment, mounts) instead of a second, hand-written copy of them."""

from __future__ import annotations

import fnmatch
import json
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml


@dataclass
class Stage:
    """A Dockerfile stage: its ENV, its COPY sources by destination (not --from copies), HEALTHCHECK and CMD."""

    env: dict[str, str] = field(default_factory=dict)
    copies: dict[str, str] = field(default_factory=dict)
    healthcheck: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    user: str = ""


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = pending + line
        pending = ""
        word, _, rest = whole.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_stages(path: Path) -> list[Stage]:
    """Every stage, in order; the last is the image."""
    stages: list[Stage] = []
    for word, rest in _instructions(path.read_text()):
        if word == "FROM":
            stages.append(Stage())
            continue
        stage = stages[-1]
        if word == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                stage.env[name] = value
        elif word == "COPY":
            args = shlex.split(rest)
            if any(a.startswith("--from") for a in args):
                continue
            *sources, dest = [a for a in args if not a.startswith("--")]
            for source in sources:
                stage.copies[dest] = source
        elif word == "HEALTHCHECK":
            stage.healthcheck = json.loads(rest[rest.index("CMD") + 3 :])
        elif word == "CMD":
            stage.cmd = json.loads(rest)
        elif word == "RUN":
            stage.runs.append(rest)
        elif word == "USER":
            stage.user = rest
    return stages


def image(root: Path) -> Stage:
    return dockerfile_stages(root / "Dockerfile")[-1]


def compose(root: Path) -> dict:
    return yaml.safe_load((root / "compose.yaml").read_text())


@dataclass(frozen=True)
class Mount:
    source: str  # a host path (./...) or a named volume
    target: str
    read_only: bool

    @property
    def bind(self) -> bool:
        return self.source.startswith((".", "/"))


def mounts(service: dict) -> list[Mount]:
    """A compose service's volumes in the short syntax, `source:target[:ro]`."""
    out = []
    for entry in service.get("volumes", []):
        source, target, *mode = entry.split(":")
        out.append(Mount(source, target, mode == ["ro"]))
    return out


def rewrite(value: str, where: dict[str, Path]) -> str:
    """`value` with a container path prefix replaced by its host folder (`where`: container path -> host path)."""
    for target, host in sorted(where.items(), key=lambda kv: -len(kv[0])):
        if value == target or value.startswith(target.rstrip("/") + "/"):
            return str(host / PurePosixPath(value).relative_to(target))
    return value


def dockerignore(root: Path) -> list[str]:
    lines = (root / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    # Docker's matching, for the patterns used here: root-relative names and paths, and `**/` for any depth.
    for pattern in patterns:
        if fnmatch.fnmatchcase(rel, pattern):
            return True
        if pattern.startswith("**/") and fnmatch.fnmatchcase(PurePosixPath(rel).name, pattern[3:]):
            return True
    return False


def build_context(root: Path, out: Path) -> Path:
    """A copy of `root` as `docker build` sees it: the .dockerignore's patterns left out."""
    patterns = dockerignore(root)

    def ignore(folder: str, names: list[str]) -> set[str]:
        rel = Path(folder).relative_to(root)
        return {n for n in names if _ignored((rel / n).as_posix().removeprefix("./"), patterns)}

    shutil.copytree(root, out, ignore=ignore, symlinks=True)
    return out
