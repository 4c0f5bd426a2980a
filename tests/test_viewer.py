"""The OHIF viewer at /viewer/ of a real ``pacsnode serve``: its files as
``scripts/install-viewer`` installed them (media types, cache headers, the
client-side routes, the generated app-config.js, the dashboard's sign-in),
the answer of a node without it, and OHIF itself in headless Chromium
(Debian's ``chromium`` with ``chromium-driver``, WebGL 2 from SwiftShader)
showing a phantom CT with a SEG and an SR made by the project's encoders and
stored by C-STORE, read back through the node's own ``/dicom-web``."""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest

from pacsnode.core.settings import DEFAULT_VIEWER_DIR
from pacsnode.lab.phantom import StudySpec, write_study
from pacsnode.workers.encode import read_source
from pacsnode.workers.volume import load_series
from tests.support import IN_CI, Node, node_config, storescu, wait_for
from tests.test_encode import Phantom, cls_result, encode, save, seg_result

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SLICES = 24
PAGE_TIMEOUT = 45.0


def _need_viewer() -> None:
    if not (DEFAULT_VIEWER_DIR / ".pacsnode-viewer").is_file():
        message = (
            f"the OHIF viewer is not installed in {DEFAULT_VIEWER_DIR}: scripts/install-viewer"
        )
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@dataclass(frozen=True)
class Stored:
    node: Node
    token: str
    study_uid: str
    accession: str


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stored]:
    """A node holding a phantom CT with the SEG and the SR that
    pacsnode's encoders make of a segmentation and a classification."""
    _need_viewer()
    root = tmp_path_factory.mktemp("viewer")
    written = write_study(
        root / "study", StudySpec(seed=7, size=128, slices=SLICES, modalities=("CT",), lesions=2)
    )
    paths = written.series["CT"]
    volume = load_series(paths)
    with np.load(written.masks) as saved:
        lesions = saved["lesions"]
    ct = Phantom(root / "study", paths, volume, read_source(paths, volume), lesions)
    results = root / "results"
    results.mkdir()
    objects = encode(ct, [seg_result(volume, ct.masks()), cls_result(volume)])
    assert [o.kind for o in objects] == ["SEG", "SR"]
    for obj in objects:
        save(obj, results)
    node = Node(
        data_dir=root / "node",
        database_url=f"sqlite:///{root / 'index.db'}",
        config=node_config(),
        serve_args=["--no-worker"],
    ).start()
    try:
        made = node.cli("tokens", "create", "--role", "read", "--name", "viewer")
        assert made.returncode == 0, made.stderr
        storescu(node, paths[0].parent)
        # dcmtk's storescu proposes no SEG context by default: pacsnode's own SCU.
        target = f"PACSNODE@127.0.0.1:{node.port}"
        sent = node.cli("send", str(results), target, "--calling-ae", "STORESCU")
        assert sent.returncode == 0, sent.stderr
        first = pydicom.dcmread(paths[0], stop_before_pixels=True)
        yield Stored(node, made.stdout.strip(), ct.study_uid, str(first.AccessionNumber))
    finally:
        node.stop()


