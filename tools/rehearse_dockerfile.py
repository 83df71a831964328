"""Replays the Dockerfile's instructions in a Debian chroot, for machines without a Docker
engine (ours have only the client), then starts the image's ENTRYPOINT and asks the
server for a completion with the official openai client.

    debootstrap --variant=minbase --include=python3,python3-venv,g++,ca-certificates \
        bookworm /tmp/rootfs http://deb.debian.org/debian
    sudo python tools/rehearse_dockerfile.py /tmp/rootfs     # as root (chroot); a fresh rootfs

What stands in for what: the chroot (Debian bookworm) for `FROM python:3.11-slim-bookworm`
(also bookworm), with a venv of Debian's python3.11 at /usr/local/venv first on PATH for
the image's /usr/local Python (with its headers, python3-dev); `--arg NAME=VALUE` for `docker build --build-arg` (here,
where download.pytorch.org is out of reach, TORCH_INDEX=https://pypi.org/simple and
pip's find-links on the host's wheel directory, bind-mounted). Every RUN, COPY,
WORKDIR, ENV, ARG and USER is the Dockerfile's own, read from it: nothing is repeated
here. Not covered: the layers and their cache, EXPOSE (the chroot shares the host's
network), `docker run -p`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = "/usr/local/venv"  # the image's Python, in the chroot
MOUNTS = ("proc", "sys", "dev")


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#"):  # also inside a continued line, as Docker's
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        pending = ""
    return out


class Chroot:
    """The rootfs with /proc, /sys, /dev and extra host directories bind-mounted."""

    def __init__(self, root: Path, binds: list[str]) -> None:
        self.root, self.binds = root, binds
        # Docker's default PATH, the image's Python first
        path = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        self.env = {"PATH": path, "HOME": "/root"}
        self.workdir, self.user = "/", "0:0"

    def __enter__(self) -> "Chroot":
        for name in MOUNTS:
            subprocess.run(["mount", "--bind", f"/{name}", str(self.root / name)], check=True)
        for path in self.binds:
            (self.root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "--bind", path, str(self.root / path.lstrip("/"))],
                           check=True)
        shutil.copy("/etc/resolv.conf", self.root / "etc/resolv.conf")
        return self

    def __exit__(self, *exc) -> None:
        for path in [*self.binds, *(f"/{m}" for m in MOUNTS)][::-1]:
            subprocess.run(["umount", "-l", str(self.root / path.lstrip("/"))], check=False)

    def command(self, argv: list[str]) -> list[str]:
        env = [f"{k}={v}" for k, v in self.env.items()]
        inner = f"cd {shlex.quote(self.workdir)} && exec " + shlex.join(argv)
        return ["chroot", f"--userspec={self.user}", str(self.root), "/usr/bin/env", "-i",
                *env, "/bin/sh", "-c", inner]

    def uid(self, name: str) -> str:
        """'uid:gid' of a user of the rootfs (chroot --userspec would ask the host's)."""
        for line in (self.root / "etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == name:
                return f"{fields[2]}:{fields[3]}"
        raise ValueError(f"no user {name!r} in {self.root}/etc/passwd")

    def run(self, shell: str) -> None:
        subprocess.run(self.command(["/bin/sh", "-c", shell]), check=True)


def expand(text: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        text = text.replace("${" + name + "}", value).replace("$" + name, value)
    return text


def replay(chroot: Chroot, steps: list[tuple[str, str]], args: dict[str, str]) -> list[str]:
    """Runs the build steps; returns the ENTRYPOINT's argv."""
    entrypoint: list[str] = []
    for word, rest in steps:
        print(f"--- {word} {rest[:100]}", flush=True)
        if word == "FROM" or word == "EXPOSE":
            continue
        if word == "ARG":
            name, _, default = rest.partition("=")
            chroot.env[name] = args.get(name, default)
        elif word == "ENV":
            name, _, value = rest.partition("=")
            chroot.env[name] = value
        elif word == "WORKDIR":
            chroot.workdir = rest
            (chroot.root / rest.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif word == "COPY":
            *sources, target = shlex.split(rest)
            dest = chroot.root / chroot.workdir.lstrip("/") / target
            for source in sources:
                src = REPO / source
                if src.is_dir():
                    shutil.copytree(src, dest, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    dest.mkdir(parents=True, exist_ok=True)
                    shutil.copy(src, dest / src.name)
        elif word == "RUN":
            chroot.run(expand(rest, {k: v for k, v in chroot.env.items()}))
        elif word == "USER":
            chroot.user = chroot.uid(rest)
            chroot.env["HOME"] = f"/home/{rest}"
        elif word == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        else:
            raise ValueError(f"instruction {word} is not replayed here")
    return entrypoint


def serve_and_ask(chroot: Chroot, entrypoint: list[str], port: int) -> None:
    argv = [a if a != "8000" else str(port) for a in entrypoint]
    server = subprocess.Popen(chroot.command(argv))
    try:
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=30)
        deadline = time.monotonic() + 300
        while True:
            try:
                models = client.models.list()
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not come up")
                time.sleep(2)
        model = models.data[0].id
        out = client.completions.create(model=model, prompt="The capital of France is",
                                        max_tokens=8, temperature=0)
        print(f"model {model}: {out.choices[0].text!r}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rootfs", type=Path, help="a debootstrapped Debian bookworm")
    parser.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE",
                        help="a build argument (docker build --build-arg)")
    parser.add_argument("--bind", action="append", default=[],
                        help="a host directory to bind-mount at the same path")
    parser.add_argument("--port", type=int, default=8011)
    ns = parser.parse_args()
    args = dict(a.split("=", 1) for a in ns.arg)
    with Chroot(ns.rootfs, ns.bind) as chroot:
        if not (ns.rootfs / VENV.lstrip("/")).exists():  # the base image's Python, headers too
            chroot.run("apt-get update -q && apt-get install -y -q python3-dev")
            chroot.run(f"python3 -m venv {VENV}")
        for name in ("PIP_FIND_LINKS", "PIP_DEFAULT_TIMEOUT", "PIP_CERT"):
            if name in os.environ:
                chroot.env[name] = os.environ[name]
        if "PIP_CERT" in os.environ:  # a host behind a proxy with its own CA
            shutil.copy(os.environ["PIP_CERT"], ns.rootfs / os.environ["PIP_CERT"].lstrip("/"))
        started = time.monotonic()
        entrypoint = replay(chroot, instructions(REPO / "Dockerfile"), args)
        print(f"--- built in {time.monotonic() - started:.0f} s", flush=True)
        serve_and_ask(chroot, entrypoint, ns.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
