#!/usr/bin/env python3
"""Check the built book the way a reader sees it (stdlib + headless Chromium).

Run after ``jupyter-book build`` has written ``_build/html``::

    python .ci/check_site.py                         # defaults below
    python .ci/check_site.py --html _build/html \\
        --page chapters/1-transformers/03-attention.html \\
        --screenshots _build/screenshots

Checks (one PASS/FAIL line each in the summary; exit code 0 only if all pass):

math-typeset      every --page, opened in headless Chromium over HTTP, has MathJax
                  output (``mjx-container``) in its rendered DOM -- at least one, and
                  at least as many as the page has math nodes -- and no MathJax error.
no-external-loads nothing is loaded from outside the site: a static scan of every
                  .html file (script src, link rel=stylesheet/preload/icon..., img,
                  iframe, source, video/audio, embed, object, @import/url() in <style>
                  and style="..."), the .css files under _static (@import / url() of
                  another host), the rendered DOM of the opened pages, and Chromium's
                  own network log of every request those pages made.  Plain <a href>
                  links (GitHub, Colab, Binder) are navigation, not loads, and are fine.
local-assets      every request the opened pages made to the local server succeeded
                  (no 404 for a stylesheet, script or font; /favicon.ico is ignored).
launch-buttons    each --page has a Colab and a Binder launch link, and both point at
                  an .ipynb that exists in the repository (and at the repository of
                  _config.yml's repository.url, when set).
source-links      the "edit this page" link points at an existing repository file and
                  the "download source" link at an existing file of the built site.
screenshots       (only with --screenshots DIR) a PNG of each --page and of index.html
                  (which jupyter-book makes a redirect to the root page, e.g. intro).

Chromium: /usr/bin/chromium (Debian package; see .ci/install_chromium.sh), or
--chromium PATH, or the CHROMIUM environment variable.  Host names other than
127.0.0.1 are made unresolvable inside Chromium (--host-resolver-rules), so an
external load fails fast instead of hanging, and the check never leaves the machine.
"""
from __future__ import annotations

import argparse
import functools
import html.parser
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

DEFAULT_PAGE = "chapters/1-transformers/03-attention.html"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
CHROMIUM_CANDIDATES = ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    # Every name but the local server resolves to nothing: an external load is
    # still attempted (and logged in the net log) but fails at once.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
]
# <link rel=...> values that make the browser fetch the href.
LOADING_RELS = {"stylesheet", "preload", "modulepreload", "prefetch", "icon",
                "shortcut", "apple-touch-icon", "mask-icon", "manifest"}
# tag -> attributes whose URL the browser fetches.
LOADING_ATTRS = {
    "script": ("src",),
    "img": ("src", "srcset"),
    "iframe": ("src",),
    "frame": ("src",),
    "source": ("src", "srcset"),
    "video": ("src", "poster"),
    "audio": ("src",),
    "track": ("src",),
    "embed": ("src",),
    "object": ("data",),
    "input": ("src",),
}
CSS_URL_RE = re.compile(
    r"""@import\s+(?:url\(\s*)?['"]?([^'")\s;]+)|url\(\s*['"]?([^'")\s]+)""", re.I)


# --------------------------------------------------------------------------- helpers
def is_external(url: str) -> bool:
    """True if fetching ``url`` would leave the site (scheme+host not local)."""
    url = url.strip()
    if not url:
        return False
    if url.startswith("//"):
        url = "http:" + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("data", "blob", "about", "javascript", "mailto", "tel"):
        return False
    if not parts.netloc:
        return False  # relative, or file:///...
    host = (parts.hostname or "").lower()
    return host not in LOCAL_HOSTS


def srcset_urls(value: str) -> list[str]:
    return [item.strip().split()[0] for item in value.split(",") if item.strip()]


def css_urls(text: str) -> list[str]:
    return [m.group(1) or m.group(2) for m in CSS_URL_RE.finditer(text)]