def test_viewer_files_config_and_sign_in(stored: Stored) -> None:
    node = stored.node
    line = f"Open a study in the OHIF viewer: {node.api_url}/viewer/"
    wait_for(lambda: line in node.log(), 30, "the viewer in the next steps")
    client = httpx.Client(base_url=node.api_url, timeout=30)
    auth = {"Authorization": f"Bearer {stored.token}"}

    # Pages need the dashboard's sign-in and come back to where they were.
    page = f"/viewer/viewer?StudyInstanceUIDs={stored.study_uid}"
    bounced = client.get(page)
    assert bounced.status_code == 303
    assert bounced.headers["location"].startswith("/ui/login?next=%2Fviewer%2Fviewer%3F")
    assert client.get("/viewer/app-config.js").status_code == 401
    signed = httpx.Client(base_url=node.api_url, timeout=30)
    login = signed.post(
        "/ui/login", data={"token": stored.token, "next": page}, follow_redirects=False
    )
    assert login.status_code == 303 and login.headers["location"] == page
    for other in ("//evil.example/", "https://evil.example/", "/viewer/\r\nX-A: b", "/\\evil"):
        elsewhere = signed.post("/ui/login", data={"token": stored.token, "next": other})
        assert elsewhere.status_code == 303 and elsewhere.headers["location"] == "/ui/", other

    # index.html for every client-side route, rewritten to live under /viewer/.
    for route in ("/viewer/", page, "/viewer/segmentation?StudyInstanceUIDs=1.2.3"):
        html = signed.get(route)
        assert html.status_code == 200, route
        assert html.headers["content-type"].startswith("text/html")
        assert html.headers["cache-control"] == "no-cache"
        assert 'window.PUBLIC_URL="/viewer/"' in html.text
        assert 'src="/viewer/app-config.js"' in html.text
    assert client.get("/viewer").headers["location"] == "/viewer/"

    config = client.get("/viewer/app-config.js", headers=auth)
    assert config.status_code == 200
    assert config.headers["content-type"].startswith("text/javascript")
    text = config.text
    for expected in (
        '"routerBasename": "/viewer"',
        '"qidoRoot": window.location.origin + "/dicom-web"',
        '"wadoRoot": window.location.origin + "/dicom-web"',
        '"imageRendering": "wadors"',
        '"thumbnailRendering": "wadors"',
        '"supportsReject": false',
        '"supportsWildcard": true',
        '"supportsFuzzyMatching": false',
        '"omitQuotationForMultipartRequest": true',
        '"enableStudyLazyLoad": true',
    ):
        assert expected in text, expected

    # OHIF's own files: media types, a year for content-hashed names.
    bundle = next(DEFAULT_VIEWER_DIR.glob("app.bundle.*.js")).name
    wasm = next(DEFAULT_VIEWER_DIR.glob("*.wasm")).name
    for name, media, cache in (
        (bundle, "text/javascript", "private, max-age=31536000, immutable"),
        (wasm, "application/wasm", "private, max-age=31536000, immutable"),
        ("app.bundle.css", "text/css", "no-cache"),
        ("manifest.json", "application/json", "no-cache"),
    ):
        got = client.get(f"/viewer/{name}")
        assert got.status_code == 200, name
        assert got.headers["content-type"].split(";")[0] == media, name
        assert got.headers["cache-control"] == cache, name
        assert got.headers["x-content-type-options"] == "nosniff"
    assert b'__webpack_require__.p = "/viewer/"' in client.get(f"/viewer/{bundle}").content

    # Missing files, hidden files and paths out of the folder: 404 with a reason.
    for bad in ("/viewer/nope.js", "/viewer/.pacsnode-viewer", "/viewer/..%2f..%2fpyproject.toml"):
        missing = client.get(bad, headers=auth)
        assert missing.status_code == 404, bad
        assert "no such viewer file" in missing.json()["detail"]

    # The dashboard links to it.
    study_page = signed.get(f"/ui/studies/{stored.study_uid}").text
    assert f'href="/viewer/viewer?StudyInstanceUIDs={stored.study_uid}"' in study_page
    studies_page = signed.get("/ui/studies").text
    assert "Open in viewer" in studies_page and 'href="/viewer/" id="nav-viewer"' in studies_page


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_node_without_the_viewer_says_how_to_install_it(make_node: Any, tmp_path: Path) -> None:
    empty = tmp_path / "no-viewer"
    node = make_node(
        serve_args=["--no-worker"], env_extra={"PACSNODE_VIEWER_DIR": str(empty)}
    ).start()
    said = f"the OHIF viewer is not installed in {empty}: run scripts/install-viewer"
    wait_for(lambda: node.log().count(said) >= 2, 30, "the log line and the next steps")
    made = node.cli("tokens", "create", "--role", "read", "--name", "t")
    page = httpx.get(
        node.api_url + "/viewer/",
        headers={"Authorization": f"Bearer {made.stdout.strip()}"},
        timeout=30,
    )
    assert page.status_code == 404
    assert "scripts/install-viewer" in page.text and "not installed" in page.text
    # The rest of the node answers as usual.
    assert httpx.get(node.api_url + "/healthz", timeout=30).json() == {"status": "ok"}


# --- OHIF in headless Chromium -------------------------------------------------


def _browser(profile: Path) -> Any:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        message = "chromium and chromium-driver are not installed (scripts/install-debian-packages)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # WebGL 2 without a GPU: SwiftShader through ANGLE.
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--use-angle=swiftshader",
        "--enable-unsafe-swiftshader",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--window-size=1400,900",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


@pytest.fixture
def browser() -> Iterator[Any]:
    with tempfile.TemporaryDirectory(prefix="pacsnode-chromium-") as profile:
        driver = _browser(Path(profile))
        try:
            yield driver
        finally:
            driver.quit()


# Pixels of the viewport's canvas: how many are not black, how many are the
# segmentation's red (the CT is grey: red clearly above green and blue).
CANVAS_PIXELS = """
const canvas = document.querySelector('[data-cy="viewport-pane"] canvas');
if (!canvas || !canvas.width) return null;
const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
let lit = 0, red = 0;
for (let i = 0; i < data.length; i += 4) {
  if (data[i] + data[i + 1] + data[i + 2] > 60) lit++;
  if (data[i] > data[i + 1] + 60 && data[i] > data[i + 2] + 60) red++;
}
return [lit, red];
"""


