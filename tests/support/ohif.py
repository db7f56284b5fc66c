"""Drive OHIF Viewer 3.13 in headless Chromium (Playwright, sync API) for viewer tests.

What a test does with it::

    with OhifViewer(tmp_path / "browser") as viewer:
        viewer.open(ohif.viewer_url(study_uid))          # waits until the first image is drawn
        sc = viewer.find_display_set(modality="OT")
        viewer.load_display_set(sc)                      # double-clicks its thumbnail
        viewer.wait_for_image(colour=True)               # an RGB image is on the canvas
        assert viewer.console_errors() == []
        viewer.screenshot("sc")

Every wait polls a condition in the page (``page.wait_for_function``) with a timeout;
nothing sleeps to guess. State is read where OHIF keeps it - ``window.services`` (display
sets, viewport grid, segmentations, notifications) and ``window.cornerstone`` /
``window.cornerstoneTools`` (viewports, annotations), which OHIF 3.13 exposes for its own
end-to-end tests - and, for what the user sees, from the DOM: the thumbnails, the SVG
annotation layer, and the pixels of the viewport canvas.

Chromium is the Debian one (``/usr/bin/chromium``), never a downloaded browser, started
with the flags this closed network needs (without them it hangs on start-up) and a fresh
profile folder per viewer.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Headless tests on a shared machine: no throttling of background timers/tabs.
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
]
# A busy 2-core machine with software WebGL: generous, but finite.
DEFAULT_TIMEOUT_S = 180.0
POLL_MS = 250
_ERROR_BOUNDARY = "Error Boundary"


def chromium_available() -> bool:
    return CHROMIUM.is_file()


def playwright_available() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class ConsoleEntry:
    """One console message or uncaught page error."""

    kind: str  # "error", "warning", "log", ... or "pageerror"
    text: str
    url: str = ""

    def __str__(self) -> str:
        where = f" ({self.url})" if self.url else ""
        return f"[{self.kind}] {self.text}{where}"


@dataclass(frozen=True)
class DisplaySet:
    """What the harness needs of an OHIF display set (one series, or part of one)."""

    uid: str  # displaySetInstanceUID
    modality: str
    series_instance_uid: str
    series_description: str
    series_number: int | None
    sop_class_uids: tuple[str, ...]
    is_loaded: bool
    unsupported: bool
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_js(cls, d: dict[str, Any]) -> DisplaySet:
        number = d.get("SeriesNumber")
        return cls(
            uid=str(d["displaySetInstanceUID"]),
            modality=str(d.get("Modality") or ""),
            series_instance_uid=str(d.get("SeriesInstanceUID") or ""),
            series_description=str(d.get("SeriesDescription") or ""),
            series_number=int(number) if number not in (None, "") else None,
            sop_class_uids=tuple(d.get("sopClassUids") or ()),
            is_loaded=bool(d.get("isLoaded")),
            unsupported=bool(d.get("unsupported")),
            raw=d,
        )


@dataclass(frozen=True)
class CanvasStats:
    """Pixels of a viewport's on-screen canvas, sampled on a grid."""

    samples: int
    non_black: int  # max(r, g, b) > 16
    coloured: int  # max - min channel > 40: not grey

    @property
    def has_image(self) -> bool:
        return self.samples > 0 and self.non_black / self.samples > 0.02

    @property
    def coloured_fraction(self) -> float:
        return self.coloured / self.samples if self.samples else 0.0


class OhifTimeout(AssertionError):
    """A condition did not hold in time; the message says which, and what the page showed."""


