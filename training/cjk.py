#!/usr/bin/env python3
"""The CJK benchmark: GB2312 level-1 ideographs rendered from Debian's CJK fonts.

A class is an ideograph, an instance is a font face. Many classes (thousands), few
instances per class (tens), and fine-grained look-alikes spread over the whole corpus
(未/末, 己/已/巳, 土/士, ...): the regime of Stanford Online Products, where a memory of
negatives beyond the batch is reported to pay most.

* Characters: the 3,755 GB2312 level-1 ideographs (EUC-CN rows 16-55), generated from
  Python's gb2312 codec.
* Faces: every face of every .ttf / .otf / .ttc / .otc under /usr/share/fonts
  (training/setup-cjk.sh installs the list the published figures used; a .ttc holds
  several faces, read with fontTools' fontNumber and Pillow's index). A face's
  characters are those its cmap maps. A face is a candidate when its cmap covers at
  least MIN_COVER of the 3,755.
* Near-duplicates, two rules, in order of preference for the face kept (coverage, then
  the weight nearest to regular, then path):
  1. one face per design family: the family name with regional tags (SC, TC, JP, KR,
     HK, CJK) and weight words removed, so Noto Sans CJK's 5 regions x 7 weights are
     one design, as are the weights of LXGW WenKai;
  2. renderings: a face whose probe glyphs (29 common ideographs, 28x28) differ from an
     already kept face's by a mean absolute difference under DEDUPE_L1 grey levels is
     the same drawing shipped again (Takao = IPA, MMCedar = Motoya Cedar, Droid Sans
     Fallback = WenQuanYi Micro Hei, ...).
  Within a kept face, characters that render to the same bitmap as another character of
  the face (a placeholder glyph behind a cmap entry) are dropped.
* Rendering: Pillow's FreeType binding, 40 px, centred on the ink in a 48 px window
  (the glyph's size is kept: 一 stays thin, 口 stays smaller than 国), shrunk to 28x28
  (Lanczos); a glyph too big for the window is fitted into it. 28x28 keeps the
  augmentation and the re-id perturbation of the earlier benchmarks unchanged.
* Classes: characters with at least MIN_FONTS kept faces.
* Split (seeded): look-alike groups (LOOKALIKES) are dealt whole, alternately, to the
  train and the unseen characters, so both sides hold look-alike sets (PINNED fixes
  the side of the issue's three examples); the other
  characters follow at random until 60% of the classes train. Fonts: 60% train, the
  rest held out. Training uses train characters in train fonts; test and validation
  use unseen characters in held-out fonts only. The unseen characters are split again:
  half for validation (learning curves, the verification threshold), half for test.

The rendered set is cached as an .npz under ~/.cache/likeness-cjk (or $LIKENESS_CJK_CACHE);
the key does not include the installed fonts, so run with --rebuild after changing them.
"""

import argparse
import hashlib
import json
import os
import re
import sys
import time

import numpy as np

FONT_ROOTS = os.environ.get("CJK_FONT_DIRS", "/usr/share/fonts").split(":")
CACHE_DIR = os.environ.get("LIKENESS_CJK_CACHE",
                           os.path.join(os.path.expanduser("~"), ".cache", "likeness-cjk"))
SIZE = 28
MIN_COVER = 500
MIN_FONTS = 20
DEDUPE_L1 = 11.0
VERSION = "v2"

# Look-alike sets (all GB2312 level 1). Each set goes whole to one side of the split.
LOOKALIKES = [
    "未末", "己已巳巴", "土士", "日曰", "人入八", "大太犬", "王玉主", "刀力", "天夫",
    "千干于", "午牛", "贝见", "问间", "住往", "休体", "戊戌戍", "折拆", "侯候", "幻幼",
    "洒酒", "晴睛", "辨辩辫", "狠狼", "即既", "免兔", "拔拨", "仑仓", "汗汁",
    "旦旧", "目自", "甲申由田", "爪瓜", "兵乒乓", "斤斥", "今令", "冶治",
    "又叉", "鸟乌岛", "历厉", "祟崇", "暑署", "戎戒", "哀衰衷",
]
# The examples: one set trains, two are tested (the rest are dealt alternately).
PINNED = {"未末": "train", "己已巳巴": "test", "土士": "test"}
# Probe glyphs for the duplicate check: common ideographs in GB2312 and JIS X 0208 alike.
PROBE = "永和春花道明高森国"