class LoadScanner(html.parser.HTMLParser):
    """Collects the URLs a page makes the browser fetch, plus its <a href> links."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.loads: list[tuple[str, str]] = []   # (what, url)
        self.links: list[tuple[str, dict]] = []  # (href, attrs)
        self.math_nodes = 0
        self.mjx_containers = 0
        self.mjx_errors: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        a = {k: (v or "") for k, v in attrs}
        if tag == "link":
            rels = set(a.get("rel", "").lower().split())
            if rels & LOADING_RELS and a.get("href"):
                self.loads.append((f"<link rel={a.get('rel')}>", a["href"]))
        for attr in LOADING_ATTRS.get(tag, ()):
            if a.get(attr):
                urls = srcset_urls(a[attr]) if attr == "srcset" else [a[attr]]
                self.loads.extend((f"<{tag} {attr}>", u) for u in urls)
        if a.get("style"):
            self.loads.extend((f"<{tag} style>", u) for u in css_urls(a["style"]))
        if tag == "style":
            self._in_style = True
        if tag == "a" and a.get("href"):
            self.links.append((a["href"], a))
        if "math" in a.get("class", "").split():
            self.math_nodes += 1
        if tag == "mjx-container":
            self.mjx_containers += 1
        if tag == "mjx-merror":
            self.mjx_errors.append(a.get("data-mjx-error") or a.get("title") or "?")

    def handle_endtag(self, tag):
        if tag == "style":
            self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.loads.extend(("<style>", u) for u in css_urls(data))


def scan_html(text: str) -> LoadScanner:
    scanner = LoadScanner()
    scanner.feed(text)
    scanner.close()
    return scanner


def find_chromium(explicit: str | None) -> str | None:
    for cand in [explicit, os.environ.get("CHROMIUM")] + CHROMIUM_CANDIDATES:
        if cand:
            path = shutil.which(cand)
            if path:
                return path
    return None


def repo_url_from_config(repo: Path) -> tuple[str, str] | None:
    """(owner, name) from _config.yml's repository.url, parsed without yaml."""
    cfg = repo / "_config.yml"
    if not cfg.is_file():
        return None
    in_repo = False
    for line in cfg.read_text(encoding="utf-8").splitlines():
        if re.match(r"^repository\s*:", line):
            in_repo = True
            continue
        if in_repo and line and not line[0].isspace():
            break
        m = re.match(r"^\s+url\s*:\s*['\"]?([^'\"\s#]+)", line) if in_repo else None
        if m:
            path = urllib.parse.urlsplit(m.group(1)).path.strip("/").removesuffix(".git")
            bits = path.split("/")
            return (bits[0], bits[1]) if len(bits) >= 2 else None
    return None


# --------------------------------------------------------------------------- server
class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Logs nothing; records (path, status) of each request on the server."""

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass

    def log_request(self, code="-", size="-"):
        try:
            code = int(code)
        except (TypeError, ValueError):
            code = 0
        self.server.records.append((urllib.parse.urlsplit(self.path).path, code))


class SiteServer:
    """Serves ``root`` on 127.0.0.1:<free port> from a background thread."""

    def __init__(self, root: Path) -> None:
        handler = functools.partial(QuietHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.records = []
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    @property
    def records(self) -> list[tuple[str, int]]:
        return self.httpd.records


# --------------------------------------------------------------------------- chromium
class Chromium:
    def __init__(self, binary: str, budget_ms: int, timeout_s: int, verbose: bool) -> None:
        self.binary = binary
        self.budget_ms = budget_ms
        self.timeout_s = timeout_s
        self.verbose = verbose
        self.timings: list[tuple[str, float]] = []

    def _run(self, label: str, extra: list[str], url: str) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="check-site-chromium-") as profile:
            cmd = [self.binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                   f"--virtual-time-budget={self.budget_ms}", *extra, url]
            t0 = time.monotonic()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True,
                                      timeout=self.timeout_s, stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError(f"chromium timed out after {self.timeout_s}s on {url}") from exc
            finally:
                self.timings.append((label, time.monotonic() - t0))
        if self.verbose and proc.stderr:
            print(proc.stderr, file=sys.stderr)
        return proc

    def dump_dom(self, url: str, netlog: Path) -> str:
        proc = self._run(f"dump-dom {url}", [f"--log-net-log={netlog}", "--dump-dom"], url)
        if proc.returncode != 0 or "<html" not in proc.stdout.lower():
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise RuntimeError(f"chromium --dump-dom failed (rc={proc.returncode}) on {url}:\n{tail}")
        return proc.stdout

    def screenshot(self, url: str, out: Path) -> None:
        out.unlink(missing_ok=True)
        proc = self._run(f"screenshot {url}",
                         [f"--screenshot={out}", "--window-size=1280,2400"], url)
        if not out.is_file() or out.stat().st_size == 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise RuntimeError(f"no screenshot written for {url} (rc={proc.returncode}):\n{tail}")


def netlog_requests(path: Path) -> list[tuple[str, str]]:
    """(initiator, url) of every URL request in a Chromium --log-net-log file."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    # The file is {"constants":{...},\n"events": [\n{event},\n{event},\n...]}: one
    # event per line, so a file cut short (Chromium killed) can still be read line by line.
    lines = text.splitlines()
    try:
        first = json.loads(lines[0].rstrip().rstrip(",") + "}") if lines else {}
        types = {v: k for k, v in first.get("constants", {}).get("logEventTypes", {}).items()}
    except ValueError:
        types = {}
    start_job = {v for v, k in types.items() if k == "URL_REQUEST_START_JOB"}
    out = []
    for line in lines[1:]:
        line = line.strip().rstrip(",")
        if not line.startswith("{") or '"url"' not in line:
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        params = ev.get("params") or {}
        if "url" in params and (ev.get("type") in start_job or not start_job):
            out.append((str(params.get("initiator", "")), str(params["url"])))
    return out


