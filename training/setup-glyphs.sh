#!/usr/bin/env bash
# Installs the Debian font packages that the glyph benchmark (training/glyphs.py) renders.
# Chosen for Latin coverage (most also carry Greek and Cyrillic) and for spread of styles:
# serif, sans, monospace, slab, script, display, typewriter, old-style and hand-drawn.
# Nothing here is downloaded outside apt. glyphs.py reads whatever .ttf/.otf files sit
# under /usr/share/fonts, checks each font's cmap for every character, drops symbol
# fonts and fonts whose renderings duplicate another font's, so a missing package only
# shrinks the benchmark; the figures in docs/experiment.md came from this exact list.
set -euo pipefail
packages=(
    # families with many weights and styles
    fonts-urw-base35 fonts-texgyre fonts-lmodern fonts-cmu fonts-dejavu-core
    fonts-dejavu-extra fonts-freefont-ttf fonts-liberation fonts-liberation2
    fonts-crosextra-caladea fonts-crosextra-carlito fonts-paratype fonts-linuxlibertine
    fonts-ebgaramond fonts-sil-gentiumplus fonts-sil-charis fonts-sil-andika
    fonts-roboto-unhinted fonts-roboto-slab fonts-open-sans fonts-lato fonts-cantarell
    fonts-stix fonts-inter fonts-go fonts-noto-mono fonts-oldstandard
    fonts-vollkorn fonts-junicode fonts-cabin fonts-karla fonts-dosis fonts-quattrocento
    # Arkandis Digital Foundry: 15 families
    fonts-adf-accanthis fonts-adf-baskervald fonts-adf-berenis fonts-adf-gillius
    fonts-adf-ikarius fonts-adf-irianis fonts-adf-libris fonts-adf-mekanus
    fonts-adf-oldania fonts-adf-romande fonts-adf-solothurn fonts-adf-switzera
    fonts-adf-tribun fonts-adf-universalis fonts-adf-verana
    # monospace and technical
    fonts-hack-ttf fonts-inconsolata fonts-jetbrains-mono fonts-firacode
    fonts-anonymous-pro fonts-courier-prime fonts-mononoki fonts-b612 fonts-ocr-a
    fonts-ocr-b fonts-tiresias fonts-opendyslexic
    # display, script and hand-drawn
    fonts-averia-gwf fonts-averia-sans-gwf fonts-averia-serif-gwf fonts-comic-neue
    fonts-humor-sans fonts-dancingscript fonts-kristi fonts-lobster fonts-lobstertwo
    fonts-yanone-kaffeesatz fonts-tuffy fonts-jura fonts-comfortaa fonts-quicksand
    fonts-play fonts-f500 fonts-dustin fonts-staypuft fonts-beteckna fonts-breip
    fonts-isabella fonts-levien-museum fonts-levien-typoscript fonts-oflb-euterpe
    fonts-prociono fonts-fanwood fonts-goudybookletter fonts-lindenhill
    fonts-century-catalogue fonts-cardo fonts-elstob fonts-gfs-didot fonts-gfs-artemisia
    fonts-gfs-neohellenic fonts-clear-sans
    # Thai families whose fonts carry a full Latin set in their own designs
    fonts-tlwg-kinnari-ttf fonts-tlwg-garuda-ttf fonts-tlwg-loma-ttf fonts-tlwg-norasi-ttf
    fonts-tlwg-purisa-ttf fonts-tlwg-sawasdee-ttf fonts-tlwg-typist-ttf
    fonts-tlwg-typo-ttf fonts-tlwg-umpush-ttf fonts-tlwg-waree-ttf fonts-tlwg-mono-ttf
    fonts-tlwg-typewriter-ttf
)
if [ "$(id -u)" -ne 0 ]; then sudo=sudo; else sudo=; fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}"
