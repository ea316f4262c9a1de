"""The built book in a real browser: every page loads cleanly in headless Chromium.

For each HTML page of ``_build/html`` served on localhost: no error in the browser console
(failed requests included), every ``<img>`` decoded, every formula typeset by MathJax, and
every chemiscope widget initialised (map and structure viewer drawn, no error shown). A
screenshot of each page is saved under ``_build/screenshots`` for a look by eye.

Run with ``make test-browser`` (installs Chromium, builds the site from the committed
smoke-run notebooks, runs this module).
"""

from __future__ import annotations

import base64
import json
import time

import pytest

from browser_env import browser, screenshot_dir, site_pages, site_url  # noqa: F401 (fixtures)

pytestmark = pytest.mark.browser

#: Seconds a page may take to settle (load, typeset, draw the chemiscope widget).
SETTLE_S = 30
#: Tallest screenshot, in CSS pixels (long notebook chapters are cut here).
MAX_SHOT_HEIGHT = 16000
#: The page with the formulas of the study.
METHODS_PAGE = "book/methods.html"


def wait_for(driver, script: str, what: str, timeout: float = SETTLE_S):
    """Poll ``script`` (JavaScript returning a truthy value when done) until it holds."""
    end = time.monotonic() + timeout
    while True:
        value = driver.execute_script(script)
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def console_errors(driver) -> list[str]:
    """Console entries of level SEVERE since the last call (the log is drained on read).

    The browser's own request for ``/favicon.ico`` (the book sets no icon) is not the page's.
    """
    return [f"{e['level']}: {e['message']}" for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and "/favicon.ico " not in e["message"]]


def typeset_maths(driver) -> dict:
    """Wait for MathJax (if the page loads it) and count formulas, rendered ones and errors."""
    has_mathjax = driver.execute_script("return typeof window.MathJax === 'object'")
    if has_mathjax:
        wait_for(driver, "return !!(window.MathJax.startup && window.MathJax.startup.promise)",
                 "MathJax to start")
        driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "MathJax.startup.promise.then(() => done(true), e => done(String(e)));")
    return driver.execute_script("""
        const maths = [...document.querySelectorAll('.math')];
        return {mathjax: typeof window.MathJax === 'object',
                formulas: maths.length,
                rendered: maths.filter(m => m.querySelector('mjx-container')).length,
                containers: document.querySelectorAll('mjx-container').length,
                errors: [...document.querySelectorAll('mjx-merror')].map(e => e.textContent)};""")


def image_report(driver) -> list[dict]:
    """Every ``<img>`` after it was scrolled into view (so lazy ones load)."""
    driver.execute_script("document.querySelectorAll('img').forEach(i => { i.loading = 'eager'; });")
    wait_for(driver, "return [...document.querySelectorAll('img')].every(i => i.complete)",
             "every image to finish loading")
    return driver.execute_script("""
        return [...document.querySelectorAll('img')].map(i => ({
            src: i.currentSrc || i.src, width: i.naturalWidth, height: i.naturalHeight}));""")


def chemiscope_report(driver) -> list[dict]:
    """State of each chemiscope Sphinx widget once its loading spinner is gone.

    ``loadChemiscopeSphinx`` fills ``div#<id>`` with a ``.chemiscope-sphinx`` container; the
    map (``#<id>-map``: Plotly, ``.js-plotly-plot`` with a WebGL ``canvas``), the structure
    viewer (``#<id>-structure``: ``.chsp-structure-viewer-grid`` with the 3Dmol ``canvas``) and
    the property table (``#<id>-info``: ``.chsp-properties-table``) live in shadow roots.
    Failures go to ``#<id>-error-display`` (shown with ``display: flex``).
    """
    ids = driver.execute_script("""
        return [...document.querySelectorAll('.chemiscope-sphinx-spinner')]
            .map(s => s.id.replace(/-loading$/, ''));""")
    reports = []
    for wid in ids:
        wait_for(driver, f"return document.getElementById('{wid}-loading').style.display === 'none'",
                 f"chemiscope widget {wid} to load")
        reports.append(driver.execute_script("""
            const id = arguments[0], root = document.getElementById(id);
            const err = document.getElementById(id + '-error-display');
            // querySelector that also looks inside shadow roots
            const find = (node, sel) => {
                if (!node) return null;
                const hit = node.querySelector(sel);
                if (hit) return hit;
                for (const e of node.querySelectorAll('*')) {
                    const inner = e.shadowRoot && find(e.shadowRoot, sel);
                    if (inner) return inner;
                }
                return null;
            };
            const part = s => document.getElementById(id + '-' + s);
            return {id: id,
                    container: !!root.querySelector('.chemiscope-sphinx'),
                    error: err && getComputedStyle(err).display !== 'none' ? err.innerText.trim() : '',
                    map_plot: !!(find(part('map'), '.js-plotly-plot') && find(part('map'), 'canvas')),
                    structure_canvas: !!(find(part('structure'), '.chsp-structure-viewer-grid')
                                         && find(part('structure'), 'canvas')),
                    info_table: !!find(part('info'), '.chsp-properties-table')};""", wid))
    return reports