# --------------------------------------------------------------------------- checks
class Report:
    def __init__(self) -> None:
        self.results: list[tuple[str, bool, str]] = []

    def add(self, name: str, problems: list[str], ok_note: str = "") -> None:
        ok = not problems
        self.results.append((name, ok, ok_note if ok else f"{len(problems)} problem(s)"))
        if not ok:
            print(f"FAIL {name}:")
            for p in problems:
                print(f"  - {p}")

    def summary(self) -> bool:
        print("\nSummary:")
        width = max(len(n) for n, _, _ in self.results)
        for name, ok, note in self.results:
            word = "PASS" if ok else "FAIL"
            print(f"  {word}  {name.ljust(width)}  {note}")
        return all(ok for _, ok, _ in self.results)


def static_external_loads(html_root: Path) -> tuple[list[str], int, int]:
    problems = []
    n_html = n_css = 0
    for f in sorted(html_root.rglob("*.html")):
        n_html += 1
        rel = f.relative_to(html_root)
        scanner = scan_html(f.read_text(encoding="utf-8", errors="replace"))
        for what, url in scanner.loads:
            if is_external(url):
                problems.append(f"{rel}: {what} loads {url}")
    static = html_root / "_static"
    for f in sorted(static.rglob("*.css")) if static.is_dir() else []:
        n_css += 1
        rel = f.relative_to(html_root)
        for url in css_urls(f.read_text(encoding="utf-8", errors="replace")):
            if is_external(url):
                problems.append(f"{rel}: CSS @import/url() loads {url}")
    return problems, n_html, n_css


def parse_launch_links(links: list[tuple[str, dict]]) -> dict[str, list[dict]]:
    """Colab / Binder / edit / source links of a page, each with its repo-relative path."""
    found: dict[str, list[dict]] = {"colab": [], "binder": [], "edit": [], "source": []}
    for href, _attrs in links:
        parts = urllib.parse.urlsplit(href)
        host = (parts.hostname or "").lower()
        if href.startswith("https://colab.research.google.com/github/"):
            bits = parts.path.split("/")  # '', 'github', owner, repo, 'blob', branch, path...
            if len(bits) >= 7 and bits[4] == "blob":
                found["colab"].append({"href": href, "owner": bits[2], "repo": bits[3],
                                       "branch": bits[5], "path": "/".join(bits[6:])})
            else:
                found["colab"].append({"href": href, "path": None})
        elif "mybinder.org" in host or "/v2/gh/" in parts.path:
            query = urllib.parse.parse_qs(parts.query)
            path = None
            if "urlpath" in query:
                up = query["urlpath"][0].lstrip("/")
                up = re.sub(r"^(lab/tree|tree|notebooks|lab|doc/tree|voila/render)/", "", up)
                path = up
            elif "filepath" in query:
                path = query["filepath"][0].lstrip("/")
            bits = parts.path.split("/")  # '', 'v2', 'gh', owner, repo, branch
            info = {"href": href, "path": path}
            if len(bits) >= 6 and bits[1:3] == ["v2", "gh"]:
                info.update(owner=bits[3], repo=bits[4], branch="/".join(bits[5:]))
            found["binder"].append(info)
        elif host == "github.com" and "/edit/" in parts.path:
            bits = parts.path.split("/")  # '', owner, repo, 'edit', branch, path...
            if len(bits) >= 6 and bits[3] == "edit":
                found["edit"].append({"href": href, "owner": bits[1], "repo": bits[2],
                                      "path": "/".join(bits[5:])})
        elif not parts.netloc and "_sources/" in parts.path:
            found["source"].append({"href": href, "path": parts.path})
    return found