# JavaScript helpers, evaluated in the page. Kept small and side-effect free.
_JS_DISPLAY_SETS = """() => {
  const s = window.services;
  if (!s || !s.displaySetService) return null;
  return s.displaySetService.getActiveDisplaySets().map(d => ({
    displaySetInstanceUID: d.displaySetInstanceUID, Modality: d.Modality,
    SeriesInstanceUID: d.SeriesInstanceUID, SeriesDescription: d.SeriesDescription,
    SeriesNumber: d.SeriesNumber, sopClassUids: d.sopClassUids || [],
    isLoaded: !!d.isLoaded, unsupported: !!d.unsupported,
    numImages: d.numImageFrames ?? (d.images ? d.images.length : null),
    isHydrated: d.isHydrated, isRehydratable: d.isRehydratable,
    measurements: d.measurements ? d.measurements.map(m => ({
      TrackingIdentifier: m.TrackingIdentifier, loaded: !!m.loaded,
      graphicType: m.graphicType || null, labels: m.labels || [],
      displaySetInstanceUID: m.displaySetInstanceUID || null,
    })) : null,
  }));
}"""

_JS_VIEWPORTS = """() => {
  const s = window.services;
  if (!s || !s.viewportGridService) return null;
  const state = s.viewportGridService.getState();
  const out = {active: state.activeViewportId, viewports: {}};
  for (const [id, vp] of state.viewports) {
    out.viewports[id] = vp.displaySetInstanceUIDs || [];
  }
  return out;
}"""

# Sample the on-screen 2-D canvas of a viewport (cornerstone copies its WebGL output
# into it) on a grid of at most ~40k points.
_JS_CANVAS = """(viewportId) => {
  const root = document.querySelector(`[data-viewportid="${viewportId}"]`);
  const canvas = root && root.querySelector('canvas.cornerstone-canvas');
  if (!canvas || !canvas.width || !canvas.height) return null;
  let data;
  try {
    data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  } catch (e) { return null; }
  const step = Math.max(1, Math.floor(Math.sqrt(canvas.width * canvas.height / 40000)));
  let samples = 0, nonBlack = 0, coloured = 0;
  for (let y = 0; y < canvas.height; y += step) {
    for (let x = 0; x < canvas.width; x += step) {
      const i = (y * canvas.width + x) * 4;
      const r = data[i], g = data[i + 1], b = data[i + 2];
      const hi = Math.max(r, g, b), lo = Math.min(r, g, b);
      samples++;
      if (hi > 16) nonBlack++;
      if (hi - lo > 40) coloured++;
    }
  }
  return {samples, nonBlack, coloured};
}"""

_JS_SVG_LABELS = """(viewportId) => {
  const root = viewportId ? document.querySelector(`[data-viewportid="${viewportId}"]`) : document;
  if (!root) return [];
  const out = [];
  for (const text of root.querySelectorAll('svg.svg-layer text')) {
    const spans = text.querySelectorAll('tspan');
    const lines = spans.length ? [...spans].map(t => t.textContent) : [text.textContent];
    for (const line of lines) { if (line && line.trim()) out.push(line.trim()); }
  }
  return out;
}"""

_JS_ANNOTATIONS = """() => {
  const tools = window.cornerstoneTools;
  if (!tools || !tools.annotation) return null;
  return tools.annotation.state.getAllAnnotations().map(a => ({
    annotationUID: a.annotationUID, toolName: a.metadata && a.metadata.toolName,
    graphicType: a.metadata && a.metadata.graphicType,
    referencedImageId: a.metadata && a.metadata.referencedImageId,
    label: a.data && a.data.label,
    labels: (a.data && a.data.labels) ? a.data.labels.map(l => ({label: l.label, value: l.value})) : [],
  }));
}"""

_JS_MEASUREMENTS = """() => {
  const s = window.services;
  if (!s || !s.measurementService) return null;
  return s.measurementService.getMeasurements().map(m => ({
    uid: m.uid, label: m.label, toolName: m.toolName, type: m.type,
    displayText: m.displayText, referenceSeriesUID: m.referenceSeriesUID,
  }));
}"""

