"""Check a `tailwise report` HTML page in a real headless browser (Chromium), without CDP.

    python benchmarks/check_report_html.py REPORT_DIR [--chromium /usr/bin/chromium] [--screenshot PATH] [--width 1280]

1. Static check of report.html: the results table (``table#results``) has a header with the paper's columns and at
   least one body row; every <img> has a non-empty ``data:image/png;base64,`` URI that decodes to a PNG (signature
   and IHDR with non-zero width/height).
2. Browser check: a copy of the page with a small script appended (in a temporary directory; the report itself is
   not modified) is rendered with ``chromium --headless --dump-dom``. On the window ``load`` event the script writes
   each image's ``complete``/``naturalWidth``/``naturalHeight`` and the page height into DOM attributes, so the dumped
   DOM shows whether Chromium actually decoded every image and laid out the table -- a CDP-free check.
3. Screenshot of the unmodified page at the measured page height (``--screenshot``, default
   REPORT_DIR/report_screenshot.png).

Exit 0 when every check passes, 1 when one fails (each failure printed), 2 when Chromium is missing.
"""
from __future__ import annotations

import argparse
import base64
import shutil
import struct
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--virtual-time-budget=10000"]
PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img');
  for (var i = 0; i < imgs.length; i++) {
    var im = imgs[i];
    im.setAttribute('data-probe', [im.complete ? 1 : 0, im.naturalWidth, im.naturalHeight].join(','));
  }
  var t = document.getElementById('results');
  document.body.setAttribute('data-table-rows', t ? t.tBodies[0].rows.length : -1);
  document.body.setAttribute('data-page-height', document.documentElement.scrollHeight);
  document.body.setAttribute('data-probe-done', '1');
});
</script>"""
COLUMNS = ["Method", "F(%)", "Head", "Medium", "Tail", "All", "C(%)", "C/F"]


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs: list[dict] = []
        self.body: dict = {}
        self.in_table = False
        self.in_th = False
        self.in_tbody = False
        self.headers: list[str] = []
        self.rows = 0
        self.has_table = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        elif tag == "body":
            self.body = a
        elif tag == "table" and a.get("id") == "results":
            self.in_table = self.has_table = True
        elif self.in_table and tag == "th":
            self.in_th = True
            self.headers.append("")
        elif self.in_table and tag == "tbody":
            self.in_tbody = True
        elif self.in_tbody and tag == "tr":
            self.rows += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self.in_table = self.in_tbody = False
        elif tag == "th":
            self.in_th = False

    def handle_data(self, data):
        if self.in_th and self.headers:
            self.headers[-1] += data


def parse(text: str) -> Page:
    p = Page()
    p.feed(text)
    return p


def png_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])


def static_checks(page: Page) -> list[str]:
    errors = []
    if not page.has_table:
        errors.append("no <table id=results> in report.html")
    else:
        for col in COLUMNS:
            if not any(h.strip().startswith(col) for h in page.headers):
                errors.append(f"results table lacks the column {col!r} (headers: {page.headers})")
        if page.rows < 1:
            errors.append("results table has no body rows")
    if not page.imgs:
        errors.append("report.html has no <img>")
    for i, img in enumerate(page.imgs):
        src, alt = img.get("src") or "", img.get("alt", f"image {i}")
        prefix = "data:image/png;base64,"
        if not src.startswith(prefix) or len(src) == len(prefix):
            errors.append(f"<img alt={alt!r}>: src is not a non-empty PNG data URI ({src[:40]!r})")
            continue
        try:
            size = png_size(base64.b64decode(src[len(prefix):], validate=True))
        except ValueError as exc:
            errors.append(f"<img alt={alt!r}>: base64 does not decode ({exc})")
            continue
        if not size or 0 in size:
            errors.append(f"<img alt={alt!r}>: decoded data is not a PNG with a non-zero size")
    return errors


def chromium(exe: str, args: list[str], user_dir: str) -> subprocess.CompletedProcess:
    """Run the headless browser ``exe`` with ``args`` and the profile directory ``user_dir`` (at most 120 s)."""
    return subprocess.run([exe, *FLAGS, f"--user-data-dir={user_dir}", *args], capture_output=True, text=True,
                          timeout=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report_dir", type=Path)
    ap.add_argument("--chromium", default=None, help="browser binary (default: /usr/bin/chromium, then PATH)")
    ap.add_argument("--screenshot", type=Path, default=None)
    ap.add_argument("--width", type=int, default=1280)
    ns = ap.parse_args(argv)

    candidates = [ns.chromium] if ns.chromium else ["/usr/bin/chromium", shutil.which("chromium"),
                                                    shutil.which("chromium-browser")]
    exe = next((c for c in candidates if c and Path(c).exists()), None)
    if not exe:
        print("error: Chromium not found. Install it with:\n  apt-get update && apt-get install -y chromium",
              file=sys.stderr)
        return 2
    html_path = ns.report_dir / "report.html"
    if not html_path.is_file():
        print(f"error: {html_path} not found; run `tailwise report RUN_DIR... --out {ns.report_dir}` first",
              file=sys.stderr)
        return 2
    text = html_path.read_text()
    errors = static_checks(parse(text))

    with tempfile.TemporaryDirectory(prefix="tw-chromium-") as tmp:
        probe = Path(tmp) / "probe.html"
        probe.write_text(text.replace("</body>", PROBE + "</body>") if "</body>" in text else text + PROBE)
        proc = chromium(exe, ["--dump-dom", probe.as_uri()], str(Path(tmp) / "profile"))
        dom = parse(proc.stdout)
        if proc.returncode != 0 or not proc.stdout.strip():
            errors.append(f"chromium --dump-dom failed (rc {proc.returncode}): {proc.stderr.strip()[-500:]}")
        elif dom.body.get("data-probe-done") != "1":
            errors.append("the page's load event did not fire in Chromium (probe attributes missing)")
        else:
            if not dom.has_table or int(dom.body.get("data-table-rows", -1)) < 1:
                errors.append("Chromium's DOM has no results table rows")
            if len(dom.imgs) != len(parse(text).imgs):
                errors.append(f"Chromium's DOM has {len(dom.imgs)} images, report.html {len(parse(text).imgs)}")
            for img in dom.imgs:
                done, w, h = (img.get("data-probe") or "0,0,0").split(",")
                if done != "1" or int(w) == 0 or int(h) == 0:
                    errors.append(f"<img alt={img.get('alt')!r}> did not load in Chromium (complete={done}, {w}x{h})")
        height = min(16000, max(800, int(dom.body.get("data-page-height", 3000) or 3000)))
        shot = (ns.screenshot or ns.report_dir / "report_screenshot.png").resolve()
        proc = chromium(exe, [f"--screenshot={shot}", f"--window-size={ns.width},{height}",
                              html_path.resolve().as_uri()], str(Path(tmp) / "profile2"))
        if proc.returncode != 0 or not shot.is_file() or png_size(shot.read_bytes()[:32]) is None:
            errors.append(f"chromium --screenshot failed (rc {proc.returncode}): {proc.stderr.strip()[-500:]}")

    n_img = len(dom.imgs)
    if errors:
        for e in errors:
            print(f"FAIL: {e}")
        return 1
    print(f"OK: {html_path}: results table with {dom.body.get('data-table-rows')} rows, {n_img} images all decoded "
          f"by Chromium ({exe}); screenshot {shot} ({ns.width}x{height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