def check_launch(page: str, html_root: Path, repo: Path, links, expected_repo,
                 launch_problems: list[str], source_problems: list[str]) -> None:
    found = parse_launch_links(links)
    for kind, label in (("colab", "Colab"), ("binder", "Binder")):
        if not found[kind]:
            launch_problems.append(f"{page}: no {label} launch link found")
        for info in found[kind]:
            path = info.get("path")
            if not path:
                launch_problems.append(f"{page}: cannot read a notebook path from {label} link "
                                       f"{info['href']}")
                continue
            path = urllib.parse.unquote(path)
            if not path.endswith(".ipynb"):
                launch_problems.append(f"{page}: {label} link points at {path}, not an .ipynb")
            elif not (repo / path).is_file():
                launch_problems.append(f"{page}: {label} link points at {path}, which does not "
                                       f"exist in {repo}")
            if expected_repo and "owner" in info and \
                    (info["owner"], info["repo"]) != expected_repo:
                launch_problems.append(
                    f"{page}: {label} link is for {info['owner']}/{info['repo']}, _config.yml "
                    f"repository.url is {'/'.join(expected_repo)}")
    for info in found["edit"]:
        path = urllib.parse.unquote(info["path"])
        if not (repo / path).is_file():
            source_problems.append(f"{page}: edit link points at {path}, which does not exist "
                                   f"in {repo}")
    for info in found["source"]:
        target = (html_root / page).parent / urllib.parse.unquote(info["path"])
        if not target.resolve().is_file():
            source_problems.append(f"{page}: download-source link {info['href']} is missing "
                                   f"from the built site")
    if not found["edit"] and not found["source"]:
        source_problems.append(f"{page}: neither an edit-this-page nor a source link found")


