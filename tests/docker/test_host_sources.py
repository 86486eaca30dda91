"""No registry host in the tree: scripts/docker_test.sh takes its Debian mirror and package index
from the machine's own apt and pip configuration (scripts/host_sources.py)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts/host_sources.py"
# The public PyTorch CPU index is the Dockerfile's documented default (pinned in test_deploy_files).
TORCH_INDEX_FILES = {"docker/Dockerfile", "README.md", "tests/docker/test_deploy_files.py"}
URL_HOST = re.compile(r"[a-z][a-z0-9+.-]*://([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)")


def load_host_sources():
    spec = importlib.util.spec_from_file_location("host_sources", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["host_sources"] = module  # dataclasses look the module up while the class is made
    spec.loader.exec_module(module)
    return module


host_sources = load_host_sources()


def tracked_text_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [p for p in listed.splitlines() if not p.startswith("bench/results/") and (ROOT / p).is_file()]


def test_the_tree_names_no_package_registry_host() -> None:
    found = []
    for path in tracked_text_files():
        try:
            text = (ROOT / path).read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for host in URL_HOST.findall(line):
                if host == "arxiv.org" or host.endswith(".example") or re.fullmatch(r"[0-9.]+", host):
                    continue  # paper citations, reserved example names, test addresses
                if host.startswith("download.pytorch.") and path in TORCH_INDEX_FILES:
                    continue
                found.append(f"{path}:{number}: {host}")
    assert not found, "registry hosts written into the tree:\n" + "\n".join(found)


def test_apt_mirror_from_a_deb822_sources_file(tmp_path: Path) -> None:
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    (parts / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n"
        "Enabled: no\nTypes: deb\nURIs: http://off.example/debian\nSuites: bookworm\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n"
    )
    (parts / "other.sources.disabled").write_text("Types: deb\nURIs: http://no.example/x\nSuites: bookworm\n")
    assert host_sources.apt_mirror(tmp_path, "bookworm") == "http://mirror.example/debian"


def test_apt_mirror_from_one_line_lists(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] https://mirror.example/debian trixie main\n"
    )
    # No source lists bookworm: the first non-security archive (it carries every suite).
    assert host_sources.apt_mirror(tmp_path, "bookworm") == "https://mirror.example/debian"
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d/b.list").write_text("deb [trusted=yes] http://b.example/debian bookworm main\n")
    assert host_sources.apt_mirror(tmp_path, "bookworm") == "http://b.example/debian"


def test_no_apt_source_fails_saying_what_to_set(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text("deb http://sec.example/debian-security bookworm-security main\n")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "apt-mirror", "--apt-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert "no apt 'deb' source configured" in done.stderr and "DEBIAN_MIRROR" in done.stderr


@pytest.mark.parametrize(
    ("listing", "expected"),
    [
        ("global.index-url='https://g.example/simple'\n", "https://g.example/simple"),
        (
            "global.index-url='https://g.example/simple'\ninstall.index-url='https://i.example/simple'\n"
            ":env:.index-url='https://e.example/simple'\n",
            "https://e.example/simple",
        ),
        ("global.extra-index-url='file:///opt/x'\nglobal.cert='/etc/ssl/c.crt'\n", None),
        ("", None),
    ],
)
def test_index_from_pip_config(listing: str, expected: str | None) -> None:
    assert host_sources.index_from_pip_config(listing) == expected


def test_pip_index_prefers_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", "https://env.example/simple")
    assert host_sources.pip_index(["/nonexistent/python"]) == "https://env.example/simple"


def test_no_pip_to_ask_fails_saying_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "pip-index", "--python", "/nonexistent/python"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert "no pip index" in done.stderr and "PIP_INDEX_URL" in done.stderr


def test_docker_test_script_asks_the_machine() -> None:
    text = (ROOT / "scripts/docker_test.sh").read_text()
    assert 'host_sources.py" apt-mirror' in text and 'host_sources.py" pip-index' in text
    assert set(URL_HOST.findall(text)) <= {"127.0.0.1"}  # no fallback host of its own
