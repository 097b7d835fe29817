#!/usr/bin/env python3
"""The glyph benchmark: characters rendered from the fonts Debian packages ship.

A class is a character, an instance is the same character in another font, so a
model that has never seen a character must still tell its fonts apart from other
characters' (one-shot style, as Siamese work did with Omniglot).

* Fonts: every .ttf / .otf / .ttc under /usr/share/fonts and /usr/share/texmf/fonts/opentype
  (training/setup-glyphs.sh
  installs the list the published figures used). A font is kept when its cmap covers
  all 62 Latin letters and digits and its name does not mark it as a symbol, math or
  icon font. Fonts whose renderings are (almost) the same as an earlier font's are
  dropped: several packages ship the same design, or one design as both .otf and .ttf.
* Characters: Latin A-Z, a-z, 0-9, and the Greek and Cyrillic letters whose shapes do
  not coincide with a Latin letter (Greek capital Alpha is drawn as Latin A, so it is
  left out; Greek small alpha is not). A font contributes a glyph for every character
  its cmap maps.
* Rendering: Pillow's FreeType binding, 40 px on a 112 px canvas, baseline at a fixed
  height, centred horizontally on the ink; a 56 px window (44 px above the baseline, 12
  below) is shrunk to 28x28 (Lanczos). The fixed baseline keeps size and height, so
  "o" and "O" differ. A glyph too big for the window is fitted into it instead.
* Split (seeded): 60% of the characters train, the rest are unseen; 70% of the fonts
  train, the rest are held out. Training uses train characters in train fonts only;
  the test and validation sets use unseen characters in held-out fonts only, so
  neither a test character nor a test font was seen in training.

The rendered set is cached as an .npz under training/data/ (git-ignored); the cache
key is the character set and the seed, not the fonts, so run with --rebuild after
installing or removing font packages.
"""

import argparse
import hashlib
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
# fonts-lmodern and fonts-texgyre install under texmf; the rest under /usr/share/fonts.
FONT_ROOTS = os.environ.get(
    "GLYPH_FONT_DIRS", "/usr/share/fonts:/usr/share/texmf/fonts/opentype").split(":")
CACHE_DIR = os.path.join(HERE, "data")
SIZE = 28

LATIN = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
# Greek and Cyrillic letters that are not drawn like a Latin letter (or like each other).
GREEK = "ΓΔΘΛΞΠΣΦΨΩαβγδεζηθλμξπρστφχψω"
CYRILLIC = "БДЖЗИЙЦЧШЩЪЫЬЭЮЯбдлжцшыюя"
CHARS = LATIN + GREEK + CYRILLIC
SKIP_NAME = ("symbol", "dingbat", "math", "icon", "awesome", "emoji", "ornament",
             "d050000l", "braille", "cursor", "wingding")


def font_files(roots=FONT_ROOTS):
    out = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for n in names:
                if n.lower().endswith((".ttf", ".otf", ".ttc")):
                    out.append(os.path.join(dirpath, n))
    return sorted(out)


def coverage(path):
    """The characters of CHARS that the font's cmap maps, or None if unreadable."""
    from fontTools.ttLib import TTFont
    try:
        f = TTFont(path, fontNumber=0, lazy=True)
        cmap = f.getBestCmap() or {}
        f.close()
    except Exception:  # a font fontTools cannot read is just not used
        return None
    return "".join(c for c in CHARS if ord(c) in cmap)