def gb2312_level1():
    """The 3,755 level-1 ideographs, in GB2312 order (EUC-CN 0xB0A1 ... 0xD7F9)."""
    out = []
    for row in range(16, 56):
        for col in range(94):
            try:
                out.append(bytes([0xA0 + row, 0xA1 + col]).decode("gb2312"))
            except UnicodeDecodeError:
                pass  # row 55 ends at column 89
    return out


CHARS = gb2312_level1()


def probe_chars():
    """PROBE's characters that the JIS and GB sets share (a fixed list of 20-40)."""
    out = []
    for c in PROBE + "一人大中山水火木日月天口心手田目年生出学":
        if c not in CHARS:
            continue
        try:
            c.encode("euc_jp")
            out.append(c)
        except UnicodeEncodeError:
            pass
    return "".join(dict.fromkeys(out))


def font_files(roots=FONT_ROOTS):
    out = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for n in names:
                if n.lower().endswith((".ttf", ".otf", ".ttc", ".otc")):
                    out.append(os.path.join(dirpath, n))
    return sorted(out)


REGION = {"sc", "tc", "jp", "kr", "hk", "cjk", "cn", "tw", "j", "k", "gb", "big5"}
WEIGHT = {"thin", "extralight", "ultralight", "light", "demilight", "semilight", "normal",
          "regular", "book", "medium", "semibold", "demibold", "bold", "extrabold",
          "ultrabold", "heavy", "black", "w3", "w4", "w5", "w6", "w7", "w8", "w9"}


def design_key(family):
    """The family name without regional tags and weight words, lower case."""
    words = re.findall(r"[a-z0-9]+", family.lower())
    kept = [w for w in words if w not in REGION and w not in WEIGHT]
    return " ".join(kept) or family.lower()


def faces(paths):
    """(path, index, family, subfamily, weight class, cmap coverage mask) per face."""
    from fontTools.ttLib import TTCollection, TTFont
    out, unreadable = [], []
    wanted = np.array([ord(c) for c in CHARS])
    for path in paths:
        try:
            if path.lower().endswith((".ttc", ".otc")):
                with open(path, "rb") as fh:
                    n = len(TTCollection(fh, lazy=True).fonts)
            else:
                n = 1
        except Exception:
            unreadable.append(path)
            continue
        for index in range(n):
            try:
                f = TTFont(path, fontNumber=index, lazy=True)
                cmap = f.getBestCmap() or {}
                name = f["name"]
                family = str(name.getDebugName(16) or name.getDebugName(1) or "")
                sub = str(name.getDebugName(17) or name.getDebugName(2) or "")
                weight = int(f["OS/2"].usWeightClass) if "OS/2" in f else 400
                f.close()
            except Exception:
                unreadable.append(f"{path}#{index}")
                continue
            mask = np.isin(wanted, np.fromiter(cmap.keys(), dtype=np.int64))
            out.append({"path": path, "index": index, "family": family, "sub": sub,
                        "weight": weight, "mask": mask})
    return out, unreadable


