"""The web pages in a real browser: headless Chromium (Debian's package, driven by
Playwright) against real `agora serve` and `agora worker` processes (docs/web.md).

One world per backend for the whole module: a tiny base and three experts that really help
their own domain (sums, dna, code; tests/helpers/forgetting_models.py), published with
datasheets whose samples are their domain's passages, and one worker that computes the
compositions and evaluations the pages ask for. The tests run in file order and share that
world: the datasheet test adds a fourth expert after the matrix test, and the last test
disables an expert.

The tests save a screenshot of each whole page into docs/screenshots/ (1280 wide; the
README shows two), and every browser context checks, as its test ends, that no page was a
server error, that nothing came from another origin, and that every page carried the
security headers.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import pytest
from helpers.artifacts import make_datasheet
from helpers.browser import Visitor, launch_chromium
from helpers.forgetting_models import DOMAINS, passages, train_world
from helpers.processes import Process, Processes, Registry, start_registry, start_worker, wait_until
from playwright.sync_api import Browser, expect

from registry.client import Agora
from registry.web.sessions import SESSION_COOKIE

pytestmark = pytest.mark.slow

NAMES = {"sums": "Sums expert", "dna": "DNA expert", "code": "Code expert"}
LICENSES = {"sums": "MIT", "dna": "CC0-1.0", "code": "Apache-2.0"}
DESCRIPTIONS = {
    "sums": "Sums of two numbers that add up, one per line.",
    "dna": "DNA sequences of five codons.",
    "code": "Short Python loops that print their variable.",
}
JOB_TIMEOUT_S = 120.0
# The JavaScript of the composition page fills in the result while the page is open.
LIVE_RESULT_TIMEOUT_MS = 90_000
FOUR_DECIMALS = re.compile(r"\d+\.\d{4}")
XSS_BODY = (
    "# Sums, with markup\n\n"
    "<script>window.__pwned = 1</script>\n\n"
    '<img src=x onerror="window.__pwned=2">\n\n'
    "[a link](javascript:window.__pwned=3)\n"
)


@dataclass
class World:
    registry: Registry
    procs: Processes
    worker: Process
    revision: str
    experts: dict[str, str]  # domain -> expert id
    weights: dict[str, Path]  # domain -> expert file
    heldout: dict[str, list[str]]
    tokens: dict[str, str]  # admin, contributor, moderator, worker

    @property
    def url(self) -> str:
        return self.registry.url

    def api(self, role: str | None = None) -> httpx.Client:
        return self.registry.http(self.tokens[role] if role else None)

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{text}" for name, text in self.procs.logs())

    @contextmanager
    def explained(self) -> Iterator[None]:
        """A failed wait on the worker says what the processes logged."""
        try:
            yield
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    def wait_for_jobs(self) -> None:
        """Until the queue is empty: nothing queued, nothing leased."""

        def idle() -> bool:
            with self.api("admin") as admin:
                for status in ("queued", "leased"):
                    answer = admin.get("/v1/jobs", params={"status": status})
                    assert answer.status_code == 200, answer.text
                    if answer.json()["items"]:
                        return False
            return True

        wait_until(idle, timeout=JOB_TIMEOUT_S, interval=0.5, message=self.logs)


@contextmanager
def _database(kind: str, request: pytest.FixtureRequest, directory: Path) -> Iterator[str]:
    """A database for this module's registry: a SQLite file, or a fresh PostgreSQL schema
    (first on the search path) next to ``AGORA_TEST_DATABASE_URL``'s database."""
    if kind == "sqlite":
        yield f"sqlite:///{directory / 'agora.db'}"
        return
    from conftest import temporary_postgres_schema

    with temporary_postgres_schema(request.getfixturevalue("postgres_admin_url")) as url:
        yield url