@pytest.mark.slow
def test_ohif_shows_the_study_its_segments_and_report(
    stored: Stored, browser: Any, request: pytest.FixtureRequest
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    node = stored.node
    probe = httpx.get(
        node.api_url + "/dicom-web/studies",
        headers={"Authorization": f"Bearer {stored.token}", "Accept": "application/dicom+json"},
        timeout=30,
    )
    if probe.status_code == 404 and not IN_CI:
        pytest.skip("this node has no DICOMweb service (/dicom-web) yet")
    assert probe.status_code == 200, probe.text

    def body() -> str:
        return str(browser.find_element(By.TAG_NAME, "body").text)

    def element(xpath: str) -> Any:
        found = browser.find_elements(By.XPATH, xpath)
        return found[0] if found and found[0].is_displayed() else None

    started = time.monotonic()
    # Sign in through the dashboard's form, sent there by the viewer.
    browser.get(node.api_url + "/viewer/")
    wait_for(lambda: "/ui/login?next=" in browser.current_url, PAGE_TIMEOUT, "the login page")
    browser.find_element(By.ID, "token").send_keys(stored.token)
    browser.find_element(By.ID, "signin").click()
    wait_for(lambda: browser.current_url.endswith("/viewer/"), PAGE_TIMEOUT, "the viewer again")
    # OHIF's study list, from QIDO-RS.
    wait_for(lambda: stored.accession in body(), PAGE_TIMEOUT, "the study in OHIF's study list")
    assert "CT\\SEG\\SR" in body()
    # No first-visit tour over the images (it is for people, not for this test).
    browser.execute_script(
        "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))"
    )

    # Open the study from the dashboard's study page.
    browser.get(f"{node.api_url}/ui/studies/{stored.study_uid}")
    browser.find_element(By.ID, "open-viewer").click()
    wait_for(
        lambda: re.search(rf"I:\s*\d+ \(\d+/{SLICES}\)", body()), PAGE_TIMEOUT, "the CT in view"
    )
    lit = wait_for(
        lambda: (browser.execute_script(CANVAS_PIXELS) or [0])[0] > 10_000,
        PAGE_TIMEOUT,
        "CT pixels on the canvas",
    )
    assert lit
    assert "AI SR measurement report (demo, not clinical)" in body()

    # The SEG: loaded on request, its overlay drawn, its segments listed.
    seg = wait_for(
        lambda: element("//*[contains(text(), 'AI SEG ct-lesion-segmenter')]"),
        PAGE_TIMEOUT,
        "the SEG in the study browser",
    )
    ActionChains(browser).double_click(seg).perform()
    wait_for(
        lambda: element("//button[normalize-space()='Yes']"), PAGE_TIMEOUT, "OHIF's SEG prompt"
    ).click()
    wait_for(
        lambda: (browser.execute_script(CANVAS_PIXELS) or [0, 0])[1] > 20,
        PAGE_TIMEOUT,
        "the segmentation overlay",
    )
    browser.find_element(By.CSS_SELECTOR, '[data-cy="panelSegmentation-btn"]').click()
    lines = wait_for(
        lambda: {"lesion", "mass"} <= set(body().splitlines()) and body().splitlines(),
        PAGE_TIMEOUT,
        "the segment labels in the segmentation panel",
    )
    assert "Segmentations" in lines
    elapsed = time.monotonic() - started
    request.node.user_properties.append(("browser_s", round(elapsed, 1)))
    assert elapsed < 60, f"the viewer took {elapsed:.0f}s"
    screenshot = os.environ.get("PACSNODE_SCREENSHOT")
    if screenshot:  # how docs/images/viewer.png is made
        # Without OHIF's notice on the SEG's missing display colours.
        wait_for(lambda: "DICOM SEG import" not in body(), 30, "the SEG notice to close")
        browser.save_screenshot(screenshot)


# --- scripts/install-viewer -----------------------------------------------------


def _installer() -> Any:
    """scripts/install-viewer as a module (it has no .py suffix)."""
    import importlib.machinery
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "install-viewer"
    loader = importlib.machinery.SourceFileLoader("install_viewer", str(path))
    spec = importlib.util.spec_from_loader("install_viewer", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_install_viewer_is_idempotent_and_checks_what_it_unpacks(tmp_path: Path) -> None:
    import subprocess
    import tarfile

    _need_viewer()
    script = Path(__file__).resolve().parent.parent / "scripts" / "install-viewer"
    again = subprocess.run([str(script)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert "already installed" in again.stdout
    installer = _installer()
    assert (DEFAULT_VIEWER_DIR / ".pacsnode-viewer").read_text() == installer.stamp_text()
    assert not (DEFAULT_VIEWER_DIR / "app-config.js").exists()  # the node makes its own

    # Other bytes than the pinned release: refused.
    forged = tmp_path / "ohif-app-3.13.2.tgz"
    forged.write_bytes(b"not the release")
    with pytest.raises(SystemExit):
        installer.verify(forged)
    # A member that would land outside the folder: refused.
    hostile = tmp_path / "hostile.tgz"
    payload = tmp_path / "payload"
    payload.write_text("x")
    with tarfile.open(hostile, "w:gz") as archive:
        archive.add(payload, arcname="package/dist/../../escaped")
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(SystemExit):
        installer.unpack(hostile, target)
    assert not (tmp_path / "escaped").exists()
