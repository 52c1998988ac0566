"""Regenerate ``corpus.jsonl``: short synthetic encyclopedia entries about fictional entities.

Every entry is fictional (so a model cannot know the answer without searching) and carries its
facts as a ``facts`` dict, from which demos and tests build questions whose answers are in the
text. Deterministic: ``python rollout/data/make_corpus.py`` rewrites the same file.
"""

import json
import random
from pathlib import Path

COLORS = ["teal", "crimson", "ochre", "violet", "amber", "indigo", "scarlet", "olive", "silver",
          "turquoise", "magenta", "saffron", "cobalt", "emerald", "maroon", "lilac"]
REGIONS = ["Merrow Bay", "the Halvic Coast", "Ostrand Province", "the Velmar Highlands",
           "the Isle of Tarn", "Quessel Valley", "the Drummond Flats", "Port Ambrel",
           "the Sarn Archipelago", "Lake Ividel", "the Corvath Steppe", "Nerith Fjord"]
FIRST = ["Halden", "Mirela", "Oskar", "Tavi", "Ysolde", "Brann", "Corin", "Edda", "Fenwick",
         "Ilsa", "Joren", "Kesti", "Lorcan", "Maelis", "Nils", "Petra", "Rurik", "Sabeth"]
LAST = ["Voss", "Arkwright", "Dunmore", "Fellgrave", "Hollin", "Kestrel", "Marrow", "Quill",
        "Renske", "Stahl", "Thorne", "Ulmer", "Varga", "Whitlock", "Yarrow", "Zell"]
SYL = ["zor", "blax", "quen", "mir", "tal", "vor", "dra", "kel", "lum", "oss", "pra", "sil",
       "thu", "ven", "wyn", "xan", "yel", "bri", "cas", "dov", "fen", "gal", "hes", "ith", "jul"]


def name(rng: random.Random, used: set) -> str:
    while True:
        n = "".join(rng.choice(SYL) for _ in range(rng.choice([2, 2, 3]))).capitalize()
        if n not in used:
            used.add(n)
            return n


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def lighthouse(rng, n):
    f = {"color": rng.choice(COLORS), "year_built": rng.randint(1780, 1950),
         "location": rng.choice(REGIONS), "height_m": rng.randint(12, 70), "builder": person(rng)}
    title = f"{n} lighthouse"
    text = (f"The {n} lighthouse is painted {f['color']} and was built in {f['year_built']}. "
            f"It stands {f['height_m']} metres tall on the shore of {f['location']}. "
            f"The tower was designed by the engineer {f['builder']}.")
    return title, text, f


def bridge(rng, n):
    f = {"length_m": rng.randint(80, 2400), "year_opened": rng.randint(1820, 2015),
         "river": name(rng, set()) + " River", "material": rng.choice(["granite", "iron", "steel",
                                                                        "timber", "concrete"]),
         "arches": rng.randint(1, 14)}
    title = f"{n} Bridge"
    text = (f"The {n} Bridge crosses the {f['river']}. It opened in {f['year_opened']} and is "
            f"{f['length_m']} metres long. Built of {f['material']}, it has {f['arches']} arches.")
    return title, text, f


def bird(rng, n):
    f = {"plumage": rng.choice(COLORS), "wingspan_cm": rng.randint(14, 210),
         "habitat": rng.choice(REGIONS), "eggs": rng.randint(1, 7),
         "diet": rng.choice(["beetles", "seeds", "small fish", "berries", "snails", "nectar"])}
    title = f"{n} warbler" if f["wingspan_cm"] < 40 else f"{n} heron"
    text = (f"The {title} is a bird with {f['plumage']} plumage and a wingspan of "
            f"{f['wingspan_cm']} centimetres. It lives around {f['habitat']}, feeds mainly on "
            f"{f['diet']} and lays {f['eggs']} eggs per clutch.")
    return title, text, f