def _datasheet(domain: str, seed: int) -> bytes:
    """A datasheet such as a contributor writes, whose samples are the domain's passages
    (training-like ones; the searches use held-out passages)."""
    return make_datasheet(
        name=NAMES[domain],
        domain=DESCRIPTIONS[domain],
        license=LICENSES[domain],
        sources=[
            {
                "name": f"Synthetic {domain} generator",
                "description": "Passages drawn by tests/helpers/forgetting_models.py.",
            }
        ],
        collection="Generated from a fixed seed; 200 passages of six lines each.",
        token_count=24_000,
        pii_handling="None: the text is synthetic.",
        intended_uses=[f"Language modelling of {DESCRIPTIONS[domain].lower()}"],
        out_of_scope_uses=["Anything but the browser tests of the web pages"],
        contact="mailto:alice@example.org",
        samples=passages(domain, 12, seed=seed),
        tags=[domain, "synthetic"],
        body=(
            f"# {NAMES[domain]}\n\n"
            f"Trained by insertion on the tiny base: **{DESCRIPTIONS[domain].lower()}**\n\n"
            "| steps | learning rate |\n|---|---|\n| 40 | 0.01 |\n"
        ),
    )


def _publish(registry: Registry, trained: dict[str, Any], tokens: dict[str, str]) -> dict[str, str]:
    root = registry.data_dir.parent
    experts: dict[str, str] = {}
    with Agora(registry.url, token=tokens["admin"], cache_dir=root / "sdk") as admin:
        base = trained["base"]
        admin.upload_base_model(
            base / "config.json", base / "tokenizer.json", base / "model.safetensors"
        )
    with Agora(registry.url, token=tokens["contributor"], cache_dir=root / "sdk") as user:
        for i, domain in enumerate(DOMAINS):
            sheet = root / f"{domain}.md"
            sheet.write_bytes(_datasheet(domain, seed=100 + i))
            experts[domain] = user.submit_expert(
                trained["experts"][domain], sheet, trained["revision"]
            ).id
    return experts


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The base and the three experts, trained once for both backends (about 6 s)."""
    return train_world(tmp_path_factory.mktemp("web-models"))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    trained: dict[str, Any],
) -> Iterator[World]:
    """A registry on this backend with the published experts, and one worker."""
    root = tmp_path_factory.mktemp("web-browser")
    procs = Processes(root / "logs")
    with _database(request.param, request, root) as database_url:
        try:
            # Every page search comes from one address; the module runs about a dozen
            # within a minute, near the default burst of 10 (docs/web.md).
            registry = start_registry(
                procs,
                root / "data",
                database_url,
                settings={"AGORA_RATE_LIMIT_SEARCH_BURST": "100"},
            )
            tokens = {
                "admin": registry.create_token("admin", "root"),
                "contributor": registry.create_token("contributor", "alice"),
                "moderator": registry.create_token("moderator", "mona"),
                "worker": registry.create_token("worker", "w1"),
            }
            experts = _publish(registry, trained, tokens)
            worker = start_worker(procs, registry, tokens["worker"], name="w1")
            yield World(
                registry=registry,
                procs=procs,
                worker=worker,
                revision=trained["revision"],
                experts=experts,
                weights=trained["experts"],
                heldout=trained["heldout"],
                tokens=tokens,
            )
        finally:
            procs.stop_all()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with launch_chromium() as chromium:
        yield chromium


@pytest.fixture
def visit(world: World, browser: Browser) -> Iterator[Callable[..., Visitor]]:
    """``visit(role=None, next_path="/", javascript=True)``: a fresh browser context, signed
    in through the form as ``role`` (or signed out). Each checks, as the test ends, that
    its pages loaded nothing from another origin and carried the security headers."""
    opened: list[Visitor] = []

    def open_one(
        role: str | None = None, next_path: str = "/", *, javascript: bool = True
    ) -> Visitor:
        visitor = Visitor.open(browser, world.url, javascript=javascript)
        opened.append(visitor)
        if role is not None:
            visitor.sign_in(world.tokens[role], next_path)
        return visitor

    yield open_one
    try:
        with world.explained():
            for visitor in opened:
                visitor.check()
    finally:
        for visitor in opened:
            visitor.close()


def _search(visitor: Visitor, text: str) -> list[str]:
    """Search from the home page's form; the expert ids of the results, in rank order."""
    page = visitor.page
    visitor.goto("/")
    form = page.locator("form#search")
    form.locator("textarea[name=text]").fill(text)
    with page.expect_navigation():
        page.locator("#search-button").click()
    expect(page.locator("ol#results")).to_be_visible()
    return [
        str(r.get_attribute("data-expert-id")) for r in page.locator("ol#results > li.result").all()
    ]


