#!/usr/bin/env python3
"""Where this machine installs packages from, read from its own configuration.

scripts/docker_test.sh asks it instead of carrying any registry host itself:

    host_sources.py apt-mirror [--suite bookworm] [--apt-dir /etc/apt]
        the URI of an enabled ``deb`` source in sources.list, sources.list.d/*.list (one-line
        format) or sources.list.d/*.sources (deb822): one listing the suite first, else the
        first that is not a security or updates archive (those lack the base suite).
    host_sources.py pip-index [--python PYTHON]
        the index pip installs from: PIP_INDEX_URL, else the ``index-url`` of ``pip config
        list`` (the env, install, download, then global section: every pip.conf, /etc/pip.conf
        included), else the default built into that pip.

Each prints one URL, or exits 2 with a message saying what was looked at and how to set it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

URI_SCHEMES = ("http://", "https://", "file:/")
PIP_SECTIONS = (":env:", "install", "download", "global")  # pip's precedence for `pip install`
PIP_DEFAULT_INDEX = "from pip._internal.models.index import PyPI; print(PyPI.simple_url)"


class NotConfigured(Exception):
    pass


@dataclass
class AptSource:
    uri: str
    suites: list[str]


def one_line_sources(text: str) -> list[AptSource]:
    """``deb [options] uri suite [component...]`` lines of a .list file."""
    sources = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):  # [arch=amd64 signed-by=...]
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if len(words) >= 2:
            sources.append(AptSource(uri=words[0], suites=[words[1]]))
    return sources


def deb822_sources(text: str) -> list[AptSource]:
    """The enabled ``Types: deb`` stanzas of a .sources file (one source per URI)."""
    sources = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and key:  # a continuation line
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        suites = fields.get("suites", "").split()
        sources.extend(AptSource(uri=uri, suites=suites) for uri in fields.get("uris", "").split())
    return sources


def apt_sources(apt_dir: Path) -> list[AptSource]:
    sources = []
    main_list = apt_dir / "sources.list"
    if main_list.is_file():
        sources += one_line_sources(main_list.read_text(errors="replace"))
    parts = apt_dir / "sources.list.d"
    for path in sorted(parts.glob("*.list")) if parts.is_dir() else []:
        sources += one_line_sources(path.read_text(errors="replace"))
    for path in sorted(parts.glob("*.sources")) if parts.is_dir() else []:
        sources += deb822_sources(path.read_text(errors="replace"))
    return [s for s in sources if s.uri.startswith(URI_SCHEMES)]


def apt_mirror(apt_dir: Path, suite: str) -> str:
    sources = apt_sources(apt_dir)
    for source in sources:
        if suite in source.suites:
            return source.uri.rstrip("/")
    for source in sources:
        if not any(s.endswith(("-security", "-updates", "/updates")) for s in source.suites):
            return source.uri.rstrip("/")
    raise NotConfigured(
        f"no apt 'deb' source configured in {apt_dir}/sources.list or {apt_dir}/sources.list.d/*.list|*.sources; "
        "set DEBIAN_MIRROR to a Debian mirror URL"
    )


def index_from_pip_config(listing: str) -> str | None:
    """The ``index-url`` that wins in ``pip config list`` output (``section.key='value'`` lines)."""
    found: dict[str, str] = {}
    for line in listing.splitlines():
        name, sep, value = line.partition("=")
        section, _, key = name.rpartition(".")
        if sep and key == "index-url":
            found[section] = value.strip().strip("'\"")
    for section in PIP_SECTIONS:
        if found.get(section):
            return found[section]
    return None


def run_python(python: list[str], *args: str) -> str:
    try:
        done = subprocess.run([*python, *args], capture_output=True, text=True, timeout=60, check=False)
    except OSError:
        return ""
    return done.stdout if done.returncode == 0 else ""


def pip_index(python: list[str]) -> str:
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"].split()[0]
    configured = index_from_pip_config(run_python(python, "-m", "pip", "config", "list"))
    if configured:
        return configured
    default = run_python(python, "-c", PIP_DEFAULT_INDEX).strip()
    if default:
        return default
    raise NotConfigured(
        f"no pip index: PIP_INDEX_URL is unset, `{' '.join(python)} -m pip config list` names no index-url "
        "and that pip reports no default index; set PIP_INDEX_URL (or index-url in /etc/pip.conf)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    apt = sub.add_parser("apt-mirror")
    apt.add_argument("--suite", default="bookworm")
    apt.add_argument("--apt-dir", type=Path, default=Path("/etc/apt"))
    pip = sub.add_parser("pip-index")
    pip.add_argument("--python", default=sys.executable, help="the interpreter whose pip to ask")
    args = parser.parse_args(argv)
    try:
        url = apt_mirror(args.apt_dir, args.suite) if args.what == "apt-mirror" else pip_index([args.python])
    except NotConfigured as exc:
        print(f"host_sources.py {args.what}: {exc}", file=sys.stderr)
        return 2
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