def widget_ready(widget: dict) -> bool:
    return (widget["container"] and widget["map_plot"] and widget["structure_canvas"]
            and widget["info_table"] and not widget["error"])


#: Text that must not be visible on a page: library warnings and tracebacks belong in the
#: collapsed "Messages printed to stderr" block of a chapter, not in its body.
WARNING_TEXT = r"(Warning:|UserWarning|DeprecationWarning|FutureWarning|RuntimeWarning|Traceback \(most recent)"


def reading_report(driver) -> dict:
    """What a reader sees: figures and their captions, visible warning text, horizontal overflow.

    An image of a notebook output is a figure when it sits in a ``<figure>`` with a
    ``<figcaption>``; overflow is an element of the article wider than the article's text column
    that no scrolling ancestor (``overflow-x: auto/scroll/hidden``) contains.
    """
    return driver.execute_script("""
        const article = document.querySelector('article.bd-article') || document.querySelector('main');
        const imgs = article ? [...article.querySelectorAll('.cell_output img, .output img')] : [];
        const figures = imgs.map(i => {
            const fig = i.closest('figure');
            const cap = fig && fig.querySelector('figcaption');
            return {src: (i.currentSrc || i.src).split('/').pop(), caption: cap ? cap.innerText.trim() : '',
                    alt: i.getAttribute('alt') || ''};
        });
        const text = document.body.innerText;
        const warning = new RegExp(arguments[0]);
        const hits = text.split(String.fromCharCode(10)).filter(l => warning.test(l)).slice(0, 5);
        const overflow = [];
        if (article) {
            const right = article.getBoundingClientRect().right + 1;
            for (const e of article.querySelectorAll('*')) {
                const r = e.getBoundingClientRect();
                if (r.width === 0 || r.right <= right) continue;
                let clipped = false;
                for (let a = e.parentElement; a && a !== article; a = a.parentElement) {
                    if (['auto', 'scroll', 'hidden'].includes(getComputedStyle(a).overflowX)) { clipped = true; break; }
                }
                if (!clipped && !['auto', 'scroll', 'hidden'].includes(getComputedStyle(e).overflowX)) {
                    overflow.push(e.tagName.toLowerCase() + '.' + [...e.classList].join('.') + ' ' + Math.round(r.right - right) + 'px');
                }
            }
        }
        return {figures: figures, warnings: hits, overflow: overflow.slice(0, 5),
                page_overflow: document.documentElement.scrollWidth > window.innerWidth + 1};""", WARNING_TEXT)


def save_screenshot(driver, path) -> None:
    """Full-page PNG (through the DevTools protocol), at most :data:`MAX_SHOT_HEIGHT` tall."""
    size = driver.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight];")
    clip = {"x": 0, "y": 0, "width": size[0], "height": min(size[1], MAX_SHOT_HEIGHT), "scale": 1}
    shot = driver.execute_cdp_cmd("Page.captureScreenshot",
                                  {"format": "png", "captureBeyondViewport": True, "clip": clip})
    path.write_bytes(base64.b64decode(shot["data"]))


@pytest.mark.parametrize("page", site_pages() or [pytest.param(None, marks=pytest.mark.skip(
    reason="no built site (run `make book-html`)"))])