def _counts(visitor: Visitor) -> dict[str, str]:
    """The live counts of the home page."""
    visitor.goto("/")
    names = ("base_revisions", "active_experts", "compositions", "workers_last_hour")
    return {
        name: visitor.page.locator(f"#counts .card[data-count={name}] .n").inner_text().strip()
        for name in (*names, "jobs_queued")
    }


def _number(text: str) -> str:
    found = FOUR_DECIMALS.findall(text)
    assert len(found) == 1, f"expected one number with 4 decimals in {text!r}"
    return str(found[0])


# -- search -----------------------------------------------------------------------------------


def test_search_from_home_lists_the_domain_expert_first(
    world: World, visit: Callable[..., Visitor]
) -> None:
    visitor = visit()
    page = visitor.page
    for domain in DOMAINS:
        ranked = _search(visitor, world.heldout[domain][0])
        assert ranked, f"no results for held-out {domain} text"
        assert ranked[0] == world.experts[domain], (domain, ranked, world.experts)
        # The newest (only) base is preselected, and the results link to their experts.
        assert page.locator("form#search select[name=base]").input_value() == world.revision
        first = page.locator("ol#results > li.result").first
        assert first.locator("a.expert-link").get_attribute("href") == (
            f"/experts/{world.experts[domain]}"
        )
        weights = [
            float(w.rstrip("%")) for w in page.locator("ol#results .weight").all_inner_texts()
        ]
        assert weights == sorted(weights, reverse=True), weights
        # Retrieval's weights are a softmax over the results: shares of 100%.
        assert all(0 <= w <= 100 for w in weights), weights
        assert abs(sum(weights) - 100) <= 0.1 * len(weights), weights
        assert first.locator("svg").count() >= 1, "no weight bar"
    # Signed out: results, but no compose button.
    assert page.locator("#compose-button").count() == 0
    # The counts the home page shows are the registry's.
    counts = _counts(visitor)
    assert (counts["base_revisions"], counts["active_experts"]) == ("1", "3"), counts
    _search(visitor, world.heldout["sums"][1])
    visitor.screenshot("home")


# -- compose ----------------------------------------------------------------------------------


def test_signed_in_contributor_composes_from_home_and_sees_the_result(
    world: World, visit: Callable[..., Visitor]
) -> None:
    visitor = visit("contributor")
    page = visitor.page
    ready_before = int(_counts(visitor)["compositions"])
    ranked = _search(visitor, world.heldout["dna"][2])
    assert ranked[0] == world.experts["dna"], ranked
    with page.expect_navigation():
        page.locator("#compose-button").click()
    match = re.fullmatch(re.escape(world.url) + r"/compositions/([^/?#]+)", page.url)
    assert match, f"compose did not lead to a composition page: {page.url}"
    composition_id = match.group(1)
    # The page's script shows the result once the worker has computed it.
    result = page.locator("#result-bpb")
    with world.explained():
        expect(result).to_have_text(FOUR_DECIMALS, timeout=LIVE_RESULT_TIMEOUT_MS)
    with world.api("contributor") as api:
        answer = api.get(f"/v1/compositions/{composition_id}")
    assert answer.status_code == 200, answer.text
    composition = answer.json()
    assert composition["status"] == "ready", composition
    metrics = composition["manifest"]["metrics"]
    assert _number(result.inner_text()) == f"{metrics['bits_per_byte']:.4f}"
    assert _number(page.locator("#result-base-bpb").inner_text()) == (
        f"{metrics['base_bits_per_byte']:.4f}"
    )
    # The domain's expert helps: the composition beats the base on the user's text.
    assert metrics["bits_per_byte"] < metrics["base_bits_per_byte"], metrics
    # The manifest: the experts retrieval chose, with their weights; the dna expert among them.
    rows = page.locator("table#composition-experts tbody tr[data-expert-id]")
    shown = {str(r.get_attribute("data-expert-id")) for r in rows.all()}
    assert shown == {e["id"] for e in composition["manifest"]["experts"]}, shown
    assert world.experts["dna"] in shown
    expect(page.locator("#composition")).to_have_attribute("data-status", "ready")
    assert "ensemble" in page.locator("#method").inner_text().lower()
    expect(page.locator("#job-status")).to_have_text("succeeded")
    visitor.screenshot("composition")
    # The home page counts it, and the worker that computed it.
    counts = _counts(visitor)
    assert int(counts["compositions"]) == ready_before + 1, counts
    assert counts["workers_last_hour"] == "1", counts