def composer(rng, n):
    f = {"born": rng.randint(1640, 1960), "instrument": rng.choice(["cello", "harp", "organ",
                                                                    "violin", "lute", "oboe"]),
         "symphonies": rng.randint(0, 12), "hometown": rng.choice(REGIONS)}
    title = f"{rng.choice(FIRST)} {n}"
    text = (f"{title} was a composer born in {f['born']} in {f['hometown']}. A virtuoso of the "
            f"{f['instrument']}, {title.split()[0]} wrote {f['symphonies']} symphonies.")
    return title, text, f


def island(rng, n):
    f = {"area_km2": rng.randint(2, 900), "population": rng.randint(0, 40000),
         "highest_peak_m": rng.randint(20, 1800), "capital": name(rng, set()) + "haven"}
    title = f"{n} Island"
    text = (f"{n} Island covers {f['area_km2']} square kilometres and has a population of "
            f"{f['population']}. Its main town is {f['capital']} and its highest point rises "
            f"{f['highest_peak_m']} metres above the sea.")
    return title, text, f


def ship(rng, n):
    f = {"launched": rng.randint(1790, 1990), "hull_color": rng.choice(COLORS),
         "crew": rng.randint(4, 600), "captain": person(rng),
         "fate": rng.choice(["scrapped", "sunk in a storm", "preserved as a museum", "lost at sea"])}
    title = f"{n} (ship)"
    text = (f"The {n} was a ship launched in {f['launched']} with a {f['hull_color']} hull and a "
            f"crew of {f['crew']}. Its first captain was {f['captain']}. It was eventually "
            f"{f['fate']}.")
    return title, text, f


def festival(rng, n):
    f = {"month": rng.choice(["January", "March", "May", "June", "August", "October",
                              "December"]), "founded": rng.randint(1500, 2010),
         "city": rng.choice(REGIONS), "symbol": rng.choice(["a lantern", "a salmon", "a bell",
                                                          "a copper fox", "a paper crane"])}
    title = f"{n} Festival"
    text = (f"The {n} Festival is held every {f['month']} in {f['city']}. It was founded in "
            f"{f['founded']} and its symbol is {f['symbol']}.")
    return title, text, f


def mineral(rng, n):
    f = {"color": rng.choice(COLORS), "hardness": rng.randint(1, 10),
         "discovered": rng.randint(1700, 2005), "found_in": rng.choice(REGIONS)}
    title = f"{n}ite"
    text = (f"{title} is a {f['color']} mineral with a Mohs hardness of {f['hardness']}. It was "
            f"first described in {f['discovered']} from samples collected in {f['found_in']}.")
    return title, text, f


KINDS = [lighthouse, bridge, bird, composer, island, ship, festival, mineral]


def build(n_per_kind: int = 19, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    used: set = {"Zorblax"}
    docs = [{"id": "doc-000", "title": "Zorblax lighthouse", "kind": "lighthouse",
             "url": "https://encyclopedia.invalid/wiki/Zorblax_lighthouse",
             "text": ("The Zorblax lighthouse is painted teal and was built in 1887. It stands 41 "
                      "metres tall on the shore of Merrow Bay. The tower was designed by the "
                      "engineer Halden Voss."),
             "facts": {"color": "teal", "year_built": 1887, "location": "Merrow Bay",
                       "height_m": 41, "builder": "Halden Voss"}}]
    for _ in range(n_per_kind):
        for kind in KINDS:
            title, text, facts = kind(rng, name(rng, used))
            docs.append({"id": f"doc-{len(docs):03d}", "title": title, "kind": kind.__name__,
                         "url": "https://encyclopedia.invalid/wiki/" + title.replace(" ", "_"),
                         "text": text, "facts": facts})
    return docs


if __name__ == "__main__":
    out = Path(__file__).with_name("corpus.jsonl")
    docs = build()
    with open(out, "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    print(f"wrote {len(docs)} documents to {out}")
