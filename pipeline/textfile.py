"""Read a text file a user brought: UTF-8 with or without a byte-order mark, CRLF or LF.

Windows tools write a UTF-8 BOM (Notepad, Excel's "CSV UTF-8") and CRLF line ends; Excel's
"Unicode text" and PowerShell's `>` write UTF-16 with a BOM. All of these are read as the text
they hold. Anything else that is not UTF-8 (latin-1, UTF-16 without a BOM) is a UserError naming
the file, the line and the column of the first bad byte. Every reader of user files — the recipe,
prompt files, chat templates, JSON/JSONL/CSV/TSV ingest, evaluation sets — goes through here.
"""
from __future__ import annotations

import codecs
import os

from pipeline.errors import UserError

# Longest first: the UTF-32 LE mark begins with the UTF-16 LE one.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))


def read_text(path: str, what: str = "") -> str:
    """The file's text with line ends normalized to "\\n". `what` prefixes messages
    (e.g. "recipe", "prompts.path")."""
    label = f"{what} {path}" if what else path
    if os.path.isdir(path):
        raise UserError(f"{label}: is a folder, expected a file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UserError(f"{label}: file not found") from None
    except OSError as e:
        raise UserError(f"{label}: cannot read it ({e.strerror})") from None
    encoding = next((enc for bom, enc in _BOMS if raw.startswith(bom)), "utf-8")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserError(f"{label}: line {line}: not {encoding.upper().replace('-SIG', '')} text "
                        f"(byte 0x{raw[e.start]:02x} at column {column}); save it as UTF-8") from None
    if "\x00" in text:  # UTF-16 without a byte-order mark decodes as "UTF-8" with NULs between
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise UserError(f"{label}: line {line}: NUL bytes in the text (UTF-16 without a "
                        "byte-order mark?); save it as UTF-8")
    return text.replace("\r\n", "\n")
