"""The README and docs/ stay true to the tree: links resolve, settings are all documented, no
machine paths, the README stays a short front door, and the evaluation table is what its
generator writes from the committed records."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 260

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"`[^`]*`")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|home|Users|root)/")
VARIABLE = re.compile(r"\bARCDIFF_[A-Z0-9_]+\b")


def prose_lines(path: Path) -> list[str]:
    """The lines of a Markdown file outside fenced code blocks."""
    out, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading).strip().lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The heading anchors of a Markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    out: set[str] = set()
    for line in prose_lines(path):
        m = HEADING.match(line)
        if m:
            base, n = slug(m.group(2)), 0
            while (name := base if n == 0 else f"{base}-{n}") in out:
                n += 1
            out.add(name)
    return out


def relative_links(path: Path) -> list[str]:
    links = []
    for line in prose_lines(path):
        for m in LINK.finditer(INLINE_CODE.sub("", line)):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
                continue
            links.append(target)
    return links


def test_pages_exist():
    names = {p.name for p in DOCS}
    assert {"api.md", "configuration.md", "deployment.md", "performance.md"} <= names
    assert {"evaluation.md", "security.md", "development.md"} <= names


def test_readme_is_a_short_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    assert any("docs/playground.png" in line for line in lines)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        if target.startswith("/"):
            broken.append(f"{target} (absolute: links must be relative)")
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(REPO)})")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_link_check_sees_broken_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](missing.md) `[code](ignored.md)`\n```\n[fenced](x.md)\n```\n")
    assert relative_links(page) == ["#title", "missing.md"]
    assert anchors(page) == {"title"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_machine_paths(page):
    hits = [line.strip() for line in page.read_text(encoding="utf-8").splitlines() if MACHINE_PATH.search(line)]
    assert not hits, f"{page.relative_to(REPO)} names paths of one machine: {hits}"


PUBLISHED_JSON = [*sorted((REPO / "docs").rglob("*.json")), *sorted((REPO / "arcdiff/model/weights").rglob("*.json"))]


@pytest.mark.parametrize("path", PUBLISHED_JSON, ids=lambda p: str(p.relative_to(REPO)))
def test_no_machine_paths_in_published_records(path):
    # eval records and bundled model configs ship with the project: a path of the machine that
    # made them means nothing elsewhere (they say MNIST_DIR instead)
    hits = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if MACHINE_PATH.search(line)]
    assert not hits, f"{path.relative_to(REPO)} names paths of one machine: {hits}"


def setting_classes() -> list[type]:
    """Every settings class a command reads: `arcdiff serve` (Settings: the API's, the queue's and the
    engine's) and `arcdiff worker` (WorkerSettings: the queue's, the engine's and the worker loop's)."""
    from arcdiff.service.settings import ApiSettings, Settings
    from arcdiff.settings import QueueSettings
    from arcdiff.worker.settings import EngineSettings, WorkerSettings

    # the parts are all inside the two that commands read, so listing those two lists every setting
    for part in (QueueSettings, EngineSettings, ApiSettings):
        assert part.model_fields.keys() <= Settings.model_fields.keys(), part
    assert EngineSettings.model_fields.keys() <= WorkerSettings.model_fields.keys()
    return [Settings, WorkerSettings]


def setting_variables() -> set[str]:
    classes = setting_classes()
    prefix = classes[0].model_config["env_prefix"]
    return {prefix + name.upper() for cls in classes for name in cls.model_fields}


def test_configuration_lists_every_setting():
    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    missing = sorted(v for v in setting_variables() if f"`{v}`" not in text)
    assert not missing, f"docs/configuration.md does not list {missing}"


def test_documented_variables_exist():
    """Every ARCDIFF_ variable the docs name is a setting or is read somewhere in the tree."""
    known = setting_variables()
    sources = [
        *(p for p in (REPO / "arcdiff").rglob("*.py")),
        *(p for p in (REPO / "tests").rglob("*.py") if p.name != "test_docs.py"),
        *(p for p in (REPO / "deploy").rglob("*") if p.is_file()),
        REPO / "docker-compose.yml",
        REPO / "docker-compose.cpu.yml",
        REPO / "Dockerfile",
    ]
    used = set()
    for p in sources:
        used |= set(VARIABLE.findall(p.read_text(encoding="utf-8", errors="replace")))
    stale = {}
    for page in PAGES:
        for v in set(VARIABLE.findall(page.read_text(encoding="utf-8"))) - known - used:
            stale.setdefault(v, []).append(page.name)
    assert not stale, f"variables named in the docs that nothing reads: {stale}"


EVAL_TABLES = sorted((REPO / "docs" / "eval").glob("**/table.json"))


@pytest.mark.parametrize("path", EVAL_TABLES, ids=lambda p: str(p.parent.relative_to(REPO)))
def test_eval_table_is_what_the_generator_writes(path):
    """Each docs/eval table.md is `markdown()` of the committed records: no hand edits, no machine paths."""
    from arcdiff.eval.table import markdown

    table = json.loads(path.read_text())
    written = markdown(table["records"], table["command"])
    assert (path.parent / "table.md").read_text() == written
    assert f"--out {path.parent.relative_to(REPO)} " in table["command"]
    refs = {r["ref"] for r in table["records"]}
    assert not any(ref in written for ref in refs if Path(ref).is_absolute())


def test_docs_name_every_solver_as_the_solver_table_does():
    """The solver lists in the docs against model.solver_names.SOLVER_TABLE (which the API, the CLI
    and the playground read): every solver with its NFE per step in the evaluation table, every
    name in the API's field table, and each default grid where the API page states it."""
    from arcdiff.model.solver_names import SOLVER_TABLE, solvers_with_grid

    evaluation = (REPO / "docs" / "evaluation.md").read_text(encoding="utf-8")
    rows = {}
    for line in evaluation.splitlines():
        m = re.match(r"^\| (`[a-z0-9_]+`(?:, `[a-z0-9_]+`)*) \| (\d+) \|", line)
        if m:
            for name in re.findall(r"`([a-z0-9_]+)`", m.group(1)):
                rows[name] = int(m.group(2))
    assert rows == {s.name: s.nfe_per_step for s in SOLVER_TABLE}
    api = (REPO / "docs" / "api.md").read_text(encoding="utf-8")
    (solver_row,) = [line for line in api.splitlines() if line.startswith("| `solver` |")]
    assert re.findall(r"`([a-z0-9_]+)`", solver_row.split("|")[2]) == [s.name for s in SOLVER_TABLE]
    (schedule_row,) = [line for line in api.splitlines() if line.startswith("| `schedule` |")]
    # "Omitted: `uniform` for `euler`, ... (what they always ran on), `karras` for the others"
    uniform = re.findall(r"`([a-z0-9_]+)`", re.search(r"Omitted: `uniform` for ([^(]+)\(", schedule_row).group(1))
    assert uniform == solvers_with_grid("uniform") and "`karras` for the others" in schedule_row
    assert solvers_with_grid("karras") == [s.name for s in SOLVER_TABLE if s.name not in uniform]


def test_the_documented_solver_state_is_what_init_returns():
    """docs/development.md lists the keys of the state Solver.init returns: each solver's state has
    them, and DDIM's (one evaluation per step, no history) has nothing else."""
    import re

    import torch

    from arcdiff.model.solvers import SOLVERS, get_solver

    text = " ".join((REPO / "docs" / "development.md").read_text().split())
    found = re.search(r"The state `Solver.init` returns holds, per sample: ((?:`\w+`, )+`\w+`)", text)
    assert found, "docs/development.md no longer states the solver state's keys"
    documented = set(re.findall(r"`(\w+)`", found.group(1)))
    x_T, steps = torch.zeros(2, 1, 4, 4), torch.tensor([3, 5])
    for name in SOLVERS:
        keys = set(get_solver(name).init(x_T, steps))
        assert documented <= keys, (name, documented - keys)
    assert set(get_solver("ddim").init(x_T, steps)) == documented
    assert set(get_solver("ddim").init(x_T, torch.tensor([2]), etas=torch.tensor([[1.5, 1.0, 0.0]]))) == {
        *documented,
        "etas",
    }