def test_pages_work_without_javascript_but_the_live_progress(
    world: World, visit: Callable[..., Visitor]
) -> None:
    """With JavaScript off: sign in, search, compose; the result shows on a reload."""
    visitor = visit("contributor", javascript=False)
    page = visitor.page
    ranked = _search(visitor, world.heldout["sums"][3])
    assert ranked[0] == world.experts["sums"], ranked
    with page.expect_navigation():
        page.locator("#compose-button").click()
    composition_path = urlsplit(page.url).path
    assert composition_path.startswith("/compositions/"), page.url
    world.wait_for_jobs()
    visitor.goto(composition_path)
    expect(page.locator("#composition")).to_have_attribute("data-status", "ready")
    with world.api("contributor") as api:
        composition = api.get(f"/v1{composition_path}").json()
    bpb = composition["manifest"]["metrics"]["bits_per_byte"]
    assert _number(page.locator("#result-bpb").inner_text()) == f"{bpb:.4f}"


def test_sign_out_ends_the_session_on_the_server(
    world: World, visit: Callable[..., Visitor]
) -> None:
    visitor = visit("moderator", "/moderation")
    page = visitor.page
    cookie = next(c for c in visitor.context.cookies() if c["name"] == SESSION_COOKIE)
    # A server-side session id in a strict, script-proof cookie; never the token.
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert world.tokens["moderator"] not in cookie["value"]
    with page.expect_navigation():
        page.locator('form[action="/sign-out"] button').click()
    expect(page.locator("#sign-in-link")).to_be_visible()
    # The old cookie, replayed by another browser, opens nothing.
    replay = visit()
    replay.context.add_cookies(
        [{"name": SESSION_COOKIE, "value": cookie["value"], "url": world.url}]
    )
    replay.goto("/moderation")
    assert urlsplit(replay.page.url).path == "/sign-in", replay.page.url
    expect(replay.page.locator("#sign-in-link")).to_be_visible()
    # Signed in, but not staff: the moderation page is refused.
    contributor = visit("contributor")
    assert contributor.goto("/moderation").status == 403
    expect(contributor.page.locator("#error-code")).to_be_visible()


# -- matrix -----------------------------------------------------------------------------------


def _newest_evaluations(world: World) -> dict[tuple[str, str], dict[str, Any]]:
    """(expert id, text set) -> the newest evaluation of the expert on it, from the API."""
    newest: dict[tuple[str, str], dict[str, Any]] = {}
    with world.api() as api:
        for expert_id in world.experts.values():
            answer = api.get(f"/v1/experts/{expert_id}/evaluations")
            assert answer.status_code == 200, answer.text
            # Newest first: the first of each text set wins.
            for row in answer.json()["items"]:
                newest.setdefault((expert_id, row["text_set"]), row)
    return newest


def test_matrix_shows_one_cell_per_expert_and_domain_with_its_value(
    world: World, visit: Callable[..., Visitor]
) -> None:
    visitor = visit("contributor", f"/matrix?base={world.revision}")
    page = visitor.page
    with page.expect_navigation():
        page.locator("#matrix-fill-button").click()
    world.wait_for_jobs()
    visitor.goto(f"/matrix?base={world.revision}")
    cells = page.locator("svg#matrix rect.cell")
    n = len(DOMAINS)
    assert cells.count() == n * n, page.locator("svg#matrix").inner_html()
    newest = _newest_evaluations(world)
    values: dict[tuple[str, str], float] = {}
    links: dict[tuple[str, str], str] = {}
    for cell in cells.all():
        key = (str(cell.get_attribute("data-expert-id")), str(cell.get_attribute("data-text-set")))
        assert key not in values, f"two cells for {key}"
        assert key in newest, f"a cell without an evaluation behind it: {key}"
        value = f"{newest[key]['bits_per_byte']:.4f}"
        values[key] = float(str(cell.get_attribute("data-value")))
        assert f"{values[key]:.4f}" == value, key
        cell.hover()
        assert value in str(cell.locator("title").text_content()), key
        link = cell.locator("xpath=ancestor::*[local-name()='a'][1]")
        links[key] = str(link.get_attribute("href"))
    # Rows are the experts, columns their domains (each expert's datasheet samples).
    ids = set(world.experts.values())
    assert set(values) == {(e, d) for e in ids for d in ids}, sorted(values)
    # What the matrix is for: each expert is best on its own domain.
    for domain in ids:
        column = {e: v for (e, d), v in values.items() if d == domain}
        assert min(column, key=column.__getitem__) == domain, column
    expect(page.locator("#matrix-legend")).to_be_visible()
    page.mouse.move(0, 0)
    visitor.screenshot("matrix")
    # A cell links to the evaluation behind it, on its expert's page.
    key = (world.experts["dna"], world.experts["code"])
    evaluation = newest[key]
    assert links[key] == f"/experts/{key[0]}#evaluation-{evaluation['id']}", links[key]
    visitor.goto(links[key])
    expect(page.locator(f"#evaluation-{evaluation['id']}")).to_contain_text(
        f"{evaluation['bits_per_byte']:.4f}"
    )


