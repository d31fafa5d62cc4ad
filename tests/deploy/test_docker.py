"""The images' Dockerfiles: hadolint (with its built-in ShellCheck), and what each must contain.

No container engine runs here, so nothing is built: docker/Dockerfile.cpu must
install through scripts/setup-cpu-venv.sh and nothing else, which keeps it
identical to `make venv` by construction.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from deploy_helpers import REPO, venv_tool

DOCKERFILES = [REPO / "docker/Dockerfile", REPO / "docker/Dockerfile.cpu"]


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path):
    proc = subprocess.run([venv_tool("hadolint"), "--format", "json", str(path)], capture_output=True, text=True)
    findings = json.loads(proc.stdout or "[]")
    assert proc.returncode == 0 and not findings, findings


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\nRUN cd /tmp && echo $HOME\n")
    proc = subprocess.run([venv_tool("hadolint"), "--format", "json", str(bad)], capture_output=True, text=True)
    codes = {f["code"] for f in json.loads(proc.stdout)}
    assert proc.returncode != 0 and {"DL3007", "DL3008", "DL3003", "SC2086"} <= codes, codes


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_contract(path):
    ins = instructions(path)
    final_stage = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM"):]
    words = dict(final_stage)  # last of each instruction in the final stage
    assert json.loads(words["ENTRYPOINT"]) == ["vllm", "serve", "--attention-backend", "casakv"]
    user = words["USER"]
    assert user not in ("root", "0") and int(user) >= 10000  # non-root, a UID the chart's runAsUser matches
    assert "/health" in words["HEALTHCHECK"]
    assert words["EXPOSE"] == "8000"


def test_cuda_image_is_vllm_033_with_the_cuda_op():
    ins = instructions(DOCKERFILES[0])
    assert ("ARG", "VLLM_IMAGE=vllm/vllm-openai:v0.33.0") in ins
    froms = [a for w, a in ins if w == "FROM"]
    assert froms == ["${VLLM_IMAGE} AS build", "${VLLM_IMAGE}"]
    runs = " ".join(a for w, a in ins if w == "RUN")
    assert "--no-build-isolation" in runs and "casakv_vllm/_C" in runs and "find_spec('casakv_vllm._C')" in runs


def test_cpu_image_installs_only_through_the_setup_script():
    ins = instructions(DOCKERFILES[1])
    runs = [a for w, a in ins if w == "RUN"]
    setup = [r for r in runs if "scripts/setup-cpu-venv.sh" in r]
    assert len(setup) == 1 and "CASAKV_SETUP_TARGET=image" in setup[0]
    for run in runs:  # no Python package is installed any other way
        assert not re.search(r"\b(pip3?|uv|easy_install|conda)\b", run.replace("scripts/setup-cpu-venv.sh", "")), run
    copied = " ".join(a for w, a in ins if w == "COPY")
    script = (REPO / "scripts/setup-cpu-venv.sh").read_text()
    # every repository path the script installs from is in the image
    for rel in set(re.findall(r'"\$ROOT/([^"]+)"', script)) - {"requirements-deploy.txt", "requirements-checkov.txt"}:
        assert rel in copied, f"setup-cpu-venv.sh installs $ROOT/{rel}, which Dockerfile.cpu does not COPY"
    assert "scripts/setup-cpu-venv.sh" in copied and "pyproject.toml" in copied
    # the image target skips the development tools
    image_part = script.split('if [ "$TARGET" = dev ]; then', 1)[1].split("else", 1)[1].split("fi", 1)[0]
    assert "pytest" not in image_part and "-e" not in image_part.split()


def test_setup_script_refuses_an_unknown_target():
    proc = subprocess.run(["bash", str(REPO / "scripts/setup-cpu-venv.sh"), "/nonexistent/venv"],
                          env={"PATH": "/usr/bin:/bin", "CASAKV_SETUP_TARGET": "prod"}, capture_output=True, text=True)
    assert proc.returncode == 2 and "CASAKV_SETUP_TARGET" in proc.stderr
