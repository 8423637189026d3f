"""README and docs/ hold to the code: the names they use exist, and what smsp has is named."""

import pathlib
import re

import smsp
from testkit import make_config

ROOT = pathlib.Path(__file__).resolve().parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
SOURCE = (ROOT / "smsp.py").read_text()
# Variables the black-box suite reads (functional_test.py), and the example provider of
# docs/providers.md: not settings of smsp, but real names a page may use.
OTHER_VARIABLES = {"SMSP_HOST_PORT", "SMSP_PROTOCOL", "SMSP_FUNCTIONAL_WAIT",
                   "SMSP_ACME_API_KEY", "SMSP_ACME_BASE_URL"}
_LINK_RE = re.compile(r"\]\(([^)\s]+)\)")


def _text(page: pathlib.Path) -> str:
    return page.read_text()


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: pathlib.Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in _text(page).splitlines()
            if line.startswith("#")}


def test_readme_links_every_docs_page() -> None:
    readme = _text(README)
    assert DOCS
    for page in DOCS:
        assert f"](docs/{page.name})" in readme, page.name


def test_every_relative_link_reaches_a_file_and_its_heading() -> None:
    for page in PAGES:
        for target in _LINK_RE.findall(_text(page)):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.is_file(), f"{page.name}: {target}"
            if anchor:
                assert anchor in _anchors(linked), f"{page.name}: {target}"


def test_no_page_speaks_of_the_project_s_issues() -> None:
    for page in PAGES:
        text = re.sub(r"<?https?://\S+", "", _text(page))
        text = text.replace("postmark.js issue #58", "")  # a thread in Postmark's own tracker
        assert not re.search(r"\bissues?\b", text, re.IGNORECASE), page.name


def test_every_variable_a_page_names_is_one_smsp_reads() -> None:
    settings = {row.env for row in smsp.all_settings()}
    files = {f"{row.env}_FILE" for row in smsp.all_settings() if row.secret}
    for page in PAGES:
        for name in set(re.findall(r"\bSMSP_[A-Z0-9_]*[A-Z0-9]\b", _text(page))):
            assert name in settings | files | OTHER_VARIABLES, f"{page.name}: {name}"


def test_readme_names_every_log_event_smsp_writes() -> None:
    events = set(re.findall(r"\.(?:debug|info|warning|error)\(\s*\"([a-z_]+)\"", SOURCE))
    events |= set(re.findall(r"Level\.[A-Z]+[^\"\n]*?\"([a-z_]+)\",", SOURCE))
    assert {"access", "failover", "poll_failed", "circuit_state_change",
            "log_lines_dropped"} <= events
    readme = _text(README)
    missing = {e for e in events if f'"event":"{e}"' not in readme and f"`{e}`" not in readme}
    assert not missing


def test_readme_names_every_reason_an_access_line_can_carry() -> None:
    reasons = set(re.findall(r"\breason=\"([a-z_]+)\"", SOURCE))
    reasons |= {failure.value for failure in smsp.Failure}
    readme = _text(README)
    assert not {r for r in reasons if f"`{r}`" not in readme}


def test_readme_names_every_metric_family() -> None:
    readme = _text(README)
    assert not {f.name for f in smsp.FAMILIES if f.name not in readme}


def test_the_status_table_covers_every_status_post_email_documents() -> None:
    operation = smsp.openapi_document(make_config())["paths"]["/email"]["post"]
    rows = [line for line in _text(README).splitlines() if re.match(r"\| \d{3}\b", line)]
    listed = {int(code) for row in rows for code in re.findall(r"\d{3}", row.split("|")[1])}
    assert {int(code) for code in operation["responses"]} <= listed


def test_every_make_target_a_page_names_exists() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.MULTILINE))
    for page in PAGES:
        for target in set(re.findall(r"`make ([a-z][a-z-]*)", _text(page))):
            assert target in targets, f"{page.name}: make {target}"


def test_the_idle_memory_figures_are_the_benchmark_s_everywhere() -> None:
    bench = _text(ROOT / "docs" / "benchmark.md")
    image = re.search(r"idle RSS as the image runs it[^|]*\| ([\d.]+) MB", bench)
    script = re.search(r"idle RSS as `python smsp.py`[^|]*\| ([\d.]+) MB", bench)
    assert image and script
    for page in PAGES:
        text = " ".join(_text(page).split())
        for figure in re.findall(r"([\d.]+) MB as the image runs it", text):
            assert figure == image.group(1), page.name
        for figure in re.findall(r"([\d.]+) MB as `python smsp.py`", text):
            assert figure == script.group(1), page.name