# -- experts ----------------------------------------------------------------------------------


def test_expert_list_and_page_show_the_published_experts(
    world: World, visit: Callable[..., Visitor]
) -> None:
    visitor = visit()
    page = visitor.page
    visitor.goto("/experts")
    listed = {
        str(r.get_attribute("data-expert-id"))
        for r in page.locator("table#experts tbody tr[data-expert-id]").all()
    }
    assert listed == set(world.experts.values()), listed
    visitor.screenshot("experts")
    expert_id = world.experts["sums"]
    page.locator(f'table#experts tr[data-expert-id="{expert_id}"] a').first.click()
    page.wait_for_url(visitor.url(f"/experts/{expert_id}"))
    expect(page.locator("h1#expert-name")).to_have_text(NAMES["sums"])
    with world.api() as api:
        expert = api.get(f"/v1/experts/{expert_id}").json()
    digest = expert["versions"][-1]["digest"]
    assert digest[:12] in page.locator("table#versions").inner_text()
    download = page.locator("a#download").get_attribute("href")
    assert download, "no download link"
    with world.api() as api:
        assert api.get(download, follow_redirects=True).status_code == 200
    visitor.screenshot("expert")


def test_datasheet_with_script_renders_inert(world: World, visit: Callable[..., Visitor]) -> None:
    root = world.registry.data_dir.parent
    sheet = root / "xss.md"
    sheet.write_bytes(
        make_datasheet(
            name="Sums with markup",
            domain=DESCRIPTIONS["sums"],
            license="MIT",
            samples=["12 + 30 = 42\n"],
            body=XSS_BODY,
        )
    )
    with Agora(world.url, token=world.tokens["contributor"], cache_dir=root / "sdk") as user:
        expert_id = user.submit_expert(world.weights["sums"], sheet, world.revision).id
    visitor = visit()
    page = visitor.page
    visitor.goto(f"/experts/{expert_id}")
    datasheet = page.locator("#datasheet")
    expect(datasheet).to_contain_text("<script>window.__pwned = 1</script>")
    expect(datasheet).to_contain_text('<img src=x onerror="window.__pwned=2">')
    assert datasheet.locator("script, img, iframe, [onerror]").count() == 0, datasheet.inner_html()
    assert datasheet.locator("a[href^='javascript:']").count() == 0, datasheet.inner_html()
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert visitor.page_errors == [], visitor.page_errors


# -- security ---------------------------------------------------------------------------------


def test_every_page_carries_security_headers_and_loads_nothing_from_elsewhere(
    world: World, visit: Callable[..., Visitor]
) -> None:
    """The checks of ``visit`` (each page's headers, every request to this origin), over
    every page, signed out and as a moderator."""
    with world.api("contributor") as api:
        queued = api.post(
            "/v1/compositions",
            json={
                "method": "ensemble",
                "base_revision": world.revision,
                "texts": world.heldout["code"][:1],
                "k": 2,
            },
        )
    assert queued.status_code == 202, queued.text
    composition_id = queued.json()["composition_id"]
    anonymous = visit()
    pages = [
        "/",
        "/?" + urlencode({"text": world.heldout["code"][0], "base": world.revision}),
        "/experts",
        f"/experts/{world.experts['code']}",
        f"/matrix?base={world.revision}",
        f"/compositions/{composition_id}",
        "/sign-in",
        "/experts/ex_doesnotexist",
    ]
    for path in pages:
        anonymous.goto(path)
    anonymous.check()
    staff = visit("moderator", "/moderation")
    for path in [*pages, "/moderation"]:
        staff.goto(path)
    staff.check()
    assert len(anonymous.documents) >= len(pages)