def render(font, ch):
    """One glyph as uint8 [28,28], white on black; None when it has no ink."""
    from PIL import Image, ImageDraw
    canvas = 128
    img = Image.new("L", (canvas, canvas), 0)
    try:
        ImageDraw.Draw(img).text((canvas // 2, canvas // 2), ch, fill=255, font=font,
                                 anchor="mm")
    except OSError:  # a glyph program FreeType rejects ("invalid opcode")
        return None
    box = img.getbbox()
    if box is None:
        return None
    x0, y0, x1, y1 = box
    win = 48
    side = max(x1 - x0, y1 - y0, win)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    left, up = int(round(cx - side / 2)), int(round(cy - side / 2))
    out = img.crop((left, up, left + side, up + side)).resize((SIZE, SIZE),
                                                            Image.Resampling.LANCZOS)
    a = np.asarray(out, dtype=np.uint8)
    return a if a.max() > 40 else None


def _load_font(face):
    from PIL import ImageFont
    return ImageFont.truetype(face["path"], 40, index=face["index"])


def select_faces(all_faces, verbose=True):
    """Candidates by coverage, then one face per design, then rendering duplicates."""
    probe = probe_chars()
    pidx = [CHARS.index(c) for c in probe]
    dropped = {"coverage": 0, "unrenderable": 0, "no_ink": 0, "same_design": 0,
               "same_drawing": 0}
    why = []
    cands = []
    for f in all_faces:
        if f["mask"].sum() < MIN_COVER:
            dropped["coverage"] += 1
            continue
        cands.append(f)
    # rule 1: one face per design family
    cands.sort(key=lambda f: (-int(f["mask"].sum()), abs(f["weight"] - 400),
                              f["path"], f["index"]))
    by_design = {}
    for f in cands:
        key = design_key(f["family"])
        if key in by_design:
            dropped["same_design"] += 1
            why.append({"face": f"{os.path.basename(f['path'])}#{f['index']}",
                        "family": f["family"], "dropped": "same design",
                        "as": by_design[key]["family"]})
            continue
        by_design[key] = f
    # rule 2: renderings
    kept, prints = [], []
    for f in by_design.values():
        try:
            font = _load_font(f)
        except OSError:
            dropped["unrenderable"] += 1
            continue
        fp = np.full((len(pidx), SIZE * SIZE), np.nan, dtype=np.float32)
        for j, ci in enumerate(pidx):
            if f["mask"][ci]:
                a = render(font, CHARS[ci])
                if a is not None:
                    fp[j] = a.reshape(-1)
        if (~np.isnan(fp[:, 0])).sum() < 5:  # cmap entries to empty glyphs
            dropped["no_ink"] += 1
            why.append({"face": f"{os.path.basename(f['path'])}#{f['index']}",
                        "family": f["family"], "dropped": "no ink", "as": ""})
            continue
        dup = None
        for g, gp in zip(kept, prints):
            both = ~np.isnan(fp[:, 0]) & ~np.isnan(gp[:, 0])
            if both.sum() >= 5 and np.abs(fp[both] - gp[both]).mean() < DEDUPE_L1:
                dup = g
                break
        if dup is not None:
            dropped["same_drawing"] += 1
            why.append({"face": f"{os.path.basename(f['path'])}#{f['index']}",
                        "family": f["family"], "dropped": "same drawing",
                        "as": dup["family"]})
            continue
        kept.append(f)
        prints.append(fp)
    if verbose:
        print(f"{len(all_faces)} faces, {len(cands)} cover >= {MIN_COVER} characters, "
              f"{len(kept)} kept; dropped {dropped}", flush=True)
    return kept, dropped, why


def build(seed=11, train_char_frac=0.6, train_font_frac=0.6, verbose=True):
    t0 = time.time()
    files = font_files()
    all_faces, unreadable = faces(files)
    kept, dropped, why = select_faces(all_faces, verbose)
    images, labels, font_idx = [], [], []
    placeholders = 0
    for fi, f in enumerate(kept):
        font = _load_font(f)
        got, seen = {}, {}
        for ci in np.flatnonzero(f["mask"]):
            a = render(font, CHARS[ci])
            if a is None:
                continue
            h = hashlib.sha1(a.tobytes()).hexdigest()
            seen.setdefault(h, []).append(int(ci))
            got[int(ci)] = a
        for h, cis in seen.items():  # one bitmap behind several characters: a placeholder
            if len(cis) > 1:
                placeholders += len(cis)
                for ci in cis:
                    got.pop(ci, None)
        for ci, a in got.items():
            images.append(a)
            labels.append(ci)
            font_idx.append(fi)
        if verbose:
            print(f"  {fi + 1}/{len(kept)} {f['family']} ({f['sub']}): {len(got)} glyphs "
                  f"[{time.time() - t0:.0f}s]", flush=True)
    images = np.stack(images).astype(np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    font_idx = np.asarray(font_idx, dtype=np.int64)

    counts = np.bincount(labels, minlength=len(CHARS))
    classes = np.flatnonzero(counts >= MIN_FONTS)
    rng = np.random.default_rng(seed)
    cls_set = set(classes.tolist())
    groups = [[CHARS.index(c) for c in g if c in CHARS] for g in LOOKALIKES]
    groups = [g for g in groups if len(g) >= 2 and all(c in cls_set for c in g)]
    order = rng.permutation(len(groups))
    train_chars, unseen_chars = [], []
    k = 0
    for gi in order:
        name = "".join(CHARS[c] for c in groups[gi])
        if name in PINNED:
            side = PINNED[name] == "train"
        else:
            side, k = k % 2 == 0, k + 1
        (train_chars if side else unseen_chars).extend(groups[gi])
    grouped = set(train_chars) | set(unseen_chars)
    rest = [c for c in rng.permutation(classes).tolist() if c not in grouped]
    n_train = int(round(train_char_frac * len(classes)))
    need = max(0, n_train - len(train_chars))
    train_chars += rest[:need]
    unseen_chars += rest[need:]
    train_chars, unseen_chars = sorted(train_chars), sorted(unseen_chars)
    # unseen characters: half validation, half test; look-alike groups stay together
    val_chars, test_chars = [], []
    ug = [g for g in (groups[gi] for gi in order) if g[0] in set(unseen_chars)]
    k = 0
    for g in ug:
        name = "".join(CHARS[c] for c in g)
        if name in PINNED:
            side = PINNED[name] == "test"
        else:
            side, k = k % 2 == 0, k + 1
        (test_chars if side else val_chars).extend(g)
    ugrouped = set(val_chars) | set(test_chars)
    urest = [c for c in rng.permutation(unseen_chars).tolist() if c not in ugrouped]
    half = len(unseen_chars) // 2 - len(test_chars)
    test_chars += urest[:max(0, half)]
    val_chars += urest[max(0, half):]

    font_order = rng.permutation(len(kept))
    train_font = np.zeros(len(kept), dtype=bool)
    train_font[font_order[:int(round(train_font_frac * len(kept)))]] = True

    is_cls = np.isin(labels, classes)
    in_train_font = train_font[font_idx]
    return {
        "images": images, "labels": labels, "font": font_idx,
        "chars": np.asarray(CHARS),
        "fonts": np.asarray([f"{f['path']}#{f['index']}" for f in kept]),
        "font_family": np.asarray([f["family"] for f in kept]),
        "font_coverage": np.asarray([int(f["mask"].sum()) for f in kept]),
        "classes": classes,
        "train_chars": np.asarray(train_chars, dtype=np.int64),
        "val_chars": np.asarray(sorted(val_chars), dtype=np.int64),
        "test_chars": np.asarray(sorted(test_chars), dtype=np.int64),
        "lookalike_groups": np.asarray(["".join(CHARS[c] for c in g) for g in groups]),
        "train_font": train_font,
        "train_mask": is_cls & np.isin(labels, train_chars) & in_train_font,
        "val_mask": np.isin(labels, val_chars) & ~in_train_font,
        "test_mask": np.isin(labels, test_chars) & ~in_train_font,
        "dropped": json.dumps(dropped),
        "dropped_faces": json.dumps(why),
        "unreadable": json.dumps(unreadable),
        "placeholders": placeholders,
        "n_font_files": len(files),
        "n_faces": len(all_faces),
    }


def cache_path(seed):
    key = hashlib.sha1(f"{''.join(CHARS)}|{seed}|{SIZE}|{MIN_COVER}|{MIN_FONTS}|"
                       f"{DEDUPE_L1}|{VERSION}".encode()).hexdigest()[:10]
    return os.path.join(CACHE_DIR, f"cjk-{key}.npz")


def load(seed=11, rebuild=False):
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
    lab = d["labels"]
    per_class = np.bincount(lab[np.isin(lab, d["classes"])], minlength=len(d["chars"]))
    per_class = per_class[d["classes"]]
    tr = d["train_mask"]
    tr_per_class = np.bincount(lab[tr])[d["train_chars"]]
    groups = [str(g) for g in d["lookalike_groups"]]
    side = {}
    for g in groups:
        c = int(np.flatnonzero(d["chars"] == g[0])[0])
        side[g] = ("train" if c in set(d["train_chars"].tolist()) else
                   "val" if c in set(d["val_chars"].tolist()) else "test")
    return {
        "font_files": int(d["n_font_files"]),
        "faces": int(d["n_faces"]),
        "faces_kept": int(len(d["fonts"])),
        "faces_dropped": json.loads(str(d["dropped"])),
        "train_fonts": int(d["train_font"].sum()),
        "heldout_fonts": int((~d["train_font"]).sum()),
        "placeholder_glyphs_dropped": int(d["placeholders"]),
        "characters_with_a_glyph": int((np.bincount(lab, minlength=len(d["chars"])) > 0).sum()),
        "classes": int(len(d["classes"])),
        f"fonts_per_class_min_median_max": [int(per_class.min()), int(np.median(per_class)),
                                            int(per_class.max())],
        "train_classes": int(len(d["train_chars"])),
        "val_classes": int(len(d["val_chars"])),
        "test_classes": int(len(d["test_chars"])),
        "train_images": int(tr.sum()),
        "train_images_per_class_min_median_max": [int(tr_per_class.min()),
                                                  int(np.median(tr_per_class)),
                                                  int(tr_per_class.max())],
        "val_images": int(d["val_mask"].sum()),
        "test_images": int(d["test_mask"].sum()),
        "lookalike_groups": side,
    }


def sheet(d, path, n_fonts=12):
    """A contact sheet: rows are fonts, columns are look-alike sets and common characters."""
    from PIL import Image
    cols = "未末己已巳巴土士日曰人入八大太犬王玉主千干于侯候目自冶治永国"
    want = [int(np.flatnonzero(d["chars"] == c)[0]) for c in cols if c in d["chars"]]
    rows = []
    rng = np.random.default_rng(0)
    for f in rng.permutation(len(d["fonts"])):
        sel = np.flatnonzero(d["font"] == f)
        mine = dict(zip(d["labels"][sel].tolist(), sel.tolist()))
        if not all(c in mine for c in want):
            continue
        rows.append(np.concatenate([d["images"][mine[c]] for c in want], axis=1))
        if len(rows) == n_fonts:
            break
    img = np.concatenate(rows)
    Image.fromarray(img).resize((img.shape[1] * 2, img.shape[0] * 2),
                                Image.Resampling.NEAREST).save(path)
    return len(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--sheet", help="write a PNG contact sheet")
    p.add_argument("--faces", action="store_true", help="list kept and dropped faces")
    args = p.parse_args()
    d = load(args.seed, args.rebuild)
    print(json.dumps(summary(d), indent=1, ensure_ascii=False))
    if args.faces:
        for name, fam, cov in zip(d["fonts"], d["font_family"], d["font_coverage"]):
            print(f"kept {fam!r:40} {cov:5d}  {name}")
        for w in json.loads(str(d["dropped_faces"])):
            print(f"dropped {w['family']!r:40} {w['dropped']} as {w['as']!r}  {w['face']}")
    if args.sheet:
        n = sheet(d, args.sheet)
        print("wrote", args.sheet, f"({n} fonts)")


if __name__ == "__main__":
    sys.exit(main())
