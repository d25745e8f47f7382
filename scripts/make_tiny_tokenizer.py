"""Build the small CLIP-style BPE tokenizer that ships with the `tiny` preset.

The real SD 2.1 tokenizer (49 408 tokens) cannot be downloaded at test time, so the tiny preset
carries its own: the same byte-level BPE scheme as CLIP (bytes mapped to printable characters,
``</w>`` marking the end of a word, ``<|startoftext|>``/``<|endoftext|>`` specials, "!" as the
padding token as in SD 2.x) with merges learned from the captions DiffusionSat was trained on.
Any text tokenizes (unknown words fall back to single bytes); captions tokenize compactly.

Run from the repository root; it rewrites ``engine/resources/tiny/tokenizer/``:

    python scripts/make_tiny_tokenizer.py
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "engine" / "resources" / "tiny" / "tokenizer"
NUM_MERGES = 1200

FMOW_CLASSES = """airport airport_hangar airport_terminal amusement_park aquaculture archaeological_site
barn border_checkpoint burial_site car_dealership construction_site crop_field dam debris_or_rubble
educational_institution electric_substation factory_or_powerplant fire_station flooded_road fountain
gas_station golf_course ground_transportation_station helipad hospital impoverished_settlement
interchange lake_or_pond lighthouse military_facility multi-unit_residential nuclear_powerplant
office_building oil_or_gas_facility park parking_lot_or_garage place_of_worship police_station port
prison race_track railway_bridge recreational_facility road_bridge runway shipyard shopping_mall
single-unit_residential smokestack solar_farm space_facility stadium storage_tank surface_mine
swimming_pool toll_booth tower tunnel_opening waste_disposal water_treatment_facility wind_farm zoo"""

COUNTRIES = """united states china india brazil russia france germany italy spain united kingdom japan
mexico canada australia nigeria egypt south africa kenya indonesia pakistan turkey iran iraq
argentina chile peru colombia saudi arabia vietnam thailand philippines ukraine poland netherlands
belgium sweden norway finland denmark greece portugal morocco algeria ethiopia tanzania"""

TEMPLATES = [
    "a satellite image",
    "a fmow satellite image of a {cls} in {country}",
    "a satellite image of a {cls}",
    "a satlas satellite image of houses built in 2018 covering 3 acres",
    "a fmow satellite image before being affected by a flooding natural disaster",
    "a fmow satellite image after being affected by a wildfire natural disaster",
    "a satellite image of buildings and roads in a city",
    "a satellite image of fields, forest, rivers, water, clouds and snow",
    "at a resolution of 0.5. the longitude, latitude is 192.5, 131.9. the date is 2021, 6, 15",
    "a sentinel-2 multispectral image of farmland, a harbour, a stadium and a town",
]


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-character table (printable bytes map to themselves)."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


PRETOKEN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


def corpus() -> list[str]:
    classes = [c.replace("_", " ") for c in FMOW_CLASSES.split()]
    countries = COUNTRIES.split()
    lines = []
    for template in TEMPLATES:
        if "{cls}" in template:
            for i, cls in enumerate(classes):
                lines.append(template.format(cls=cls, country=countries[i % len(countries)]))
        else:
            lines.append(template)
    return lines


def learn_merges(lines: list[str], num_merges: int) -> list[tuple[str, str]]:
    byte_chars = bytes_to_unicode()
    counts: collections.Counter[tuple[str, ...]] = collections.Counter()
    for line in lines:
        for token in PRETOKEN.findall(line.lower()):
            chars = [byte_chars[b] for b in token.encode("utf-8")]
            chars[-1] += "</w>"
            counts[tuple(chars)] += 1
    words = dict(counts)
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, n in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += n
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for word, n in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    return merges


def main() -> None:
    byte_chars = list(bytes_to_unicode().values())
    merges = learn_merges(corpus(), NUM_MERGES)
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for token in vocab_list:
        vocab.setdefault(token, len(vocab))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (OUT / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "!",
    }
    (OUT / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = dict(special, tokenizer_class="CLIPTokenizer", model_max_length=77, do_lower_case=True)
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {len(vocab)} tokens, {len(merges)} merges to {OUT}")


if __name__ == "__main__":
    main()
