"""The series page's slice viewer driven in Chromium (playwright): wait for the picture it last
asked for, scroll it, check each picture changed and has the size the volume's description
gives its plane. Used by the browser test over a protocol run (tests/test_protocol_run.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cohortflow.qc.dashboard import viewer

if TYPE_CHECKING:
    from playwright.sync_api import Page


def settled(page: Page) -> dict[str, Any]:
    """Wait until the viewer shows the picture it last asked for; its volume's description."""
    _wait(page)
    found: dict[str, Any] = page.evaluate(
        "(uid) => fetch(`/api/series/${uid}/volume`).then(r => r.json())",
        page.get_attribute("[data-testid=viewer]", "data-series"),
    )
    return found


def _wait(page: Page) -> None:
    """Until the viewer shows the picture it last asked for."""
    page.wait_for_function(
        """() => {
            const v = document.querySelector('[data-testid=viewer]');
            const img = v && v.querySelector('img.slice');
            return v && v.dataset.ready === '1' && !v.dataset.loading && img.complete
                && v.dataset.shown === img.getAttribute('src');
        }""",
        timeout=60_000,
    )


def _rendered(page: Page) -> bytes:
    """The viewer's picture as the browser draws it."""
    return page.locator("[data-testid=viewer-image]").screenshot()


def changed(page: Page, before: bytes, asked: str) -> bytes:
    """The picture once the viewer shows its latest request, which asked for ``asked`` (a
    query parameter); it differs from ``before``."""
    _wait(page)
    src = page.get_attribute("[data-testid=viewer-image]", "src") or ""
    assert asked in src.split("?", 1)[1].split("&"), (asked, src)
    now = _rendered(page)
    assert now != before, asked
    return now


def natural(page: Page, selector: str) -> tuple[int, int]:
    """The natural size of a loaded picture; a picture that loaded with no size is a broken one
    (the server failed to draw it: the strip plot once did, when matplotlib drew two plots at
    once in the dashboard's threads)."""
    locator = page.locator(selector)
    locator.scroll_into_view_if_needed()
    page.wait_for_function("(el) => el.complete", arg=locator.element_handle(), timeout=60_000)
    width, height = locator.evaluate("(el) => [el.naturalWidth, el.naturalHeight]")
    assert width > 0, f"{selector}: a broken picture (see the dashboard's log)"
    return int(width), int(height)


def natural_size(page: Page, meta: dict[str, Any], plane: str) -> None:
    """The slice's picture has the size the volume's description gives the plane (square
    pixels at the viewer's scale)."""
    expected = (meta["planes"][plane]["width"], meta["planes"][plane]["height"])
    assert natural(page, "[data-testid=viewer-image]") == expected, plane
    assert 100 <= max(expected) <= viewer.MAX_SIDE_PX


def viewed(page: Page, uid: str, meta: dict[str, Any], shot: str, shots: Path) -> bytes:
    """Scroll the viewer of series ``uid``: the wheel three slices on, Page Down ten back,
    the up arrow one on; each time the slice index and the picture change. Returns the last
    picture."""
    box = "[data-testid=viewer]"
    assert page.get_attribute(box, "data-series") == uid
    plane = page.get_attribute(box, "data-plane") or ""
    natural_size(page, meta, plane)
    slices = meta["planes"][plane]["slices"]
    middle = slices // 2
    assert page.get_attribute(box, "data-index") == str(middle)
    before = _rendered(page)
    page.hover("[data-testid=viewer-image]")
    for _ in range(3):
        page.mouse.wheel(0, 120)
    after = changed(page, before, f"index={middle + 3}")
    assert page.inner_text("[data-testid=slice-index]").startswith(f"{middle + 4} / {slices}")
    page.focus(box)
    page.keyboard.press("PageDown")
    back = changed(page, after, f"index={max(0, middle - 7)}")
    page.keyboard.press("ArrowUp")
    last = changed(page, back, f"index={max(0, middle - 7) + 1}")
    assert page.get_attribute(box, "data-index") == str(max(0, middle - 7) + 1)
    natural_size(page, meta, plane)
    page.screenshot(path=str(shots / shot), full_page=True)
    return last