_JS_VIEWPORT_INFO = """(viewportId) => {
  const cs = window.cornerstone;
  if (!cs) return null;
  const engine = cs.getRenderingEngines && cs.getRenderingEngines()[0];
  const vp = engine && engine.getViewport(viewportId);
  if (!vp) return null;
  let actors = [];
  try { actors = vp.getActors().map(a => ({uid: a.uid, referencedId: a.referencedId || null})); } catch (e) {}
  let imageId = null;
  try { imageId = vp.getCurrentImageId ? vp.getCurrentImageId() : null; } catch (e) {}
  return {type: vp.type, actors, imageId};
}"""

_JS_SEGMENTATIONS = """() => {
  const s = window.services;
  if (!s || !s.segmentationService) return null;
  return s.segmentationService.getSegmentations().map(seg => ({
    segmentationId: seg.segmentationId, label: seg.label,
    segments: Object.values(seg.segments || {}).filter(Boolean).map(x => x.label),
  }));
}"""

_JS_RENDER = """() => {
  const cs = window.cornerstone;
  for (const engine of (cs && cs.getRenderingEngines ? cs.getRenderingEngines() : [])) engine.render();
}"""

# Toasts (uiNotificationService) as rendered: OHIF uses sonner.
_JS_NOTIFICATIONS = (
    """() => [...document.querySelectorAll('[data-sonner-toast]')].map(t => t.innerText.trim())"""
)