def render(font, ch):
    """One glyph as uint8 [28,28], white on black; None when it has no ink."""
    from PIL import Image, ImageDraw
    canvas, base = 112, 72
    img = Image.new("L", (canvas, canvas), 0)
    ImageDraw.Draw(img).text((canvas // 2, base), ch, fill=255, font=font, anchor="ms")
    box = img.getbbox()
    if box is None:
        return None
    x0, y0, x1, y1 = box
    top, win = base - 44, 56
    cx = (x0 + x1) / 2.0
    if y0 >= top and y1 <= top + win and x1 - x0 <= win:
        left = int(round(cx - win / 2))
        crop = (left, top, left + win, top + win)
    else:  # too big for the window: fit the ink, square, centred
        side = max(x1 - x0, y1 - y0, win)
        cy = (y0 + y1) / 2.0
        left, up = int(round(cx - side / 2)), int(round(cy - side / 2))
        crop = (left, up, left + side, up + side)
    out = img.crop(crop).resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    a = np.asarray(out, dtype=np.uint8)
    return a if a.max() > 40 else None


def build(seed=7, train_char_frac=0.6, train_font_frac=0.7, dedupe_l1=2.0, verbose=True):
    from PIL import ImageFont
    files = font_files()
    fonts, glyphs = [], []          # glyphs[i]: {char: uint8 [28,28]}
    probe = "AaGgQqRr0369&"[:12]
    fingerprints = []
    skipped = {"name": 0, "coverage": 0, "render": 0, "duplicate": 0}
    for path in files:
        base = os.path.basename(path).lower()
        if any(s in base for s in SKIP_NAME):
            skipped["name"] += 1
            continue
        cov = coverage(path)
        if cov is None or any(c not in cov for c in LATIN):
            skipped["coverage"] += 1
            continue
        try:
            font = ImageFont.truetype(path, 40)
        except OSError:
            skipped["render"] += 1
            continue
        g = {}
        for c in cov:
            a = render(font, c)
            if a is not None:
                g[c] = a
        if any(c not in g for c in LATIN):
            skipped["render"] += 1
            continue
        fp = np.concatenate([g[c].reshape(-1) for c in probe]).astype(np.float32)
        if fingerprints:
            diffs = np.abs(np.stack(fingerprints) - fp).mean(axis=1)
            if diffs.min() < dedupe_l1:
                skipped["duplicate"] += 1
                continue
        fingerprints.append(fp)
        fonts.append(path)
        glyphs.append(g)
    if verbose:
        print(f"{len(files)} font files, {len(fonts)} kept; skipped {skipped}", flush=True)

    rng = np.random.default_rng(seed)
    chars = list(CHARS)
    order = rng.permutation(len(chars))
    n_train_chars = int(round(train_char_frac * len(chars)))
    train_chars = sorted(order[:n_train_chars].tolist())
    font_order = rng.permutation(len(fonts))
    n_train_fonts = int(round(train_font_frac * len(fonts)))
    train_fonts = np.zeros(len(fonts), dtype=bool)
    train_fonts[font_order[:n_train_fonts]] = True

    images, labels, font_idx = [], [], []
    for fi, g in enumerate(glyphs):
        for ci, c in enumerate(chars):
            if c in g:
                images.append(g[c])
                labels.append(ci)
                font_idx.append(fi)
    images = np.stack(images).astype(np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    font_idx = np.asarray(font_idx, dtype=np.int64)
    is_train_char = np.isin(labels, train_chars)
    return {
        "images": images, "labels": labels, "font": font_idx,
        "chars": np.asarray(chars), "fonts": np.asarray(fonts),
        "train_chars": np.asarray(train_chars, dtype=np.int64),
        "train_font": train_fonts,
        "train_mask": is_train_char & train_fonts[font_idx],
        "unseen_mask": ~is_train_char & ~train_fonts[font_idx],
        "skipped": json.dumps(skipped),
        "n_font_files": len(files),
    }


def cache_path(seed):
    key = hashlib.sha1(f"{CHARS}|{seed}|v1".encode()).hexdigest()[:10]
    return os.path.join(CACHE_DIR, f"glyphs-{key}.npz")


def load(seed=7, rebuild=False):
    path = cache_path(seed)
    if os.path.exists(path) and not rebuild:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    data = build(seed)
    os.makedirs(CACHE_DIR, exist_ok=True)
    np.savez_compressed(path, **data)
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def summary(d):
    n_chars = len(d["chars"])
    tr = d["train_mask"]
    un = d["unseen_mask"]
    return {
        "font_files": int(d["n_font_files"]),
        "fonts": int(len(d["fonts"])),
        "train_fonts": int(d["train_font"].sum()),
        "classes": n_chars,
        "train_classes": int(len(d["train_chars"])),
        "unseen_classes": n_chars - int(len(d["train_chars"])),
        "train_images": int(tr.sum()),
        "unseen_images": int(un.sum()),
        "skipped_fonts": json.loads(str(d["skipped"])),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--sheet", help="write a PNG contact sheet of a few fonts")
    args = p.parse_args()
    d = load(args.seed, args.rebuild)
    print(json.dumps(summary(d), indent=2))
    if args.sheet:
        from PIL import Image
        rng = np.random.default_rng(0)
        # a row per font, the same 24 characters (every fifth of CHARS) in each
        want = np.arange(0, len(d["chars"]), 5)[:24]
        rows = []
        for f in rng.permutation(len(d["fonts"])):
            mine = {int(c): i for c, i in zip(d["labels"][d["font"] == f],
                                              np.flatnonzero(d["font"] == f))}
            if not all(int(c) in mine for c in want):
                continue
            rows.append(np.concatenate([d["images"][mine[int(c)]] for c in want], axis=1))
            if len(rows) == 10:
                break
        sheet = np.concatenate(rows)
        Image.fromarray(sheet).resize((sheet.shape[1] * 2, sheet.shape[0] * 2),
                                      Image.Resampling.NEAREST).save(args.sheet)
        print("wrote", args.sheet)


if __name__ == "__main__":
    sys.exit(main())
