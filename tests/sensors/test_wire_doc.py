"""docs/wire.md is the one wire specification: its reason codes and header fields are the code's.

The reason codes are read three ways and must agree: the tables in docs/wire.md, the registries
the receivers count by (``sensors.wire.INVALID_REASONS``, ``runtime.intake.REJECT_REASONS``),
and the ``WireError("...")`` / rejection literals in the receiving code itself.
"""

from __future__ import annotations

import re
from pathlib import Path

from runtime.intake import REJECT_REASONS
from sensors import wire
from sensors.jpeg import JPEG_REASONS

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "wire.md").read_text()
ENCODE_ONLY = {"dtype", "shape"}  # raised by encode() for a message a sender cannot build, never counted


def _section(heading: str) -> str:
    """From ``heading`` to the next heading of the same or a higher level."""
    start = DOC.index(heading)
    level = len(heading) - len(heading.lstrip("#"))
    nxt = re.search(rf"^#{{1,{level}}} ", DOC[start + len(heading):], flags=re.M)
    return DOC[start: start + len(heading) + (nxt.start() if nxt else len(DOC))]


def _table_codes(text: str) -> list[str]:
    """First-column `code`s of the markdown table rows in ``text``."""
    return re.findall(r"^\| `([a-z0-9_]+)` \|", text, flags=re.M)


def _literals(path: str, pattern: str) -> set[str]:
    return set(re.findall(pattern, (REPO / path).read_text()))


def test_the_documented_invalid_codes_are_exactly_the_counted_ones() -> None:
    documented = _table_codes(_section("### Invalid messages"))
    assert len(documented) == len(set(documented)), "a code is listed twice"
    assert set(documented) == set(wire.INVALID_REASONS)
    raised = (_literals("sensors/wire.py", r'WireError\(\s*"([a-z0-9_]+)"')
              | _literals("sensors/receivers.py", r'WireError\(\s*"([a-z0-9_]+)"'))
    assert raised - ENCODE_ONLY == set(wire.INVALID_REASONS)


def test_the_documented_rejection_codes_are_exactly_the_intakes() -> None:
    documented = _table_codes(_section("### Rejected messages"))
    assert len(documented) == len(set(documented))
    assert set(documented) == set(REJECT_REASONS)
    assert _literals("sensors/jpeg.py", r'WireError\(\s*"([a-z0-9_]+)"') == set(JPEG_REASONS)
    intake_literals = _literals("runtime/intake.py", r'(?:_Rejected\(|self\._reject\([a-z"]+, )"([a-z0-9_]+)"')
    assert intake_literals <= set(REJECT_REASONS) and intake_literals >= {"wrong_kind", "unusable"}


def test_every_header_field_of_the_code_is_documented_and_no_other() -> None:
    header = _section("## 3. Header")
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", header, flags=re.M))
    in_code = set(wire._COMMON) | set(wire._OPTIONAL) | {k for spec in wire._PER_KIND.values() for k in spec}
    assert documented == in_code
    assert re.search(r"^\| `session` \|.*\| \*\*no\*\* \(absent = 0\) \|", header, flags=re.M)
    for name in wire._COMMON:
        assert re.search(rf"^\| `{name}` \|.*\| yes \|", header, flags=re.M), name


def test_the_documented_limits_are_the_codes() -> None:
    assert wire.MAX_HEADER_BYTES == 16 * 1024 and "at most 16 KiB" in DOC
    assert wire.MAX_TOPIC_BYTES == 256 and "1..256 bytes" in DOC
    assert f"1 .. {wire.MAX_IMAGE_SIDE}" in DOC and f"0 .. {wire.MAX_IMAGE_SIDE * 4}" in DOC
    assert f"1 .. {wire.MAX_IMU_BATCH}" in DOC and f"1 .. {wire.MAX_SAMPLE_RATE}" in DOC
    assert f"`v` | int | schema version | yes | `{wire.SCHEMA_VERSION}`" in DOC
    assert set(re.findall(r'`"(rgb8|bgr8|mono8|jpeg)"`', DOC)) == set(wire.IMAGE_ENCODINGS)
    assert set(re.findall(r'`"(s16le|f32le)"`', DOC)) == set(wire.AUDIO_FORMATS)