def test_form_post_without_csrf_token_is_refused(
    world: World, visit: Callable[..., Visitor]
) -> None:
    visitor = visit("moderator", "/moderation")
    page = visitor.page
    expert_id = world.experts["dna"]
    for tamper in (
        "document.querySelector('form#moderate input[name=csrf_token]').remove()",
        "document.querySelector('form#moderate input[name=csrf_token]').value = 'forged'",
    ):
        visitor.goto("/moderation")
        form = page.locator("form#moderate")
        form.locator("input[name=expert_id]").fill(expert_id)
        form.locator("select[name=action]").select_option("disable")
        form.locator("input[name=reason]").fill("no token, no action")
        page.evaluate(tamper)
        with page.expect_navigation() as navigation:
            page.locator("#moderate-button").click()
        response = navigation.value
        assert response is not None
        assert response.status == 403, tamper
        expect(page.locator("#error-code")).to_have_text("csrf_failed")
    with world.api() as api:
        assert api.get(f"/v1/experts/{expert_id}").json()["status"] == "active"
    # The sign-in form too (against login CSRF): without its token, no session.
    anonymous = visit()
    anonymous.goto("/sign-in")
    anonymous.page.locator("form#sign-in input[name=token]").fill(world.tokens["moderator"])
    anonymous.page.evaluate(
        "document.querySelector('form#sign-in input[name=csrf_token]').remove()"
    )
    with anonymous.page.expect_navigation() as navigation:
        anonymous.page.locator("form#sign-in button").first.click()
    assert navigation.value is not None
    assert navigation.value.status == 403
    expect(anonymous.page.locator("#error-code")).to_have_text("csrf_failed")
    expect(anonymous.page.locator("#sign-in-link")).to_be_visible()


# -- moderation (last: it disables an expert) -------------------------------------------------


def test_moderator_disables_an_expert_and_it_disappears_for_everyone_else(
    world: World, visit: Callable[..., Visitor]
) -> None:
    expert_id = world.experts["code"]
    reason = f"browser test {uuid.uuid4().hex[:6]}: copied weights"
    anonymous = visit()
    assert _search(anonymous, world.heldout["code"][0])[0] == expert_id
    moderator = visit("moderator", "/moderation")
    page = moderator.page
    form = page.locator("form#moderate")
    form.locator("input[name=expert_id]").fill(expert_id)
    form.locator("select[name=action]").select_option("disable")
    form.locator("input[name=reason]").fill(reason)
    with page.expect_navigation():
        page.locator("#moderate-button").click()
    with world.api() as api:
        assert api.get(f"/v1/experts/{expert_id}").json()["status"] == "disabled"

    # Signed out: not in the list, its page is a 404 page, and search no longer finds it.
    anonymous.goto("/experts")
    listed = anonymous.page.locator("table#experts tbody tr[data-expert-id]").all()
    assert expert_id not in {r.get_attribute("data-expert-id") for r in listed}
    assert anonymous.goto(f"/experts/{expert_id}").status == 404
    expect(anonymous.page.locator("#error-code")).to_have_text("expert_not_found")
    assert expert_id not in _search(anonymous, world.heldout["code"][0])

    # The moderator still sees it, as disabled; the audit log has the entry, and verifies.
    moderator.goto(f"/experts/{expert_id}")
    expect(page.locator("#expert-status")).to_contain_text("disabled")
    moderator.goto("/moderation")
    entries = page.locator("#audit tr.audit-entry").filter(has_text="expert.disable")
    entries = entries.filter(has_text=reason)
    assert entries.count() == 1, page.locator("#audit").inner_text()
    assert expert_id in entries.first.inner_text()
    verify = page.locator("#audit-verify")
    expect(verify).to_contain_text("verified")
    expect(verify).to_have_class(re.compile(r"\bok\b"))
    assert expert_id in page.locator("#withdrawn").inner_text()
    page.locator("#audit").evaluate("section => section.scrollIntoView()")
    moderator.screenshot("moderation")
