"""The search page's states in a real browser (Playwright driving Debian's Chromium): a slow or
failed request never changes what is shown, the page works by keyboard and on a phone, the URL
holds a text search, errors say what went wrong, the API key form works.

One server per module, with an API key (pages get it in localStorage, as the key form leaves
it), over an index of 30 random images whose captions are "photo N" — one of 10 000 characters,
one of HTML markup, and one whose file is deleted after indexing. The tiny model is untrained:
only the page's behaviour is tested, not the ranking."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.ports import free_port
from tests.serve_helpers import build, save_tiny_model, start_server, wait_until_up
from tests.test_serve_browser import CHROMIUM, CHROMIUM_ARGS

sync_api = pytest.importorskip("playwright.sync_api")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                                   reason="Debian's chromium is not installed")]

KEY = "s3cret+k&y#%41"  # its image URLs must encode it: unencoded, the server reads "s3cret k"
N = 30
LONG_CAPTION = ("long " * 2000).strip()
GONE = "gone image"
MARKUP = '<img src=x onerror="window.pwned=1"><b>bold</b>'  # a caption: text, never HTML


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N):
        pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"p{i:02d}.png")
        (photos / f"p{i:02d}.txt").write_text(f"photo {i}")
    (photos / "p00.txt").write_text(LONG_CAPTION)
    (photos / "p01.txt").write_text(GONE)
    (photos / "p02.txt").write_text(MARKUP)
    build(save_tiny_model(root / "model"), str(photos), root / "idx")
    files = root / "files"
    files.mkdir()
    (photos / "p01.png").rename(files / "p01.png")  # indexed, then gone
    (files / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 50)
    (files / "p07_noext").write_bytes((photos / "p07.png").read_bytes())
    (files / "big.png").write_bytes(b"\x89PNG" + bytes(12 << 20))

    port = free_port()
    server = start_server(root / "idx", port, "--api-key", KEY)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_up(url, server)
        with urllib.request.urlopen(url) as response:  # which page is served (for a check by hand)
            (root / "served.html").write_bytes(response.read())
        ask = urllib.request.Request(url + "api/search?q=photo&k=100", headers={"X-API-Key": KEY})
        with urllib.request.urlopen(ask) as response:
            gone = next(r["id"] for r in json.load(response)["results"] if r["caption"] == GONE)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            yield {"url": url, "browser": browser, "photos": photos, "files": files,
                   "gone": re.compile(rf"status of 404 .*/images/{gone}(/thumbnail)?(\?|\)|$)"),
                   "contexts": []}
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(autouse=True)
def close_pages(site):
    yield
    while site["contexts"]:
        site["contexts"].pop().close()


def open_page(site, key: str | None = KEY, init: str | None = None, **context):
    """A page in a fresh context, loaded; its ``problems`` are page errors and console errors
    (the gone image's own 404 is expected and left out)."""
    # the page's CSP forbids eval, which Playwright's string predicates use; test_serve_browser
    # drives the page under its CSP
    ctx = site["browser"].new_context(bypass_csp=True, **context)
    site["contexts"].append(ctx)
    if key:
        ctx.add_init_script(f"localStorage.setItem('cliplab-api-key', {json.dumps(key)})")
    if init:
        ctx.add_init_script(init)
    page = ctx.new_page()
    page.set_default_timeout(20_000)
    problems = []
    page.on("pageerror", lambda err: problems.append(f"pageerror: {err}"))

    def console(message):
        text = f"console: {message.text} ({message.location.get('url', '')})"
        if message.type == "error" and not site["gone"].search(text):
            problems.append(text)

    page.on("console", console)
    page.goto(site["url"])
    page.wait_for_function("document.getElementById('info').textContent !== 'loading…'")
    return page, problems


def search(page, q: str, k: str | None = None) -> None:
    if k:
        page.select_option("#k", k)
    page.fill("#q", q)
    page.press("#q", "Enter")
    page.wait_for_selector(f"#status:has-text('results for “{q}”')")


def status(page) -> tuple[str, str]:
    return page.eval_on_selector("#status", "e => [e.className, e.textContent]")


def scores(page) -> list[str]:
    return page.locator("#grid .card .score").all_inner_texts()


def wait_error(page) -> str:
    page.wait_for_selector("#status.error")
    return page.text_content("#status")


def card_of(page, caption: str):
    return page.locator("#grid .card", has=page.locator(".caption", has_text=caption)).first


def hold(test: str) -> str:
    """An init script: fetches for which the JS expression ``test`` (of ``url``, ``options``)
    holds wait for ``window.held[i]()`` while ``window.holding`` (``release()`` lets them all
    go, and later ones through); ``window.settled`` counts the held ones the page has read (its
    json or blob), ``window.calls`` lists every fetch's URL."""
    return """(() => {
  const real = window.fetch;
  window.held = []; window.settled = 0; window.calls = []; window.holding = true;
  window.release = () => { window.holding = false; window.held.forEach((go) => go()); };
  const done = () => setTimeout(() => window.settled++);  // after the page's own handling
  window.fetch = (url, options) => {
    window.calls.push(String(url));
    if (!(%s)) return real(url, options);
    const wait = window.holding ? new Promise((go) => window.held.push(go)) : Promise.resolve();
    return wait.then(() => real(url, options)).then(
      (response) => {
        for (const read of ["json", "blob"]) {
          const real = response[read].bind(response);
          response[read] = () => real().finally(done);
        }
        return response;
      },
      (err) => { done(); throw err; });
  };
})();""" % test


HOLD_SLOW = hold("String(url).includes('q=slow')")  # a search for "slow" waits


def test_a_slow_reply_never_replaces_a_newer_search(site):
    page, problems = open_page(site, init=HOLD_SLOW)
    page.select_option("#k", "12")
    page.fill("#q", "slow")
    page.press("#q", "Enter")
    page.wait_for_function("window.held.length === 1")
    busy = page.get_attribute("#grid", "aria-busy")
    search(page, "photo")
    newest = scores(page)
    page.evaluate("window.held[0]()")  # the "slow" reply comes last
    page.wait_for_function("window.settled === 1")
    assert scores(page) == newest
    assert status(page)[1].startswith("12 results for “photo”")
    assert busy == "true" and page.get_attribute("#grid", "aria-busy") == "false"
    assert problems == []


def test_a_search_arriving_keeps_what_was_typed_meanwhile(site):
    """Text typed into the box while a search is on its way stays when its results arrive
    (they reset the box to their own query, erasing it, and a quick Enter then searched the
    old query); a box left alone shows the query its results are for."""
    page, problems = open_page(site, init=HOLD_SLOW)
    page.fill("#q", "slow")
    page.press("#q", "Enter")
    page.wait_for_function("window.held.length === 1")
    page.fill("#q", "photo 4")
    page.evaluate("window.release()")  # this reply, and the later ones (Back's below)
    page.wait_for_selector("#status:has-text('results for “slow”')")
    assert page.input_value("#q") == "photo 4"
    page.press("#q", "Enter")
    page.wait_for_selector("#status:has-text('results for “photo 4”')")
    page.go_back()
    page.wait_for_selector("#status:has-text('results for “slow”')")
    assert page.input_value("#q") == "slow"
    assert problems == []


def test_paging_waits_for_the_page_asked_for(site):
    """While Next's page is on its way, Previous and Next are disabled (a second click paged
    from the page still shown: two clicks moved one page); they follow the new page after."""
    page, problems = open_page(site, init=hold("String(url).includes('offset=12')"))
    requests = []
    page.on("request", lambda r: "/api/search" in r.url and requests.append(r.url))
    search(page, "photo", k="12")
    page.click("#next")
    page.wait_for_function("window.held.length === 1")
    pager = "['prev', 'next'].map((id) => document.getElementById(id).disabled)"
    in_flight = page.evaluate(pager)
    page.evaluate("document.getElementById('next').click()")  # a second click: ignored
    page.evaluate("window.held[0]()")
    page.wait_for_selector("#page-info:has-text('page 2 · results 13–24')")
    assert in_flight == [True, True] and page.evaluate(pager) == [False, False]
    assert sum("offset=12" in url for url in requests) == 1
    assert problems == []


def test_failed_requests_change_nothing(site):
    page, problems = open_page(site)
    search(page, "photo", k="12")
    first = scores(page)
    page.route("**/api/**", lambda route: route.abort())
    page.click("#next")
    offline = wait_error(page)
    stale = page.eval_on_selector("#grid", "e => e.classList.contains('stale')")
    page.click("#next")
    wait_error(page)
    assert page.text_content("#page-info").startswith("page 1 ") and scores(page) == first
    page.unroute("**/api/**")
    page.click("#next")
    page.wait_for_selector("#status:has-text('results for “photo”')")
    assert page.text_content("#page-info").startswith("page 2 · results 13–24")
    assert offline == "Cannot reach the server — is cliplab serve running?" and stale
    assert not page.eval_on_selector("#grid", "e => e.classList.contains('stale')")

    # the server unreachable while labelling, or for "similar"
    page.route("**/api/**", lambda route: route.abort())
    page.fill("#labels", "a, b")
    page.click("#label-btn")
    assert wait_error(page) == offline
    page.click("#grid .card >> nth=0 >> text=similar")
    assert wait_error(page) == offline
    assert page.text_content("#page-info").startswith("page 2 ")
    page.unroute("**/api/**")
    assert [p for p in problems if p.startswith("pageerror")] == []


def test_a_fresh_page_has_no_pager_and_paging_does_nothing(site):
    page, problems = open_page(site)
    requests = []
    page.on("request", lambda r: "/api/search" in r.url and requests.append(r.url))
    assert not page.is_visible("#pager") and not page.is_visible("#preview")
    before = status(page)
    page.evaluate("['next', 'prev'].forEach((id) => document.getElementById(id).click())")
    page.evaluate("() => new Promise((done) => setTimeout(done))")
    assert requests == [] and status(page) == before
    assert problems == []  # no /favicon.ico 404 either


def test_results_per_page_apply_to_the_page_shown(site):
    page, problems = open_page(site)
    search(page, "photo", k="12")
    page.select_option("#k", "24")  # shown at once, so Next pages by what the select says
    page.wait_for_selector("#page-info:has-text('results 1–24')")
    page.click("#next")
    page.wait_for_selector("#page-info:has-text('page 2 · results 25–30')")
    assert len(scores(page)) == N - 24
    assert problems == []


def test_a_rejected_upload_keeps_the_search_shown(site):
    page, problems = open_page(site)
    page.select_option("#k", "12")
    page.set_input_files("#file", str(site["photos"] / "p05.png"))
    page.wait_for_selector("#status:has-text('results for the uploaded image')")
    first, preview = scores(page), page.get_attribute("#preview", "src")
    assert page.is_visible("#preview")

    page.set_input_files("#file", str(site["files"] / "corrupt.png"))
    refused = wait_error(page)
    assert scores(page) == first and page.get_attribute("#preview", "src") == preview
    page.click("#next")  # pages the search shown, with its image
    page.wait_for_selector("#status:has-text('results for the uploaded image p05.png')")
    assert page.text_content("#page-info").startswith("page 2 ")
    assert refused.startswith("corrupt.png is not an image in a format cliplab reads")
    page.fill("#labels", "red, blue")
    page.click("#label-btn")
    page.wait_for_selector("#status:has-text('labelled 12 images and the uploaded one')")
    assert page.locator("#upload-labels li").count() == 2

    # too big for the server: refused before sending, named in MB
    page.set_input_files("#file", str(site["files"] / "big.png"))
    assert wait_error(page) == "big.png is 12 MB, over this server's 10 MB upload limit"
    # a PNG without an extension is the server's to judge (it reads it)
    page.set_input_files("#file", str(site["files"] / "p07_noext"))
    page.wait_for_selector("#status:has-text('results for the uploaded image p07_noext')")
    assert page.locator("#grid .card .caption").first.inner_text() == "photo 7"
    # a text search drops the upload's preview and labels
    search(page, "photo")
    assert not page.is_visible("#preview") and page.locator("#upload-labels li").count() == 0
    assert [p for p in problems if "status of 415" not in p] == []  # the corrupt file's


def test_the_keyboard_reaches_the_upload_and_similar(site):
    page, problems = open_page(site)
    search(page, "photo", k="12")
    page.focus("#search-btn")
    reached = []
    for _ in range(40):
        page.keyboard.press("Tab")
        reached.append(page.evaluate("(e => e.id || e.className)(document.activeElement)"))
        if reached[-1] == "file":
            break
    assert reached.count("similar") == 12 and reached[-1] == "file", reached
    # a focused file input opens the chooser on Space/Enter (the browser's own behaviour; its
    # file-chooser event is not awaited here: under load headless Chromium may drop it)
    page.set_input_files("#file", str(site["photos"] / "p03.png"))
    page.wait_for_selector("#status:has-text('the uploaded image p03.png')")
    unlabelled = page.evaluate("['q', 'k', 'labels', 'template', 'api-key', 'file']"
                               ".filter(id => !document.getElementById(id).labels.length)")
    assert unlabelled == []
    assert problems == []


def test_a_phone_screen_does_not_scroll_sideways(site):
    page, problems = open_page(site, viewport={"width": 375, "height": 740})
    width = "document.documentElement.scrollWidth"
    assert page.evaluate(width) == 375
    assert page.eval_on_selector("#search-btn", "e => e.getBoundingClientRect().right") <= 375
    search(page, "photo", k="48")
    assert page.evaluate(width) == 375
    # a 10 000-character caption is clamped; its full text is the title
    caption = card_of(page, "long long").locator(".caption")
    assert caption.get_attribute("title") == LONG_CAPTION
    assert caption.evaluate("e => e.getBoundingClientRect().height") < 80
    assert problems == []


def test_the_url_holds_the_text_search(site):
    page, problems = open_page(site)
    home = page.url
    search(page, "photo", k="12")
    assert page.url == home + "?q=photo&k=12&offset=0"
    first = scores(page)
    page.click("#next")
    page.wait_for_selector("#page-info:has-text('page 2')")
    assert page.url == home + "?q=photo&k=12&offset=12"
    second = scores(page)
    page.reload()
    page.wait_for_selector("#page-info:has-text('page 2')")
    assert scores(page) == second and page.input_value("#q") == "photo"
    assert page.input_value("#k") == "12"
    page.go_back()
    page.wait_for_selector("#page-info:has-text('page 1')")
    assert scores(page) == first and page.url.endswith("offset=0")
    page.go_back()
    page.wait_for_function("!document.querySelector('#grid .card')")
    assert page.url == home and not page.is_visible("#pager")
    page.go_forward()
    page.wait_for_selector("#page-info:has-text('page 1')")
    assert scores(page) == first
    # an image search cannot be a URL: it leaves none behind that would reload another search
    page.set_input_files("#file", str(site["photos"] / "p05.png"))
    page.wait_for_selector("#status:has-text('the uploaded image')")
    assert page.url == home
    assert problems == []


def test_images_that_cannot_load_say_why(site):
    """A card whose file is gone shows a named placeholder; "similar" still works for it (the
    index keeps its embedding: nothing is downloaded), naming the image it started from."""
    page, problems = open_page(site)
    search(page, "photo", k="48")
    gone = card_of(page, GONE)
    gone.scroll_into_view_if_needed()
    missing = gone.locator(".missing")
    missing.wait_for()  # a placeholder, not a broken image
    gone_id = gone.get_attribute("data-id")
    assert missing.get_attribute("role") == "img"
    assert missing.get_attribute("aria-label") == f"image #{gone_id} unavailable"
    gone.locator("text=similar").click()
    page.wait_for_selector(f"#status:has-text('results for images similar to #{gone_id} "
                           f"“{GONE}”')")
    assert page.locator("#grid .card").first.get_attribute("data-id") == gone_id
    card = card_of(page, "photo 3")
    card_id = card.get_attribute("data-id")
    card.locator("text=similar").click()
    page.wait_for_selector(f"#status:has-text('results for images similar to #{card_id} "
                           "“photo 3”')")
    assert page.locator("#grid .card").first.get_attribute("data-id") == card_id
    assert not any("/api/search/image" in url for url in page.evaluate(
        "performance.getEntriesByType('resource').map((e) => e.name)"))
    assert problems == []


def test_a_thumbnail_the_busy_server_refused_is_asked_again(site):
    """Past its line of decodes the server answers a thumbnail 503: the card showed "image
    unavailable" for good. It asks again, a little later, and shows the image."""
    page, problems = open_page(site)
    refused = []

    def busy_once(route):
        if route.request.url.split("?")[0] not in refused:
            refused.append(route.request.url.split("?")[0])
            return route.fulfill(status=503, content_type="application/json",
                                 body='{"error": "the server is busy decoding other images"}')
        return route.continue_()

    page.route("**/images/*/thumbnail*", busy_once)
    search(page, "photo 3")
    card = card_of(page, "photo 3")
    page.wait_for_function("(card) => { const img = card.querySelector('img');"
                           " return img && img.complete && img.naturalWidth > 0; }",
                           arg=card.element_handle())
    assert card.locator(".missing").count() == 0 and refused
    assert [p for p in problems if "status of 503" not in p] == []


def test_the_api_key_form(site):
    page, problems = open_page(site, key=None)
    assert page.is_visible("#key-section")
    needed = wait_error(page)
    page.fill("#q", "photo")
    page.press("#q", "Enter")
    page.wait_for_selector("#status.error")
    page.fill("#api-key", "wrong")
    page.press("#api-key", "Enter")  # Enter submits the key
    page.wait_for_selector("#status:has-text('The API key was refused')")
    page.fill("#api-key", "clé-€")
    page.press("#api-key", "Enter")
    page.wait_for_selector("#status.error:has-text('An API key can only hold ISO-8859-1')")
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")  # the search that was refused runs again
    page.wait_for_selector("#status:has-text('results for “photo”')")
    assert status(page)[0] == "" and not page.is_visible("#key-section")
    # the hidden form held the focus: the search box takes it, not the page's start
    assert page.evaluate("document.activeElement.id") == "q"
    assert page.text_content("#info").startswith(f"{N} images")
    assert needed == "This server needs an API key: enter it under “API key”"
    page.reload()  # the key is remembered
    page.wait_for_selector(f"#info:has-text('{N} images')")
    assert [p for p in problems if "status of 401" not in p] == []


CLASSIFY = "String(url).includes('/api/classify')"


def labels(page) -> list[str]:
    """The cards' labels as shown (a chip starts with "label: " for a screen reader only;
    an unlabelled card's is empty)."""
    said = page.locator("#grid .card .label").all_text_contents()
    assert all(text.startswith("label: ") or not text for text in said), said
    return [text.removeprefix("label: ") for text in said]


def labelling_held(site):
    """A page showing 2 results for "photo", labelling them red or blue, its first classify
    request held; returns ``(page, problems)``."""
    page, problems = open_page(site, init=hold(CLASSIFY))
    page.goto(site["url"] + "?q=photo&k=2&offset=0")
    page.wait_for_selector("#status:has-text('2 results for “photo”')")
    page.fill("#labels", "red, blue")
    page.click("#label-btn")
    page.wait_for_function("window.held.length === 1")
    return page, problems


def test_labelling_disables_its_button_and_sends_the_template(site):
    """Label is disabled while labelling, and again usable after; a card's label
    is "name NN%" with the best of two ≥ 50%; the template is sent (a bad one is refused)."""
    page, problems = labelling_held(site)
    busy = status(page), page.is_disabled("#label-btn")
    page.evaluate("window.release()")
    page.wait_for_selector("#status:has-text('labelled 2 images')")
    assert busy == (["", "labelling…"], True)
    assert page.is_enabled("#label-btn")
    shown = labels(page)
    assert len(shown) == 2, shown
    for text in shown:
        name, percent = re.fullmatch(r"(.+) (\d{1,3})%", text).groups()
        assert name in ("red", "blue") and 50 <= int(percent) <= 100, shown

    page.fill("#template", "a photo")  # no {}: the server refuses it, so it was sent
    page.click("#label-btn")
    page.wait_for_function("document.getElementById('status').textContent !== 'labelling…'")
    refused = status(page)[1]
    assert refused.startswith("template 'a photo': give a prompt with exactly one {} where the "
                              "label goes"), refused
    assert page.is_enabled("#label-btn") and labels(page) == shown
    assert [p for p in problems if "status of 422" not in p] == []


def test_labelling_asks_once_for_every_card_shown(site):
    """One /api/classify/ids request labels all 24 cards (it was one request per card, 96 at
    k=96), each card the label of its own id."""
    page, problems = open_page(site)
    search(page, "photo", k="24")
    sent = []
    page.on("request", lambda r: sent.append(r) if "/api/classify" in r.url else None)
    page.fill("#labels", "red, blue, green")
    page.click("#label-btn")
    page.wait_for_selector("#status:has-text('labelled 24 images')")
    assert [r.url.split("/api/")[1] for r in sent] == ["classify/ids"]
    ids = page.eval_on_selector_all("#grid .card", "cards => cards.map((c) => c.dataset.id)")
    asked = {"labels": "red, blue, green", "ids": ",".join(ids), "template": "a photo of a {}."}
    answer = page.evaluate("""async (asked) => {
        const form = new FormData();
        for (const [k, v] of Object.entries(asked)) form.append(k, v);
        const r = await fetch("/api/classify/ids", {method: "POST", body: form,
            headers: {"X-API-Key": localStorage.getItem("cliplab-api-key")}});
        return (await r.json()).results.map(({id, labels: [best]}) =>
            [String(id), `${best.label} ${(100 * best.probability).toFixed(0)}%`]);
    }""", asked)
    assert [i for i, _ in answer] == ids and labels(page) == [text for _, text in answer]
    assert problems == []


def test_the_drop_zone_stays_lit_over_its_own_preview(site):
    """Dragging from the drop zone onto its preview image keeps the highlight (it flickered
    off and on); leaving the zone for the page turns it off."""
    page, problems = open_page(site)
    lit = page.evaluate("""() => {
        const drop = document.getElementById("drop"), preview = document.getElementById("preview");
        const fire = (type, relatedTarget) => drop.dispatchEvent(
            new DragEvent(type, {bubbles: true, cancelable: true, relatedTarget}));
        fire("dragover", null);
        const seen = [drop.classList.contains("over")];
        fire("dragleave", preview);  // onto its own preview image
        seen.push(drop.classList.contains("over"));
        fire("dragleave", document.body);  // off the zone
        seen.push(drop.classList.contains("over"));
        return seen;
    }""")
    assert lit == [True, True, False]
    assert problems == []


def test_the_pager_at_the_last_page_and_past_it(site):
    """An exactly full last page has no Next; a page past the end shows the pager,
    "no results", and a Previous that goes back to the last page."""
    page, problems = open_page(site)
    page.goto(site["url"] + "?q=photo&k=10&offset=20")
    page.wait_for_selector("#status:has-text('10 results for “photo”')")
    assert page.text_content("#page-info") == "page 3 · results 21–30"
    assert page.is_disabled("#next") and page.is_enabled("#prev")

    page.goto(site["url"] + "?q=photo&k=12&offset=36")
    page.wait_for_selector("#status:has-text('0 results for “photo”')")
    assert page.is_visible("#pager") and page.text_content("#page-info") == "page 4 · no results"
    assert page.is_disabled("#next") and page.is_enabled("#prev")
    page.click("#prev")
    page.wait_for_selector("#page-info:has-text('page 3 · results 25–30')")
    assert page.url.endswith("?q=photo&k=12&offset=24") and len(scores(page)) == N - 24
    assert problems == []


def test_previous_and_results_per_page_on_page_two(site):
    """Previous goes back exactly one page; a new k on page 2 starts at its page 1."""
    page, problems = open_page(site)
    search(page, "photo", k="12")
    first = scores(page)
    page.click("#next")
    page.wait_for_selector("#page-info:has-text('page 2 · results 13–24')")
    page.click("#prev")
    page.wait_for_selector("#page-info:has-text('page 1')")
    assert page.text_content("#page-info") == "page 1 · results 1–12"
    assert scores(page) == first and page.url.endswith("?q=photo&k=12&offset=0")

    page.click("#next")
    page.wait_for_selector("#page-info:has-text('page 2 · results 13–24')")
    page.select_option("#k", "24")
    page.wait_for_selector("#status:has-text('results for “photo”')")
    assert page.text_content("#page-info") == "page 1 · results 1–24"
    assert page.url.endswith("?q=photo&k=24&offset=0")
    assert problems == []


def test_the_query_and_the_key_are_encoded(site):
    """The query's own & # + reach the server as typed; image URLs carry the key
    encoded (its + & # % would cut or change it: every thumbnail a 401)."""
    page, problems = open_page(site, viewport={"width": 1280, "height": 3000})
    sent = []
    page.on("request", lambda r: "/api/search" in r.url and sent.append(r.url))
    query = "photo #3 & +x"
    search(page, query, k="48")
    from urllib.parse import parse_qs, urlsplit

    assert len(sent) == 1 and parse_qs(urlsplit(sent[0]).query)["q"] == [query], sent
    assert page.input_value("#q") == query
    page.wait_for_selector("#grid .missing")  # the gone image's, once its retries fail
    page.wait_for_function("[...document.querySelectorAll('#grid .card img')]"
                           ".every((img) => img.complete)")
    assert page.locator("#grid .card img").count() == N - 1  # all but the gone image's
    assert page.eval_on_selector_all("#grid .card img", "imgs => imgs.filter("
                                     "(img) => !img.naturalWidth).length") == 0
    assert problems == []


def test_captions_and_labels_are_text_not_html(site):
    """Markup in a caption or a label is shown as written, never run. The caption is
    printed, so a screen reader reads it once: the image's alt is empty and its link and
    "similar" name the image (the 10 000-character caption shortened)."""
    page, problems = open_page(site)
    search(page, "photo", k="48")
    caption = card_of(page, "bold").locator(".caption")
    assert caption.inner_text() == MARKUP and caption.get_attribute("title") == MARKUP
    assert page.locator("#grid b, #grid .caption img").count() == 0
    names = page.eval_on_selector_all(
        "#grid .card", "cards => cards.map((c) => [c.dataset.id, c.querySelector('a.open')"
        ".getAttribute('aria-label'), c.querySelector('.similar').getAttribute('aria-label'), "
        "c.querySelector('.caption').textContent, (c.querySelector('img') || {}).alt])")
    assert len(names) == N
    for item, link, similar, text, alt in names:
        assert link == f"open image #{item} at full size" and alt in ("", None)
        short = text if len(text) <= 80 else text[:79] + "…"
        assert similar == f"find images similar to #{item}: {short}"
    assert any(MARKUP in similar for *_, similar, _, _ in names)

    page.fill("#labels", "<i>x</i>, <i>y</i>")
    page.click("#label-btn")
    page.wait_for_selector(f"#status:has-text('labelled {N} images')")
    assert all(re.fullmatch(r"<i>[xy]</i> \d{1,3}%", text) for text in labels(page))
    assert page.locator("#grid i").count() == 0
    assert page.evaluate("window.pwned") is None
    assert problems == []


def test_back_and_forward_show_their_query_in_the_box(site):
    """The query box follows the search Back or Forward shows."""
    page, problems = open_page(site)
    search(page, "photo")
    search(page, "photo 3")
    page.go_back()
    page.wait_for_selector("#status:has-text('results for “photo” in')")
    assert page.input_value("#q") == "photo"
    page.go_forward()
    page.wait_for_selector("#status:has-text('results for “photo 3”')")
    assert page.input_value("#q") == "photo 3"
    assert problems == []


def test_a_search_while_labelling_stops_the_labelling(site):
    """Labels for cards a newer search replaced are neither asked for nor written, and
    the labelling leaves the new search's status alone."""
    page, problems = labelling_held(site)
    search(page, "photo 3", k="12")
    shown = status(page)
    page.evaluate("window.held[0]()")
    page.wait_for_function("window.settled === 1")
    page.wait_for_function("window.held.length > 1 || "
                           "!document.getElementById('label-btn').disabled")
    assert page.evaluate("window.held.length") == 1  # no classify for the cards gone
    assert status(page) == shown and labels(page) == [""] * 12
    assert problems == []


def test_labels_of_a_replaced_upload_are_dropped(site):
    """The uploaded image's labels arriving after another upload replaced it are not
    shown (under the new image), nor is "labelled"."""
    page, problems = open_page(site, init=hold(CLASSIFY + " && options.body.has('file')"))
    page.goto(site["url"] + "?q=photo&k=2&offset=0")  # k=2: two cards to label
    page.wait_for_selector("#status:has-text('2 results for “photo”')")
    page.set_input_files("#file", str(site["photos"] / "p05.png"))
    page.wait_for_selector("#status:has-text('results for the uploaded image p05.png')")
    page.fill("#labels", "red, blue")
    page.click("#label-btn")
    page.wait_for_function("window.held.length === 1")  # the upload's, after the cards'
    page.set_input_files("#file", str(site["photos"] / "p07.png"))
    page.wait_for_selector("#status:has-text('results for the uploaded image p07.png')")
    shown = status(page)
    page.evaluate("window.held[0]()")
    page.wait_for_function("window.settled === 1")
    page.wait_for_function("!document.getElementById('label-btn').disabled")
    assert page.locator("#upload-labels li").count() == 0 and status(page) == shown
    assert problems == []


def test_results_per_page_rerun_the_search_in_flight(site):
    """Changing k while a search is on its way re-runs that search (it re-ran the one shown,
    dropping the typed query); "searching…" while it is on its way."""
    page, problems = open_page(site, init=HOLD_SLOW)
    search(page, "photo", k="12")
    page.fill("#q", "slow")
    page.press("#q", "Enter")
    page.wait_for_function("window.held.length === 1")
    searching = status(page)
    page.select_option("#k", "24")
    page.wait_for_function("window.held.length === 2 || "
                           "document.getElementById('status').textContent.includes('results')")
    rerun = page.evaluate("window.held.length")
    page.evaluate("window.held.forEach((go) => go())")
    page.wait_for_function("window.settled === window.held.length")
    assert searching == ["", "searching…"]
    assert rerun == 2 and status(page)[1].startswith("24 results for “slow”")
    assert page.url.endswith("?q=slow&k=24&offset=0") and page.input_value("#q") == "slow"
    assert page.input_value("#k") == "24" and len(scores(page)) == 24
    assert problems == []


def test_a_text_search_replaces_a_similar_search_still_on_its_way(site):
    """"similar" then a text search before its answer: the text search's results stay."""
    page, problems = open_page(site, init=hold("String(url).includes('/api/search/similar')"))
    search(page, "photo", k="12")
    page.click("#grid .card >> nth=1 >> text=similar")
    page.wait_for_function("window.held.length === 1")
    search(page, "photo 3")
    shown, results = status(page), scores(page)
    page.evaluate("window.held[0]()")
    page.wait_for_timeout(300)  # the similar answer (aborted) would have arrived by now
    assert status(page) == shown and scores(page) == results
    assert page.url.endswith("?q=photo+3&k=12&offset=0")
    assert problems == []


def test_results_per_page_changed_during_a_similar_search_rerun_it(site):
    """A new k while a similar search is on its way re-runs that search with it (not the text
    search shown)."""
    page, problems = open_page(site, init=hold("String(url).includes('/api/search/similar')"))
    search(page, "photo", k="12")
    card_id = page.locator("#grid .card").nth(1).get_attribute("data-id")
    page.click("#grid .card >> nth=1 >> text=similar")
    page.wait_for_function("window.held.length === 1")
    page.select_option("#k", "24")
    page.wait_for_function("window.held.length === 2")
    page.evaluate("window.release()")
    page.wait_for_selector(f"#status:has-text('24 results for images similar to #{card_id} ')")
    calls = page.evaluate("window.calls")
    assert [u for u in calls if "/api/search" in u][-1].endswith(
        f"/api/search/similar?id={card_id}&k=24&offset=0")
    assert sum("/api/search?" in u for u in calls) == 1  # the text search was not re-run
    assert page.input_value("#k") == "24"
    assert page.url.endswith(f"?similar={card_id}&k=24&offset=0")
    assert problems == []


def test_a_page_loaded_while_the_server_was_out_of_reach_fetches_its_info_later(site):
    """/api/health failed as the page loaded (no index line, the offline error): each search
    that succeeds asks again until it comes (here at the second), and a failed retry leaves
    the search's own status."""
    fail_twice = """(() => {
  const real = window.fetch; window.health = 0;
  window.fetch = (url, options) => {
    if (String(url).includes('/api/health') && ++window.health <= 2) {
      return Promise.reject(new TypeError('Failed to fetch'));
    }
    return real(url, options);
  };
})();"""
    page, problems = open_page(site, init=fail_twice)
    assert page.text_content("#info") == ""
    assert status(page) == ["error", "Cannot reach the server — is cliplab serve running?"]
    search(page, "photo", k="12")
    page.wait_for_function("window.health === 2")
    page.wait_for_timeout(100)  # the failed retry's handling
    assert page.text_content("#info") == ""
    assert status(page)[0] == "" and status(page)[1].startswith("12 results for “photo”")
    search(page, "photo 3")
    page.wait_for_selector(f"#info:has-text('{N} images')")
    assert status(page)[1].startswith("12 results for “photo 3”")
    assert problems == []


def test_the_keyboard_keeps_its_place_after_paging_and_similar(site):
    """Enter on "Next →" disabled the button while its page loaded, which dropped the focus to
    the page's start: a second Enter did nothing. "similar" is replaced by the results: the
    focus goes to the status, from where Tab reaches them."""
    page, problems = open_page(site)
    search(page, "photo", k="12")
    page.focus("#next")
    page.keyboard.press("Enter")
    page.wait_for_selector("#page-info:has-text('page 2')")
    page.wait_for_function("document.activeElement.id === 'next'")
    page.keyboard.press("Enter")
    page.wait_for_selector("#page-info:has-text('page 3')")
    # the last page: Next is disabled, the focus goes to Previous
    page.wait_for_function("document.activeElement.id === 'prev'")
    page.locator("#grid .card >> nth=0 >> text=similar").focus()
    page.keyboard.press("Enter")
    page.wait_for_selector("#status:has-text('results for images similar to')")
    page.wait_for_function("document.activeElement.id === 'status'")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "open"
    assert page.evaluate("document.activeElement.closest('.card') === "
                         "document.querySelector('#grid .card')")
    assert problems == []


def test_a_similar_search_lives_in_the_url(site):
    """Reload and a shared link show it again; values out of range in a link are replaced by
    what is shown, in the URL too."""
    page, problems = open_page(site)
    search(page, "photo", k="12")
    card_id = page.locator("#grid .card").nth(2).get_attribute("data-id")
    page.locator("#grid .card").nth(2).locator("text=similar").click()
    page.wait_for_selector(f"#status:has-text('12 results for images similar to #{card_id} “')")
    assert page.url.endswith(f"?similar={card_id}&k=12&offset=0")
    shown = scores(page)
    page.reload()
    page.wait_for_selector(f"#status:has-text('results for images similar to #{card_id} “')")
    assert scores(page) == shown
    page.go_back()
    page.wait_for_selector("#status:has-text('results for “photo”')")
    page.goto(site["url"] + f"?similar={card_id}&k=500&offset=3")
    page.wait_for_selector(f"#status:has-text('24 results for images similar to #{card_id}')")
    assert page.url.endswith(f"?similar={card_id}&k=24&offset=3")
    assert page.text_content("#page-info") == "results 4–27"  # no page number off the grid
    assert problems == []


def test_odd_queries_replies_and_captions_are_told_plainly(site):
    page, problems = open_page(site)
    page.fill("#q", "x" * 1001)
    page.press("#q", "Enter")
    assert wait_error(page) == "The query is 1001 characters long; this server takes at most 1000"
    # a reply that is not JSON (a proxy's error page, another server)
    page.route("**/api/search?*", lambda route: route.fulfill(
        status=200, content_type="text/html", body="<html>proxy</html>"))
    page.fill("#q", "photo")
    page.press("#q", "Enter")
    assert wait_error(page).startswith("The server's reply was not JSON")
    page.unroute("**/api/search?*")
    # a caption cut for the status never splits an emoji; a right-to-left override in it
    # cannot reorder the rest of the line
    cut = page.evaluate("shorten('a'.repeat(58) + '\\u{1F600}\\u{1F600}xyz', 60)")
    assert cut == "a" * 58 + "\U0001F600…"
    page.evaluate("setStatus(['before ', {isolate: '\\u202Eevil'}, ' after'])")
    assert page.text_content("#status") == "before \u202eevil after"
    assert page.eval_on_selector("#status", "e => e.querySelector('bdi').textContent") == \
        "\u202eevil"
    assert problems == []


def test_an_image_dropped_anywhere_is_searched_and_enter_labels(site):
    page, problems = open_page(site)
    page.evaluate("""(async () => {
  const canvas = Object.assign(document.createElement('canvas'), { width: 16, height: 16 });
  canvas.getContext('2d').fillRect(0, 0, 8, 8);
  const blob = await new Promise((done) => canvas.toBlob(done, 'image/png'));
  const data = new DataTransfer();
  data.items.add(new File([blob], 'dropped.png', { type: 'image/png' }));
  document.querySelector('header').dispatchEvent(
    new DragEvent('drop', { dataTransfer: data, bubbles: true, cancelable: true }));
})()""")
    page.wait_for_selector("#status:has-text('results for the uploaded image dropped.png')")
    page.fill("#labels", "a, b")
    page.press("#template", "Enter")
    page.wait_for_selector("#status:has-text('labelled')")
    assert page.locator("#upload-labels li").count() == 2
    assert problems == []


CONTRAST = """(e) => {
  const lum = (c) => { const [r, g, b] = c.match(/[\\d.]+/g).slice(0, 3).map((v) => {
    v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
  const [x, y] = [lum(getComputedStyle(e).borderTopColor), lum("rgb(255, 255, 255)")]
    .sort((p, q) => q - p);
  return (x + 0.05) / (y + 0.05);
}"""


def test_the_page_keeps_keyboard_and_screen_reader_users_informed(site):
    """The accessibility review's findings: labelling by keyboard keeps the focus on its button
    (a second Enter labels again); a jump link reaches the upload past every result; form
    fields are outlined at 3:1 on white (WCAG 1.4.11); a later page says its range, the tab's
    title names the search; results are a list under a heading and a label chip is announced
    as one; a long caption opens in full when its card holds the focus; the page size has a
    visible label; too few labels are refused before any request."""
    page, problems = open_page(site)
    page.keyboard.press("Tab")  # the first stop: the jump link
    assert page.evaluate("document.activeElement.className") == "skip"
    search(page, "photo", k="12")
    assert page.title() == "“photo” – page 1 – cliplab search"
    assert page.get_attribute("#grid", "role") == "list"
    assert page.locator("#grid [role=listitem]").count() == 12
    assert page.locator("main h2", has_text="Results").count() == 1
    sent = []
    page.on("request", lambda r: sent.append(r.url) if "/api/search" in r.url else None)
    page.focus(".skip")
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "file"
    page.wait_for_timeout(300)
    assert sent == []  # followed as a link (#tools), it ran the search again

    page.focus("#next")
    page.keyboard.press("Enter")
    page.wait_for_selector("#page-info:has-text('page 2')")
    assert re.fullmatch(r"12 results for “photo” in \d+ ms · page 2 · results 13–24",
                        status(page)[1]), status(page)
    assert page.title() == "“photo” – page 2 – cliplab search"

    sent = []
    page.on("request", lambda r: sent.append(r) if "/api/classify" in r.url else None)
    page.fill("#labels", "red\n red ,")
    page.click("#label-btn")
    assert wait_error(page) == ("Give at least two different labels, one per line or separated "
                                "by commas") and sent == []
    page.fill("#labels", "red\nblue")
    page.focus("#label-btn")
    page.keyboard.press("Enter")
    page.wait_for_selector("#status:has-text('labelled 12 images')")
    page.wait_for_function("document.activeElement.id === 'label-btn'")
    with page.expect_response(lambda r: "/api/classify" in r.url):
        page.keyboard.press("Enter")  # labels again: the focus is still there
    page.wait_for_function("document.activeElement.id === 'label-btn' && "
                           "!document.activeElement.disabled")
    assert len(sent) == 2 and len(labels(page)) == 12
    assert page.is_hidden("#upload-labels")  # no upload labelled: no empty list

    for field in ("q", "k", "labels", "template"):
        ratio = page.eval_on_selector(f"#{field}", CONTRAST)
        assert ratio >= 3, (field, ratio)
    assert page.is_visible("label[for=k]") and page.inner_text("label[for=k]") == "per page"
    assert page.get_by_role("combobox", name="Results per page").count() == 1

    search(page, "long long", k="48")
    caption = card_of(page, "long long").locator(".caption")
    clamped = caption.evaluate("e => e.getBoundingClientRect().height")
    card_of(page, "long long").hover()  # a mouse has the tooltip: nothing moves
    assert caption.evaluate("e => e.getBoundingClientRect().height") == clamped
    card_of(page, "long long").locator(".similar").focus()
    opened = caption.evaluate("e => e.getBoundingClientRect().height")
    # whole, in a box that scrolls (the 10 000 characters pushed the page down by metres)
    assert clamped < 80 < opened < 130, (clamped, opened)
    assert caption.evaluate("e => e.scrollHeight > e.clientHeight")
    assert problems == []
