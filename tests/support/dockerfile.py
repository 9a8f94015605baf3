"""Read the Dockerfile's final stage: its ENV, WORKDIR, COPY and CMD, as the image runs them.

The offline checks (tests/test_deploy.py) compare them with k8s/, and the
rolling-update simulation runs the CMD itself, so a change to the image's
command is exercised without building the image.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from .procs import ROOT

PORT_FLAG = re.compile(r"(--port[ =])(\d+)\b")


def instructions(path: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, continuation lines joined, comments dropped."""
    text = path.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


@dataclass(frozen=True)
class Image:
    """The final stage of a Dockerfile."""

    cmd: list[str]
    env: dict[str, str]  # as written: ``$PATH`` and the like are not expanded
    workdir: str
    copies: list[tuple[str, str]]  # (source in the build context, destination), not --from

    @classmethod
    def load(cls, path: Path = ROOT / "Dockerfile") -> Image:
        found = instructions(path)
        last_from = max(i for i, (name, _) in enumerate(found) if name == "FROM")
        env: dict[str, str] = {}
        workdir = "/"
        cmd: list[str] = []
        copies: list[tuple[str, str]] = []
        for instruction, args in found[last_from:]:
            if instruction == "ENV":
                words = shlex.split(args)
                if "=" not in words[0]:  # the legacy `ENV KEY value` form
                    env[words[0]] = args.partition(" ")[2].strip()
                else:
                    for word in words:
                        name, _, value = word.partition("=")
                        env[name] = value
            elif instruction == "WORKDIR":
                workdir = str(Path(workdir, args))
            elif instruction == "CMD":
                cmd = json.loads(args)  # exec form; shell form would need its own rules
            elif instruction == "COPY" and not args.startswith("--from"):
                *sources, dest = shlex.split(args)
                copies += [(src, dest) for src in sources if not src.startswith("--")]
        assert cmd, f"{path} has no CMD in its final stage"
        return cls(cmd=cmd, env=env, workdir=workdir, copies=copies)

    @property
    def script(self) -> str | None:
        """The shell script of a ``["sh", "-c", SCRIPT]`` CMD, else None."""
        return _script(self.cmd)

    @property
    def port(self) -> int:
        """The port the CMD's ``--port`` names."""
        return listen_port(self.cmd)

    def cmd_on_port(self, port: int) -> list[str]:
        """The CMD with only the number after ``--port`` replaced (in the script, if a shell's).

        The script is edited as text so its quoting and ``${VAR:-default}``
        expansions reach the shell exactly as written.
        """
        if self.script is not None:
            script, n = PORT_FLAG.subn(rf"\g<1>{port}", self.script)
            assert n == 1, f"expected one --port in {self.script!r}"
            return [*self.cmd[:2], script]
        argv = list(self.cmd)
        argv[argv.index("--port") + 1] = str(port)
        return argv

    def lay_out(self, context: Path, workdir: Path) -> None:
        """Copy what the final stage COPYs from the build context into ``workdir``."""
        for src, dest in self.copies:
            target = Path(workdir, Path(self.workdir, dest).relative_to(self.workdir))
            source = context / src
            if source.is_dir():
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)


def _script(argv: list[str]) -> str | None:
    if argv[:2] == ["sh", "-c"] and len(argv) == 3:
        return argv[2]
    return None


def server_argv(argv: list[str]) -> list[str]:
    """The server's own argv: ``argv``, or the words its ``sh -c 'exec ...'`` execs."""
    script = _script(argv)
    if script is None:
        return list(argv)
    words = shlex.split(script)
    assert words[0] == "exec", "the shell must exec the server to pass signals on"
    return words[1:]


def listen_port(argv: list[str]) -> int:
    """The port a uvicorn command line (maybe ``sh -c 'exec uvicorn ...'``) names."""
    words = server_argv(argv)
    assert "--port" in words, f"no --port in {argv}: uvicorn would listen on 8000 by default"
    return int(words[words.index("--port") + 1])
