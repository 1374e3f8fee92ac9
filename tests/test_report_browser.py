"""report.html in a real browser: it renders, and its first screen holds the verdicts, the
limitations and the evidence to cite.

Headless Chromium loads a copy of the report with a script appended that measures those three
sections (and the page's width) once laid out and writes the numbers into the page, which
`--dump-dom` then prints; a screenshot of the first screen must be a real picture. No Python
dependency beyond the standard library: the PNG is decoded with zlib.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from .conftest import require_binary
from .factories import gputally_command
from .test_report import MAR_1, signed_ledger

WIDTH, HEIGHT = 1280, 800
# Measured in the page once laid out, and written into it for --dump-dom to print.
MEASURE = """
<script>
(function () {
  var out = {viewport: [window.innerWidth, window.innerHeight],
             scroll_width: document.documentElement.scrollWidth};
  ["simulated", "verdicts", "limitations", "evidence"].forEach(function (id) {
    var e = id === "simulated" ? document.querySelector(".simulated") : document.getElementById(id);
    if (!e) { out[id] = null; return; }
    var r = e.getBoundingClientRect();
    out[id] = {top: r.top, bottom: r.bottom, left: r.left, right: r.right,
               width: r.width, height: r.height, text: e.innerText};
  });
  var pre = document.createElement("pre");
  pre.id = "measured";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>
"""


def chromium(*args: str, profile: Path, timeout: float = 90) -> str:
    """Run headless Chromium to completion, within `timeout` seconds (the whole process group
    is killed past it: Chromium's helpers must not outlive the test); its stdout."""
    binary = require_binary("chromium", "chromium")
    command = [
        binary,
        "--headless",
        "--no-sandbox",  # needed as root, harmless otherwise
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        f"--window-size={WIDTH},{HEIGHT}",
        *args,
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=10)
        pytest.fail(f"chromium did not finish within {timeout} s: {' '.join(command)}")
    assert process.returncode == 0, stderr[-2000:]
    return stdout


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes) of an 8-bit RGB or RGBA PNG (alpha dropped)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, idat, header = 8, b"", b""
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        position += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
    channels = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        line = raw[y * (stride + 1) : (y + 1) * (stride + 1)]
        method, row = line[0], bytearray(line[1:])
        for i in range(stride):
            left = row[i - channels] if i >= channels else 0
            up = previous[i]
            corner = previous[i - channels] if i >= channels else 0
            if method == 1:
                row[i] = (row[i] + left) & 0xFF
            elif method == 2:
                row[i] = (row[i] + up) & 0xFF
            elif method == 3:
                row[i] = (row[i] + (left + up) // 2) & 0xFF
            elif method == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                predictor = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                row[i] = (row[i] + predictor) & 0xFF
        rows.append(
            bytes(row) if channels == 3 else bytes(b for i, b in enumerate(row) if i % 4 != 3)
        )
        previous = row
    return width, height, rows


def report_of_a_weak_claim(tmp_path: Path) -> Path:
    """The report with the most on its first screen: a simulated ledger (the banner goes
    first), 16 GPUs reporting where 12 were declared, one node silent for a day, use no tenant
    accounts for, no witness, two phases; busy 85% and SM activity 55%."""

    def load(n: int, g: int, hour: int) -> tuple[float, float] | None:
        return None if n == 3 and 24 <= hour < 48 else (0.85, 0.55)

    db, keys = signed_ledger(
        tmp_path,
        load,
        start=MAR_1,
        hours=72,
        backend="mock",
        tenant=lambda n, g, h: "" if n == 0 else "lab",
    )
    # paths relative to where it runs, as an auditor types them: the test's own temporary
    # path, however long, must not decide what fits on the first screen
    ran = subprocess.run(
        [
            *gputally_command(),
            *("audit", "report", f"--ledger={db.name}", f"--keys={keys.name}", "--out=report"),
            *("--from=2026-03-01", "--to=2026-03-04", "--expected-gpus=12", "--claim=0.85"),
            "--phase=acceptance=2026-03-01..2026-03-02T12:00",
            "--phase=after=2026-03-02T12:00..2026-03-04",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return tmp_path / "report"


def test_the_first_screen_holds_the_verdicts_the_limitations_and_the_evidence(
    tmp_path: Path,
) -> None:
    out = report_of_a_weak_claim(tmp_path)
    data = json.loads((out / "report.json").read_text())
    kinds = [item["kind"] for item in data["limitations"]]
    assert kinds[:2] == ["simulated", "over_inventory"] and "witnesses" in kinds
    page = tmp_path / "measured.html"
    page.write_text((out / "report.html").read_text().replace("</body>", MEASURE + "</body>"))
    dom = chromium("--dump-dom", page.as_uri(), profile=tmp_path / "profile")
    found = re.search(r'<pre id="measured">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    measured = json.loads(found[1].replace("&quot;", '"').replace("&amp;", "&"))
    width, height = measured["viewport"]
    assert width == WIDTH and 600 <= height <= HEIGHT, measured["viewport"]
    assert measured["scroll_width"] <= width, "the page must not scroll sideways"
    for name in ("verdicts", "limitations", "evidence"):
        box = measured[name]
        assert box is not None, f"no #{name}"
        assert box["width"] > 200 and box["height"] > 50, (name, box)
        assert box["top"] >= 0 and box["bottom"] <= height, (name, box, height)
        assert box["left"] >= 0 and box["right"] <= width, (name, box, width)
    banner = measured["simulated"]
    assert banner is not None and banner["bottom"] <= measured["verdicts"]["top"]
    assert banner["text"].startswith("SIMULATED DATA: 288 of the 288 summaries")
    # node-03's 4 GPUs silent for 24 of the 72 hours: 1,056 of 1,152 GPU-hours observed
    observed, silent = 1056 / 1152, 96 / 1152
    verdicts = " ".join(measured["verdicts"]["text"].split())
    work, busy = 0.55 * observed, 0.85 * observed
    assert (
        "Were the GPUs doing real work at least 85% of the time? "
        f"No: {work:.2%} (between {work:.2%} and {work + silent:.2%})"
    ) in verdicts
    assert (
        "Was a program running on the GPUs at least 85% of the time? (the claim's measure) "
        f"Cannot tell: {busy:.2%} (between {busy:.2%} and {busy + silent:.2%})"
    ) in verdicts
    assert "Not a plain verdict: 16 GPUs reported where 12 were declared" in verdicts
    assert "acceptance" in verdicts and "after" in verdicts
    limitations = measured["limitations"]["text"]
    for what in (
        "Simulated data.",
        "More GPUs than declared: 16 reported, 12 declared.",
        "No witness cosigned the log.",
        "of the busy time has no tenant or job.",
        "Signatures prove who reported, not that it is true.",
    ):
        assert what in limitations, what
    evidence = data["evidence"]
    shown = measured["evidence"]["text"]
    for value in (
        evidence["tool"],
        evidence["ledger"]["sha256"],
        evidence["checkpoint"]["root"],
        f"size {evidence['checkpoint']['size']:,}",
        f"{evidence['keys']} public keys",
    ):
        assert value in re.sub(r"\s+", "", shown) or value in shown, value
    assert "gputally audit report" in shown


def test_the_report_renders_as_a_picture(tmp_path: Path) -> None:
    out = report_of_a_weak_claim(tmp_path)
    shot = tmp_path / "first-screen.png"
    chromium(f"--screenshot={shot}", (out / "report.html").as_uri(), profile=tmp_path / "profile")
    data = shot.read_bytes()
    assert len(data) > 20_000, len(data)
    width, height, rows = png_pixels(data)
    assert (width, height) == (WIDTH, HEIGHT)
    pixels = [row[i : i + 3] for row in rows[::4] for i in range(0, len(row), 12)]
    colours = set(pixels)
    assert len(colours) > 50, len(colours)
    white = sum(1 for p in pixels if p == b"\xff\xff\xff")
    assert 0.3 < white / len(pixels) < 0.98  # a page of text and tables, not a blank one
    # the SIMULATED banner's border, in its own red (#b00), is on the first screen
    assert any(
        row[i : i + 3] == b"\xbb\x00\x00" for row in rows[:200] for i in range(0, len(row), 3)
    )
