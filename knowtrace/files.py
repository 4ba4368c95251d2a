"""Reading a user's files, for both commands (``unlearn`` record directories, ``knowtrace`` image
underlays): every problem is an error that names the file and says what to do.

- only regular files are opened: a folder, a named pipe (FIFO), a device or a socket is refused before
  it is opened (reading a FIFO would wait forever for a writer);
- text is UTF-8 (a bad byte names the file and its line), JSON names the file, line and column;
- images of every mode Pillow reads become 8-bit: 16-bit greyscale ("I;16", "I") is scaled from
  0..65535 to 0..255 (Pillow's own conversion clips it, so a 16-bit image turned all white), float
  ("F") from 0..1; RGB images composite transparency ("RGBA", "LA", "PA", a palette with a
  transparent colour) on white, as a page shows them; other modes ("P", "1", "L", "CMYK", "YCbCr")
  go through Pillow's conversion. An image larger than Pillow's limit (``Image.MAX_IMAGE_PIXELS``,
  a "decompression bomb") is refused.

It lives in knowtrace, the lower package, so that both commands read images with this one function.
"""

from __future__ import annotations

import json
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# what a non-regular file is, by its stat type test
NOT_REGULAR = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # integer greyscale read as 0..65535
ALPHA = ("RGBA", "LA", "PA", "La", "RGBa")


def regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` if it is a regular file (or a link to one); else an error naming it, before it is opened."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist; fix the path") from None
    kind = next((name for test, name in NOT_REGULAR if test(mode)), None)
    if kind is not None:
        raise ValueError(f"{what} {path} is {kind}, not a file; give the path of a regular file")
    return path


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A regular file's text, decoded as UTF-8; a bad byte names the file and its line."""
    data = regular_file(path, what).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{what} {path} is not UTF-8 text (line {line}: byte 0x{data[e.start]:02x} {e.reason}); "
                         f"save it as UTF-8") from None


def write_json(path: str | os.PathLike, data) -> None:
    """``data`` as JSON, atomically; a NaN or inf is an error (not valid JSON, and never a result)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str, allow_nan=False))
    os.replace(tmp, path)


def read_json(path: str | os.PathLike, what: str = "JSON file"):
    """A regular UTF-8 file's JSON value; a syntax error names the file, line and column."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def to_8bit(im: Image.Image, where: str) -> Image.Image:
    """16-bit and float greyscale scaled to "L"; every other mode as it is."""
    if im.mode not in SIXTEEN_BIT and im.mode != "F":
        return im
    values = np.asarray(im, dtype=np.float64)
    top = 1.0 if im.mode == "F" else 65535.0
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > top:
        raise ValueError(f"{where} ({im.mode}) has values outside 0..{top:g}; save it as an 8-bit PNG or JPEG")
    return Image.fromarray(np.rint(values * (255.0 / top)).astype(np.uint8))


def read_image(path: str | os.PathLike, what: str = "image", mode: str = "RGB") -> Image.Image:
    """A regular image file, loaded, as an 8-bit ``mode`` image ("RGB", or "L" for masks: colour to grey,
    transparency ignored); a file that is no image, damaged, or too large is an error naming it."""
    path = regular_file(path, what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit: refused, not a warning
            with Image.open(path) as opened:
                im = opened.copy()  # loaded (a damaged file fails here), usable after the file is closed
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{what} {path} is too large to read ({e}); resize it") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # SyntaxError: some of Pillow's damaged-file errors
        raise ValueError(f"{what} {path} cannot be read as an image ({e}); give a PNG or JPEG file") from None
    im = to_8bit(im, f"{what} {path}")
    if mode == "RGB" and (im.mode in ALPHA or "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    try:
        return im.convert(mode)
    except ValueError as e:
        raise ValueError(f"{what} {path} has mode {im.mode}, which cannot be converted ({e}); save it as an RGB PNG "
                         f"or JPEG") from None
