"""Training captions: the reference's templates and their dropout (reference page §3).

A caption is "a satellite image" plus optional parts, each dropped independently with a
probability (0.1 for fMoW, 0.5 for Satlas/Texas). "a satellite image" itself is never dropped,
so the empty prompt of classifier-free guidance was never a training caption.

fMoW: ``"a[ fmow] satellite image[ of a <class name>][ in <country>]"``. Class names are the 62
fMoW categories with ``_`` -> space; countries come from the ISO 3166-1 alpha-3 code that fMoW's
``metadata.json`` stores in ``country_code``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

__all__ = ["CORE", "FMOW_CLASSES", "Caption", "country_name", "fmow_caption"]

#: The part of every caption that is never dropped.
CORE = "a satellite image"

#: The 62 fMoW categories in the order of their class index (``output.cls``).
FMOW_CLASSES: tuple[str, ...] = (
    "airport", "airport_hangar", "airport_terminal", "amusement_park", "aquaculture",
    "archaeological_site", "barn", "border_checkpoint", "burial_site", "car_dealership",
    "construction_site", "crop_field", "dam", "debris_or_rubble", "educational_institution",
    "electric_substation", "factory_or_powerplant", "fire_station", "flooded_road", "fountain",
    "gas_station", "golf_course", "ground_transportation_station", "helipad", "hospital",
    "impoverished_settlement", "interchange", "lake_or_pond", "lighthouse", "military_facility",
    "multi-unit_residential", "nuclear_powerplant", "office_building", "oil_or_gas_facility", "park",
    "parking_lot_or_garage", "place_of_worship", "police_station", "port", "prison", "race_track",
    "railway_bridge", "recreational_facility", "road_bridge", "runway", "shipyard", "shopping_mall",
    "single-unit_residential", "smokestack", "solar_farm", "space_facility", "stadium",
    "storage_tank", "surface_mine", "swimming_pool", "toll_booth", "tower", "tunnel_opening",
    "waste_disposal", "water_treatment_facility", "wind_farm", "zoo",
)

# ISO 3166-1 alpha-3 -> short English name. Kept in the code (no pycountry dependency): captions
# are plain text and the table changes rarely.
_COUNTRIES = """
ABW Aruba|AFG Afghanistan|AGO Angola|AIA Anguilla|ALA Aland Islands|ALB Albania|AND Andorra|
ARE United Arab Emirates|ARG Argentina|ARM Armenia|ASM American Samoa|ATA Antarctica|
ATF French Southern Territories|ATG Antigua and Barbuda|AUS Australia|AUT Austria|AZE Azerbaijan|
BDI Burundi|BEL Belgium|BEN Benin|BES Bonaire, Sint Eustatius and Saba|BFA Burkina Faso|
BGD Bangladesh|BGR Bulgaria|BHR Bahrain|BHS Bahamas|BIH Bosnia and Herzegovina|
BLM Saint Barthelemy|BLR Belarus|BLZ Belize|BMU Bermuda|BOL Bolivia|BRA Brazil|BRB Barbados|
BRN Brunei|BTN Bhutan|BVT Bouvet Island|BWA Botswana|CAF Central African Republic|CAN Canada|
CCK Cocos (Keeling) Islands|CHE Switzerland|CHL Chile|CHN China|CIV Cote d'Ivoire|CMR Cameroon|
COD Democratic Republic of the Congo|COG Congo|COK Cook Islands|COL Colombia|COM Comoros|
CPV Cabo Verde|CRI Costa Rica|CUB Cuba|CUW Curacao|CXR Christmas Island|CYM Cayman Islands|
CYP Cyprus|CZE Czechia|DEU Germany|DJI Djibouti|DMA Dominica|DNK Denmark|DOM Dominican Republic|
DZA Algeria|ECU Ecuador|EGY Egypt|ERI Eritrea|ESH Western Sahara|ESP Spain|EST Estonia|
ETH Ethiopia|FIN Finland|FJI Fiji|FLK Falkland Islands|FRA France|FRO Faroe Islands|
FSM Micronesia|GAB Gabon|GBR United Kingdom|GEO Georgia|GGY Guernsey|GHA Ghana|GIB Gibraltar|
GIN Guinea|GLP Guadeloupe|GMB Gambia|GNB Guinea-Bissau|GNQ Equatorial Guinea|GRC Greece|
GRD Grenada|GRL Greenland|GTM Guatemala|GUF French Guiana|GUM Guam|GUY Guyana|HKG Hong Kong|
HMD Heard Island and McDonald Islands|HND Honduras|HRV Croatia|HTI Haiti|HUN Hungary|
IDN Indonesia|IMN Isle of Man|IND India|IOT British Indian Ocean Territory|IRL Ireland|IRN Iran|
IRQ Iraq|ISL Iceland|ISR Israel|ITA Italy|JAM Jamaica|JEY Jersey|JOR Jordan|JPN Japan|
KAZ Kazakhstan|KEN Kenya|KGZ Kyrgyzstan|KHM Cambodia|KIR Kiribati|KNA Saint Kitts and Nevis|
KOR South Korea|KWT Kuwait|LAO Laos|LBN Lebanon|LBR Liberia|LBY Libya|LCA Saint Lucia|
LIE Liechtenstein|LKA Sri Lanka|LSO Lesotho|LTU Lithuania|LUX Luxembourg|LVA Latvia|MAC Macao|
MAF Saint Martin|MAR Morocco|MCO Monaco|MDA Moldova|MDG Madagascar|MDV Maldives|MEX Mexico|
MHL Marshall Islands|MKD North Macedonia|MLI Mali|MLT Malta|MMR Myanmar|MNE Montenegro|
MNG Mongolia|MNP Northern Mariana Islands|MOZ Mozambique|MRT Mauritania|MSR Montserrat|
MTQ Martinique|MUS Mauritius|MWI Malawi|MYS Malaysia|MYT Mayotte|NAM Namibia|NCL New Caledonia|
NER Niger|NFK Norfolk Island|NGA Nigeria|NIC Nicaragua|NIU Niue|NLD Netherlands|NOR Norway|
NPL Nepal|NRU Nauru|NZL New Zealand|OMN Oman|PAK Pakistan|PAN Panama|PCN Pitcairn|PER Peru|
PHL Philippines|PLW Palau|PNG Papua New Guinea|POL Poland|PRI Puerto Rico|PRK North Korea|
PRT Portugal|PRY Paraguay|PSE Palestine|PYF French Polynesia|QAT Qatar|REU Reunion|ROU Romania|
RUS Russia|RWA Rwanda|SAU Saudi Arabia|SDN Sudan|SEN Senegal|SGP Singapore|
SGS South Georgia and the South Sandwich Islands|SHN Saint Helena|SJM Svalbard and Jan Mayen|
SLB Solomon Islands|SLE Sierra Leone|SLV El Salvador|SMR San Marino|SOM Somalia|
SPM Saint Pierre and Miquelon|SRB Serbia|SSD South Sudan|STP Sao Tome and Principe|SUR Suriname|
SVK Slovakia|SVN Slovenia|SWE Sweden|SWZ Eswatini|SXM Sint Maarten|SYC Seychelles|SYR Syria|
TCA Turks and Caicos Islands|TCD Chad|TGO Togo|THA Thailand|TJK Tajikistan|TKL Tokelau|
TKM Turkmenistan|TLS Timor-Leste|TON Tonga|TTO Trinidad and Tobago|TUN Tunisia|TUR Turkey|
TUV Tuvalu|TWN Taiwan|TZA Tanzania|UGA Uganda|UKR Ukraine|UMI United States Minor Outlying Islands|
URY Uruguay|USA United States|UZB Uzbekistan|VAT Vatican City|VCT Saint Vincent and the Grenadines|
VEN Venezuela|VGB British Virgin Islands|VIR U.S. Virgin Islands|VNM Vietnam|VUT Vanuatu|
WLF Wallis and Futuna|WSM Samoa|XKX Kosovo|YEM Yemen|ZAF South Africa|ZMB Zambia|ZWE Zimbabwe
"""
COUNTRIES: dict[str, str] = {
    entry.strip()[:3]: entry.strip()[4:]
    for entry in _COUNTRIES.replace("\n", "").split("|")
    if entry.strip()
}


def country_name(code: Optional[str]) -> Optional[str]:
    """English short name of an ISO 3166-1 alpha-3 code; an unknown code is returned as given."""
    if not code:
        return None
    code = str(code).strip()
    return COUNTRIES.get(code.upper(), code)


def class_name(label: Optional[str | int]) -> Optional[str]:
    """``"parking_lot_or_garage"`` or its fMoW index -> ``"parking lot or garage"``."""
    if label is None or label == "":
        return None
    if isinstance(label, int) or (isinstance(label, str) and label.strip().isdigit()):
        index = int(label)
        if not 0 <= index < len(FMOW_CLASSES):
            return None
        label = FMOW_CLASSES[index]
    return str(label).strip().replace("_", " ")


def _article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"


@dataclass(frozen=True)
class Caption:
    """A caption before dropout.

    ``source``: the dataset word inserted after "a" (``"fmow"`` -> "a fmow satellite image"),
    droppable. ``parts``: the bracketed parts after the core, each with its leading space
    (``" of a stadium"``), each droppable. ``text``: a fixed caption (from a sidecar) used as is;
    it is replaced by the core as a whole with the dropout probability.
    """

    source: Optional[str] = None
    parts: tuple[str, ...] = field(default_factory=tuple)
    text: Optional[str] = None

    def full(self) -> str:
        """The caption with nothing dropped (validation and evaluation use this)."""
        return self.render(None, 0.0)

    def render(self, rng: Optional[np.random.Generator], dropout: float) -> str:
        """The caption with each optional part dropped with probability ``dropout`` (0..1)."""

        def keep() -> bool:
            return dropout <= 0.0 or rng is None or rng.random() >= dropout

        if self.text:
            return self.text if keep() else CORE
        head = f"a {self.source} satellite image" if self.source and keep() else CORE
        return head + "".join(part for part in self.parts if keep())


def fmow_caption(category: Optional[str | int], country_code: Optional[str], source: str = "fmow") -> Caption:
    """The fMoW template: "a[ fmow] satellite image[ of a <class name>][ in <country>]"."""
    parts = []
    name = class_name(category)
    if name:
        parts.append(f" of {_article(name)} {name}")
    country = country_name(country_code)
    if country:
        parts.append(f" in {country}")
    return Caption(source=source, parts=tuple(parts))


def subject_caption(subject: Optional[str], country: Optional[str] = None, source: Optional[str] = None,
                    extra: Sequence[str] = ()) -> Caption:
    """The same template for user data: "a satellite image[ of a <subject>][ in <country>]"."""
    parts = []
    name = class_name(subject) if subject else None
    if name:
        parts.append(f" of {_article(name)} {name}")
    if country:
        parts.append(f" in {country_name(country)}")
    parts += [p if p.startswith(" ") else " " + p for p in extra]
    return Caption(source=source, parts=tuple(parts))