def test_page_renders(page, site_url, browser, screenshot_dir):
    console_errors(browser)  # drop what earlier pages left
    browser.get(site_url + page)
    wait_for(browser, "return document.readyState === 'complete'", "the page to load")

    maths = typeset_maths(browser)
    images = image_report(browser)
    widgets = chemiscope_report(browser)
    browser.execute_script("window.scrollTo(0, 0)")
    save_screenshot(browser, screenshot_dir / (page.replace("/", "__").removesuffix(".html") + ".png"))
    errors = console_errors(browser)
    reading = reading_report(browser)

    assert not errors, f"console errors on {page}:\n" + "\n".join(errors)
    uncaptioned = [f["src"] for f in reading["figures"] if not f["caption"]]
    assert not uncaptioned, f"figures without a caption on {page}: {uncaptioned}"
    assert all(f["alt"] for f in reading["figures"]), f"figures without alt text on {page}"
    assert not reading["warnings"], f"warning text visible on {page}: {reading['warnings']}"
    assert not reading["overflow"] and not reading["page_overflow"], \
        f"content wider than the text column on {page}: {reading['overflow']}"
    broken = [i["src"] for i in images if i["width"] == 0]
    assert not broken, f"images that did not load on {page}: {broken}"
    assert maths["rendered"] == maths["formulas"], f"formulas left untypeset on {page}: {maths}"
    assert not maths["errors"], f"MathJax errors on {page}: {maths['errors']}"
    if maths["formulas"]:
        assert maths["mathjax"], f"{page} has formulas but loads no MathJax"
    for w in widgets:
        assert not w["error"], f"chemiscope widget {w['id']} on {page} shows an error: {w['error']}"
        assert widget_ready(w), f"chemiscope widget on {page} not initialised: {json.dumps(w)}"


def test_methods_page_has_typeset_maths(site_url, browser):
    """The methods page states the formulas of the study; MathJax must have rendered them."""
    if METHODS_PAGE not in site_pages():
        pytest.skip(f"no {METHODS_PAGE} in the built site")
    browser.get(site_url + METHODS_PAGE)
    maths = typeset_maths(browser)
    assert maths["containers"] > 0 and maths["rendered"] == maths["formulas"] > 0, maths


def test_pooling_chapter_has_live_chemiscope_map(site_url, browser):
    """The cumulant-pooling chapter embeds the chemiscope map its notebook wrote."""
    pages = [p for p in site_pages() if p.endswith("-cumulant-pooling.html")]
    if not pages:
        pytest.skip("no cumulant-pooling chapter in the built site")
    browser.get(site_url + pages[0])
    wait_for(browser, "return document.readyState === 'complete'", "the page to load")
    widgets = chemiscope_report(browser)
    assert widgets, f"{pages[0]} has no chemiscope widget"
    assert all(widget_ready(w) for w in widgets), widgets


def test_findings_page_lists_its_verdicts(site_url, browser):
    """The findings chapter: one row per claim with our number, the paper's and a computed verdict."""
    page = "book/_generated/findings.html"
    if page not in site_pages():
        pytest.fail(f"no {page} in the built site")
    browser.get(site_url + page)
    wait_for(browser, "return document.readyState === 'complete'", "the page to load")
    rows = browser.execute_script("""
        const table = document.querySelector('article table');
        if (!table) return [];
        const head = [...table.querySelectorAll('thead th')].map(h => h.innerText.trim());
        return [...table.querySelectorAll('tbody tr')].map(r => {
            const cells = [...r.querySelectorAll('td')].map(c => c.innerText.trim());
            const link = r.querySelector('td a');
            return Object.assign(Object.fromEntries(head.map((h, i) => [h, cells[i]])),
                                 {link: link ? link.getAttribute('href') : ''});
        });""")
    assert len(rows) >= 6, f"the findings table has {len(rows)} rows"
    for row in rows:
        assert row["verdict"] and row["ours (95 % interval)"], row
        assert row["link"].startswith("../_generated/results/") or "results/" in row["link"], row
    verdicts = " ".join(r["verdict"] for r in rows)
    assert "range" in verdicts or "interval" in verdicts
