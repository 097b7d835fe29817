#!/usr/bin/env bash
# Installs the Debian CJK font packages that the CJK benchmark (training/cjk.py) renders.
# A class is a GB2312 level-1 ideograph, an instance is a font face; cjk.py reads every
# face under /usr/share/fonts, keeps those whose cmap covers enough of the 3,755
# characters, and drops near-duplicate faces (weights and regional variants of one
# design), so a missing package only shrinks the benchmark. Nothing is downloaded
# outside apt.
set -euo pipefail
packages=(
    # Chinese
    fonts-noto-cjk fonts-noto-cjk-extra
    fonts-arphic-ukai fonts-arphic-uming fonts-arphic-bkai00mp fonts-arphic-bsmi00lp
    fonts-arphic-gbsn00lp fonts-arphic-gkai00mp
    fonts-cns11643-kai fonts-cns11643-sung
    fonts-cwtex-fs fonts-cwtex-heib fonts-cwtex-kai fonts-cwtex-ming fonts-cwtex-yen
    fonts-lxgw-wenkai fonts-wqy-microhei fonts-wqy-zenhei fonts-smiley-sans
    fonts-droid-fallback
    # Japanese (their kanji sets cover part of the simplified characters)
    fonts-ipafont fonts-ipaexfont fonts-ipamj-mincho fonts-hanazono fonts-horai-umefont
    fonts-umeplus fonts-umeplus-cl fonts-kiloji fonts-motoya-l-cedar fonts-motoya-l-maruberi
    fonts-mmcedar fonts-takao fonts-vlgothic fonts-sawarabi-gothic fonts-sawarabi-mincho
    fonts-seto fonts-migmix fonts-komatuna fonts-konatu fonts-monapo fonts-mona
    fonts-misaki fonts-aoyagi-kouzan-t fonts-aoyagi-soseki fonts-kouzan-mouhitsu
    fonts-dejima-mincho fonts-oradano-mincho-gsrr fonts-yozvox-yozfont
    fonts-yozvox-yozfont-antique fonts-yozvox-yozfont-cute fonts-yozvox-yozfont-edu
    fonts-yozvox-yozfont-new-kana fonts-yozvox-yozfont-standard-kana fonts-reggae
    # Korean (hanja subsets)
    fonts-unfonts-core fonts-unfonts-extra fonts-nanum fonts-nanum-extra fonts-baekmuk
)
if [ "$(id -u)" -ne 0 ]; then sudo=sudo; else sudo=; fi
$sudo apt-get update -qq
avail=()
for p in "${packages[@]}"; do
    if apt-cache show "$p" >/dev/null 2>&1; then avail+=("$p"); else echo "not available: $p" >&2; fi
done
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${avail[@]}"