def screenshot_name(page: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "__", page.strip("/")).removesuffix(".html") + ".png"


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=here.parent,
                    help="repository root (default: the parent of .ci/)")
    ap.add_argument("--html", type=Path, default=None,
                    help="built site (default: REPO/_build/html)")
    ap.add_argument("--page", action="append", default=None,
                    help=f"chapter page to open, relative to --html (repeatable; "
                         f"default {DEFAULT_PAGE})")
    ap.add_argument("--screenshots", type=Path, default=None,
                    help="write PNG screenshots of the pages and of index.html here")
    ap.add_argument("--chromium", default=None, help="Chromium binary (default: chromium)")
    ap.add_argument("--budget-ms", type=int, default=15000,
                    help="Chromium --virtual-time-budget in ms (default 15000)")
    ap.add_argument("--timeout", type=int, default=120,
                    help="wall-clock limit per Chromium run in s (default 120)")
    ap.add_argument("-v", "--verbose", action="store_true", help="show Chromium's stderr")
    args = ap.parse_args(argv)

    repo = args.repo.resolve()
    html_root = (args.html or repo / "_build" / "html").resolve()
    pages = [p.lstrip("/") for p in (args.page or [DEFAULT_PAGE])]
    report = Report()
    t_start = time.monotonic()

    if not html_root.is_dir():
        print(f"FAIL: no built site at {html_root} (run jupyter-book build first)")
        return 2
    missing = [p for p in pages if not (html_root / p).is_file()]
    if missing:
        report.add("pages-exist", [f"{p} is not in {html_root}" for p in missing])
        pages = [p for p in pages if p not in missing]

    # ---- static scan: every .html, every _static/*.css
    static_problems, n_html, n_css = static_external_loads(html_root)
    external_problems = list(static_problems)
    print(f"static scan: {n_html} .html files, {n_css} .css files under _static, "
          f"{len(static_problems)} external load(s)")

    # ---- launch buttons / source links (from the page files as built)
    expected_repo = repo_url_from_config(repo)
    launch_problems: list[str] = []
    source_problems: list[str] = []
    for page in pages:
        scanner = scan_html((html_root / page).read_text(encoding="utf-8", errors="replace"))
        check_launch(page, html_root, repo, scanner.links, expected_repo,
                     launch_problems, source_problems)

    # ---- the pages in a browser
    chromium_path = find_chromium(args.chromium)
    math_problems: list[str] = []
    asset_problems: list[str] = []
    shot_problems: list[str] = []
    math_notes: list[str] = []
    browser = None
    if chromium_path is None:
        msg = "no Chromium found (install: bash .ci/install_chromium.sh, or pass --chromium)"
        math_problems.append(msg)
        external_problems.append("rendered pages not checked: " + msg)
    else:
        browser = Chromium(chromium_path, args.budget_ms, args.timeout, args.verbose)
        with SiteServer(html_root) as server, \
                tempfile.TemporaryDirectory(prefix="check-site-") as tmp:
            print(f"serving {html_root} at {server.base}; chromium: {chromium_path}")
            for i, page in enumerate(pages):
                url = server.base + urllib.parse.quote(page)
                static_scan = scan_html((html_root / page).read_text(encoding="utf-8",
                                                                     errors="replace"))
                netlog = Path(tmp) / f"netlog-{i}.json"
                try:
                    dom = browser.dump_dom(url, netlog)
                except RuntimeError as exc:
                    math_problems.append(str(exc))
                    external_problems.append(f"{page}: not rendered: {exc}")
                    continue
                rendered = scan_html(dom)
                print(f"{page}: {rendered.mjx_containers} mjx-container element(s) rendered "
                      f"for {static_scan.math_nodes} math node(s) in the HTML")
                math_notes.append(f"{rendered.mjx_containers} mjx-container on {page}")
                if rendered.mjx_containers == 0:
                    math_problems.append(f"{page}: no <mjx-container> in the rendered DOM "
                                         f"(MathJax did not typeset; is it loaded?)")
                elif rendered.mjx_containers < static_scan.math_nodes:
                    math_problems.append(f"{page}: only {rendered.mjx_containers} of "
                                         f"{static_scan.math_nodes} math nodes typeset")
                if rendered.mjx_errors:
                    math_problems.append(f"{page}: {len(rendered.mjx_errors)} MathJax error(s) "
                                         f"(bad TeX?): " + "; ".join(rendered.mjx_errors[:10]))
                for what, u in rendered.loads:
                    if is_external(u):
                        external_problems.append(f"{page} (rendered DOM): {what} loads {u}")
                origin = server.base.rstrip("/")
                for initiator, u in netlog_requests(netlog):
                    # Requests the page made (Chromium's own background requests have
                    # no page origin as initiator).
                    if initiator.rstrip("/") == origin and is_external(u):
                        external_problems.append(f"{page} (network): requested {u}")
            seen_404 = sorted({p for p, code in server.records
                               if code >= 400 and p != "/favicon.ico"})
            asset_problems.extend(f"local request failed: {p}" for p in seen_404)

            if args.screenshots:
                out_dir = args.screenshots.resolve()
                out_dir.mkdir(parents=True, exist_ok=True)
                targets = list(pages)
                if (html_root / "index.html").is_file():
                    targets.append("index.html")
                for page in dict.fromkeys(targets):
                    out = out_dir / screenshot_name(page)
                    try:
                        browser.screenshot(server.base + urllib.parse.quote(page), out)
                        print(f"screenshot: {out}")
                    except RuntimeError as exc:
                        shot_problems.append(str(exc))

    # ---- report
    report.add("math-typeset", math_problems, "; ".join(math_notes))
    report.add("no-external-loads", external_problems,
               f"{n_html} html + {n_css} css scanned, {len(pages)} page(s) rendered")
    if browser is not None:
        report.add("local-assets", asset_problems, "no failed requests to the local server")
    report.add("launch-buttons", launch_problems, "Colab + Binder point at existing notebooks")
    report.add("source-links", source_problems, "edit/source links point at existing files")
    if args.screenshots:
        report.add("screenshots", shot_problems, f"written to {args.screenshots}")
    ok = report.summary()
    if browser is not None:
        total = sum(t for _, t in browser.timings)
        print(f"chromium: {len(browser.timings)} run(s), {total:.1f}s in all "
              f"(virtual time budget {args.budget_ms} ms); whole check "
              f"{time.monotonic() - t_start:.1f}s")
    print("check_site: OK" if ok else "check_site: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