class OhifViewer:
    """One headless Chromium with one OHIF page. Use as a context manager."""

    def __init__(
        self,
        workdir: Path,
        *,
        width: int = 1400,
        height: int = 900,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        screenshots: Path | None = None,
    ) -> None:
        """``workdir`` gets the browser profile (fresh each time) and, unless
        ``screenshots`` says elsewhere, the screenshots."""
        self.workdir = workdir
        self.profile = workdir / "profile"
        self.screenshots = screenshots or workdir / "screenshots"
        self.width = width
        self.height = height
        self.timeout_s = timeout_s
        self.console: list[ConsoleEntry] = []
        self.failed_requests: list[str] = []
        self._pw: Any = None
        self._context: Any = None
        self._page: Any = None

    # -- life cycle -----------------------------------------------------------------------

    def __enter__(self) -> OhifViewer:
        from playwright.sync_api import sync_playwright

        if self.profile.exists():
            shutil.rmtree(self.profile)
        self.profile.mkdir(parents=True)
        self.screenshots.mkdir(parents=True, exist_ok=True)
        self._pw = sync_playwright().start()
        try:
            self._context = self._pw.chromium.launch_persistent_context(
                str(self.profile),
                executable_path=str(CHROMIUM),
                args=CHROMIUM_ARGS,
                headless=True,
                viewport={"width": self.width, "height": self.height},
                timeout=self.timeout_s * 1000,
            )
            self._page = self._context.pages[0] if self._context.pages else self._context.new_page()
        except Exception:
            self._pw.stop()
            raise
        self._page.set_default_timeout(self.timeout_s * 1000)
        self._page.on("console", self._on_console)
        self._page.on("pageerror", self._on_page_error)
        self._page.on("requestfailed", self._on_request_failed)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and self._page is not None:
            # Leave evidence of what the page showed when a test failed (the page may be
            # gone: keep the original error whatever happens here).
            with contextlib.suppress(Exception):
                self.screenshot("failure")
        try:
            if self._context is not None:
                self._context.close()
        finally:
            if self._pw is not None:
                self._pw.stop()

    @property
    def page(self) -> Any:
        """The Playwright ``Page`` (for what this class does not wrap)."""
        if self._page is None:
            raise RuntimeError("OhifViewer is not started (use it as a context manager)")
        return self._page

    def _on_console(self, msg: Any) -> None:
        location = msg.location or {}
        self.console.append(
            ConsoleEntry(str(msg.type), str(msg.text), str(location.get("url") or ""))
        )

    def _on_page_error(self, error: Any) -> None:
        self.console.append(ConsoleEntry("pageerror", str(error)))

    def _on_request_failed(self, request: Any) -> None:
        self.failed_requests.append(f"{request.method} {request.url}: {request.failure}")

    # -- console --------------------------------------------------------------------------

    def console_errors(self, ignore: tuple[str, ...] = ()) -> list[ConsoleEntry]:
        """Console errors and uncaught exceptions so far, minus those containing an ``ignore`` text.

        OHIF 3.13 catches what breaks a viewport in a React error boundary, shows a "Something
        went wrong" toast, and logs the exception with ``console.debug`` ("Route viewer Error
        Boundary TypeError: ..."): those count as errors here too.
        """
        return [
            e
            for e in self.console
            if (
                e.kind in ("error", "pageerror")
                or (e.kind == "debug" and _ERROR_BOUNDARY in e.text)
            )
            and not any(text in e.text for text in ignore)
        ]

    def console_warnings(self) -> list[ConsoleEntry]:
        return [e for e in self.console if e.kind == "warning"]

    def console_text(self, contains: str) -> list[ConsoleEntry]:
        return [e for e in self.console if contains in e.text]

    # -- waiting --------------------------------------------------------------------------

    def wait_until(
        self, js: str, arg: Any = None, *, what: str, timeout_s: float | None = None
    ) -> Any:
        """Poll the JavaScript function ``js`` (called with ``arg``) until it returns truthy."""
        timeout = (timeout_s or self.timeout_s) * 1000
        try:
            handle = self.page.wait_for_function(js, arg=arg, polling=POLL_MS, timeout=timeout)
        except Exception as exc:
            if type(exc).__name__ != "TimeoutError":
                raise
            raise OhifTimeout(self._timeout_message(what, timeout / 1000)) from None
        return handle.json_value()

    def poll(self, check: Any, *, what: str, timeout_s: float | None = None) -> Any:
        """Poll a Python callable (that reads the page) until it returns something truthy."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise OhifTimeout(self._timeout_message(what, timeout_s or self.timeout_s))
            # Let the page run (and its events arrive) between two checks.
            self.page.wait_for_timeout(POLL_MS)

    def _timeout_message(self, what: str, timeout_s: float) -> str:
        try:
            shot = self.screenshot("timeout")
        except Exception:  # noqa: BLE001 - best effort while reporting a failure
            shot = None
        errors = "\n  ".join(str(e) for e in self.console_errors()[-10:]) or "none"
        try:
            notes = "; ".join(self.notifications()) or "none"
        except Exception:  # noqa: BLE001
            notes = "?"
        return (
            f"OHIF: timed out after {timeout_s:.0f} s waiting for {what}\n"
            f"  screenshot: {shot}\n  notifications: {notes}\n  console errors:\n  {errors}"
        )

    # -- opening a study --------------------------------------------------------------------

    def open(
        self, url: str, *, timeout_s: float | None = None, wait_for_image: bool = True
    ) -> None:
        """Load ``url`` (a /viewer?StudyInstanceUIDs=... link) and wait until OHIF is up:
        its services exist, the study's display sets are known, and (by default) the
        active viewport shows an image."""
        self.page.goto(
            url, wait_until="domcontentloaded", timeout=(timeout_s or self.timeout_s) * 1000
        )
        self.wait_until(
            "() => !!(window.services && window.services.displaySetService"
            " && window.services.displaySetService.getActiveDisplaySets().length)",
            what="OHIF to load the study's display sets",
            timeout_s=timeout_s,
        )
        self.wait_until(
            "() => document.querySelectorAll('[data-cy=\"study-browser-thumbnail\"]').length > 0",
            what="the study browser thumbnails",
            timeout_s=timeout_s,
        )
        if wait_for_image:
            self.wait_for_image(timeout_s=timeout_s)

    # -- display sets and viewports -----------------------------------------------------------

    def display_sets(self) -> list[DisplaySet]:
        found = self.page.evaluate(_JS_DISPLAY_SETS)
        return [DisplaySet.from_js(d) for d in found or []]

    def find_display_set(
        self,
        *,
        modality: str | None = None,
        series_instance_uid: str | None = None,
        series_description: str | None = None,
        series_number: int | None = None,
        sop_class_uid: str | None = None,
        timeout_s: float | None = None,
    ) -> DisplaySet:
        """The one display set that matches every criterion given (waits for it to appear).

        ``series_description`` matches as a substring. OHIF's own modality is used:
        "SR", "SEG", "RTSTRUCT", "PMAP" (Parametric Map), "OT"/"SC" as in the header...
        """

        def matches(d: DisplaySet) -> bool:
            return (
                (modality is None or d.modality == modality)
                and (series_instance_uid is None or d.series_instance_uid == series_instance_uid)
                and (series_description is None or series_description in d.series_description)
                and (series_number is None or d.series_number == series_number)
                and (sop_class_uid is None or sop_class_uid in d.sop_class_uids)
            )

        def one() -> DisplaySet | None:
            found = [d for d in self.display_sets() if matches(d)]
            if len(found) > 1:
                raise AssertionError(f"several display sets match: {found}")
            return found[0] if found else None

        given = {
            "modality": modality,
            "series_instance_uid": series_instance_uid,
            "series_description": series_description,
            "series_number": series_number,
            "sop_class_uid": sop_class_uid,
        }
        criteria = {k: v for k, v in given.items() if v is not None}
        result: DisplaySet = self.poll(
            one, what=f"a display set with {criteria}", timeout_s=timeout_s
        )
        return result

    def viewports(self) -> dict[str, Any]:
        """``{"active": id, "viewports": {id: [displaySetInstanceUID, ...]}}``."""
        return dict(self.page.evaluate(_JS_VIEWPORTS) or {})

    def active_viewport_id(self) -> str:
        return str(self.viewports().get("active") or "default")

    def load_display_set(
        self, display_set: DisplaySet, *, timeout_s: float | None = None, via: str = "thumbnail"
    ) -> None:
        """Show ``display_set`` in the active viewport, as a user does: a double-click on
        its thumbnail (``via="thumbnail"``), or through the viewport grid service
        (``via="service"``). Returns once the viewport holds it."""
        viewport_id = self.active_viewport_id()
        if via == "thumbnail":
            # The id may hold dots ("pmap.<guid>"): an attribute selector, not "#id".
            thumb = self.page.locator(f'[id="thumbnail-{display_set.uid}"]')
            thumb.scroll_into_view_if_needed(timeout=(timeout_s or self.timeout_s) * 1000)
            thumb.dblclick(timeout=(timeout_s or self.timeout_s) * 1000)
        elif via == "service":
            self.page.evaluate(
                """([vp, uid]) => window.services.viewportGridService.setDisplaySetsForViewport(
                     {viewportId: vp, displaySetInstanceUIDs: [uid]})""",
                [viewport_id, display_set.uid],
            )
        else:
            raise ValueError(f"via must be 'thumbnail' or 'service', not {via!r}")
        self.wait_until(
            """([vp, uid]) => {
                 const st = window.services.viewportGridService.getState();
                 const v = st.viewports.get(vp);
                 return !!(v && (v.displaySetInstanceUIDs || []).includes(uid));
               }""",
            [viewport_id, display_set.uid],
            what=f"viewport {viewport_id} to hold display set {display_set.modality} {display_set.series_description!r}",
            timeout_s=timeout_s,
        )

    def viewport_info(self, viewport_id: str | None = None) -> dict[str, Any] | None:
        """Cornerstone's view of a viewport: type ("stack", "orthographic"...), actors, image id."""
        info = self.page.evaluate(_JS_VIEWPORT_INFO, viewport_id or self.active_viewport_id())
        return dict(info) if info else None

    # -- what is drawn ------------------------------------------------------------------------

    def canvas_stats(self, viewport_id: str | None = None) -> CanvasStats | None:
        found = self.page.evaluate(_JS_CANVAS, viewport_id or self.active_viewport_id())
        if not found:
            return None
        return CanvasStats(int(found["samples"]), int(found["nonBlack"]), int(found["coloured"]))

    def wait_for_image(
        self,
        *,
        viewport_id: str | None = None,
        colour: bool = False,
        min_coloured_fraction: float = 0.01,
        timeout_s: float | None = None,
    ) -> CanvasStats:
        """Wait until the viewport's canvas shows an image (not black); with ``colour``,
        one where at least ``min_coloured_fraction`` of the pixels are not grey (an RGB
        image, or a colour-mapped overlay on a grey one)."""

        def drawn() -> CanvasStats | None:
            stats = self.canvas_stats(viewport_id)
            if stats is None or not stats.has_image:
                return None
            if colour and stats.coloured_fraction < min_coloured_fraction:
                return None
            return stats

        what = "a colour image in the viewport" if colour else "an image in the viewport"
        result: CanvasStats = self.poll(drawn, what=what, timeout_s=timeout_s)
        return result

    def annotation_labels(self, viewport_id: str | None = None) -> list[str]:
        """Text lines drawn in the viewport's SVG annotation layer (SR text boxes,
        measurement labels), top to bottom as in the DOM."""
        return list(self.page.evaluate(_JS_SVG_LABELS, viewport_id or self.active_viewport_id()))

    def wait_for_annotation_labels(
        self,
        *,
        min_count: int = 1,
        contains: str | None = None,
        viewport_id: str | None = None,
        rerender: bool = True,
        timeout_s: float | None = None,
    ) -> list[str]:
        """Wait until the viewport shows at least ``min_count`` label lines (and, with
        ``contains``, one line containing that text).

        With ``rerender`` (the default) every poll asks cornerstone to render again, as a
        mouse movement over the viewport would: OHIF 3.13's SR viewport adds its
        annotations, then tells the display tool which ones to draw without asking for a
        render, so on a slow machine the last render can come before that and the boxes
        only appear at the next interaction.
        """

        def shown() -> list[str] | None:
            if rerender:
                self.page.evaluate(_JS_RENDER)
            labels = self.annotation_labels(viewport_id)
            if len(labels) < min_count:
                return None
            if contains is not None and not any(contains in line for line in labels):
                return None
            return labels

        what = f"{min_count}+ annotation label(s)" + (
            f" containing {contains!r}" if contains else ""
        )
        result: list[str] = self.poll(shown, what=what, timeout_s=timeout_s)
        return result

    def sr_step(self, direction: str = "next", *, viewport_id: str | None = None) -> None:
        """In an SR viewport, select the next (or "previous") measurement - the arrows at
        its top right. OHIF 3.13 moves only within the image shown: a measurement on an
        image of another display set (every DX/CR image is one) is not reached, and OHIF
        logs "No image URI found for <imageId>" as an error."""
        side = {"next": "right", "previous": "left"}[direction]
        pane = self._pane(viewport_id)
        pane.locator(f'[data-cy="viewport-action-arrows-{side}"]').click()

    def answer_tracking_prompt(self, *, track: bool, timeout_s: float = 10) -> bool:
        """Answer OHIF's "track measurements for this study?" prompt of an SR viewport
        (shown for SRs it could turn into editable measurements); False if it did not
        show up within ``timeout_s``. Answering yes (hydration) replaces the SR's display
        annotations by tracked measurements - or, where OHIF cannot convert a group,
        by nothing."""
        button = self.page.locator(f'[data-cy="{"yes" if track else "no"}-hydrate-btn"]')
        try:
            button.first.wait_for(state="visible", timeout=timeout_s * 1000)
        except Exception as exc:
            if type(exc).__name__ != "TimeoutError":
                raise
            return False
        button.first.click()
        return True

    def _pane(self, viewport_id: str | None) -> Any:
        vp = viewport_id or self.active_viewport_id()
        return self.page.locator(f'[data-viewportid="{vp}"]').locator(
            'xpath=ancestor::*[@data-cy="viewport-pane"][1]'
        )

    def annotations(self) -> list[dict[str, Any]]:
        """cornerstone3D annotations (SR display annotations included) with their labels."""
        return list(self.page.evaluate(_JS_ANNOTATIONS) or [])

    def measurements(self) -> list[dict[str, Any]]:
        """OHIF measurement service entries (tracked / hydrated measurements)."""
        return list(self.page.evaluate(_JS_MEASUREMENTS) or [])

    def measurement_panel_text(self) -> str:
        """Text of the right-hand measurements panel (opened if closed)."""
        button = self.page.locator('[data-cy="trackedMeasurements-btn"]')
        if button.count():
            panel = self.page.locator(
                '[data-cy="trackedMeasurements-panel"], [data-cy="measurements-panel"]'
            )
            if not panel.count():
                button.first.click()
        side = self.page.locator('[data-cy="side-panel-header-right"]').locator("xpath=../..")
        return str(side.first.inner_text()) if side.count() else ""

    def segmentations(self) -> list[dict[str, Any]]:
        """Segmentations OHIF holds (SEG, RTSTRUCT, ...), with segment labels."""
        return list(self.page.evaluate(_JS_SEGMENTATIONS) or [])

    def wait_for_overlay(
        self,
        display_set: DisplaySet | None = None,
        *,
        viewport_id: str | None = None,
        min_actors: int = 2,
        colour: bool = True,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Wait until the viewport fuses ``min_actors`` layers - OHIF draws a Parametric Map
        as a colour-mapped volume over its source - and, with ``display_set``, one of them
        is that display set's (a stale overlay of an earlier map does not count); with
        ``colour``, until colour is drawn."""

        def fused() -> dict[str, Any] | None:
            info = self.viewport_info(viewport_id)
            actors = (info or {}).get("actors") or []
            if len(actors) < min_actors:
                return None
            if display_set is not None and not any(
                display_set.uid in str(a.get("referencedId") or "") for a in actors
            ):
                return None
            return info

        what = f"{min_actors} fused layers in the viewport" + (
            f" including {display_set.series_description!r}" if display_set else ""
        )
        info: dict[str, Any] = self.poll(fused, what=what, timeout_s=timeout_s)
        if colour:
            self.wait_for_image(viewport_id=viewport_id, colour=True, timeout_s=timeout_s)
        return info

    def notifications(self) -> list[str]:
        """Toast messages on screen (OHIF reports load failures there)."""
        return list(self.page.evaluate(_JS_NOTIFICATIONS) or [])

    def screenshot(self, name: str) -> Path:
        path = self.screenshots / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path


def skip_unless_viewer_runs(sample: Path) -> None:
    """Skip (saying what is missing) unless Orthanc with DICOMweb, Chromium, Playwright, the
    fetched OHIF site and the ``sample`` study are all here."""
    import pytest

    from ddn_node.demo.ohif import OhifSite
    from ddn_node.demo.orthanc import DICOMWEB_PLUGIN
    from support.orthanc import orthanc_available

    if not orthanc_available():
        pytest.skip("Orthanc is not installed (Debian package orthanc)")
    if not DICOMWEB_PLUGIN.is_file():
        pytest.skip(
            f"Orthanc's DICOMweb plugin is missing ({DICOMWEB_PLUGIN}; Debian orthanc-dicomweb)"
        )
    if not chromium_available():
        pytest.skip("Debian chromium is not installed (/usr/bin/chromium)")
    if not playwright_available():
        pytest.skip("playwright is not installed (the test extras)")
    problem = OhifSite.at().missing
    if problem is not None:
        pytest.skip(problem)
    if not sample.is_file():
        pytest.skip(f"sample study missing: {sample}")
