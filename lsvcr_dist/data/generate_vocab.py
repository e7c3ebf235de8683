"""Word lists of the synthetic KuaiShou-like logs (``generate.py``): topic words, title frames, comment fillers.

Each base topic has nouns and adjectives that only it uses, so a title or comment names its topic and an LLM (or
any text encoder) can tell what a user is into. Topics beyond the base list reuse a base list with a "flavour"
word (``retro``, ``pro``, ...) so every topic still has its own word set.
"""

from __future__ import annotations

BASE_TOPICS: dict[str, tuple[list[str], list[str]]] = {
    # name: (nouns, adjectives)
    "winter_sports": (["skating", "ski", "snowboard", "slope", "final", "jump", "rink", "medal", "curling"],
                      ["winter", "icy", "alpine", "olympic", "frozen"]),
    "cooking": (["noodles", "dumplings", "recipe", "wok", "hotpot", "sauce", "kitchen", "chef", "dough"],
                ["spicy", "crispy", "homemade", "savory", "steamed"]),
    "pets": (["puppy", "kitten", "cat", "dog", "hamster", "paws", "leash", "vet", "parrot"],
             ["fluffy", "sleepy", "naughty", "tiny", "adopted"]),
    "gaming": (["boss", "speedrun", "controller", "level", "raid", "console", "loot", "esports", "match"],
               ["ranked", "epic", "legendary", "pixel", "competitive"]),
    "fitness": (["workout", "squat", "gym", "cardio", "pushup", "plank", "dumbbell", "marathon", "yoga"],
                ["sweaty", "intense", "morning", "toned", "daily"]),
    "cars": (["engine", "drift", "sedan", "garage", "turbo", "tire", "racetrack", "roadtrip", "ev"],
             ["electric", "vintage", "fast", "modified", "roaring"]),
    "travel": (["beach", "mountain", "hostel", "passport", "island", "temple", "backpack", "sunset", "market"],
               ["scenic", "remote", "tropical", "hidden", "ancient"]),
    "music": (["guitar", "piano", "concert", "cover", "melody", "drum", "choir", "album", "rap"],
              ["acoustic", "live", "catchy", "soulful", "loud"]),
    "dance": (["choreography", "dancer", "routine", "ballet", "hiphop", "stage", "spin", "troupe", "moves"],
              ["graceful", "synchronized", "viral", "smooth", "energetic"]),
    "comedy": (["prank", "sketch", "skit", "joke", "bloopers", "roommate", "parody", "standup", "punchline"],
               ["awkward", "silly", "hilarious", "absurd", "deadpan"]),
    "tech": (["smartphone", "laptop", "gadget", "unboxing", "battery", "chip", "camera", "keyboard", "drone"],
             ["wireless", "budget", "flagship", "foldable", "smart"]),
    "fashion": (["outfit", "sneakers", "jacket", "runway", "makeup", "lipstick", "hairstyle", "dress", "haul"],
                ["stylish", "casual", "elegant", "trendy", "glam"]),
    "farming": (["harvest", "tractor", "orchard", "rice", "greenhouse", "cattle", "seedlings", "barn", "field"],
                ["rural", "organic", "golden", "muddy", "seasonal"]),
    "crafts": (["pottery", "knitting", "origami", "woodwork", "painting", "clay", "sketchbook", "embroidery", "resin"],
               ["handmade", "tiny", "colorful", "rustic", "intricate"]),
    "basketball": (["dunk", "rebound", "court", "playoffs", "buzzer", "layup", "coach", "threepointer", "hoop"],
                   ["clutch", "overtime", "street", "college", "flashy"]),
    "football": (["goal", "penalty", "striker", "derby", "freekick", "keeper", "league", "header", "stadium"],
                 ["stoppage", "dramatic", "away", "curling", "stunning"]),
    "parenting": (["baby", "toddler", "lullaby", "stroller", "diaper", "nursery", "homework", "bedtime", "twins"],
                  ["newborn", "giggling", "cranky", "proud", "first"]),
    "science": (["experiment", "chemistry", "telescope", "rocket", "magnet", "volcano", "microscope", "physics", "lab"],
                ["explosive", "cosmic", "molecular", "curious", "orbital"]),
    "finance": (["stocks", "budget", "savings", "crypto", "salary", "mortgage", "invoice", "portfolio", "tax"],
                ["frugal", "passive", "bullish", "monthly", "risky"]),
    "anime": (["episode", "cosplay", "manga", "villain", "opening", "character", "fanart", "figure", "arc"],
              ["chibi", "shonen", "isekai", "dubbed", "emotional"]),
    "home": (["renovation", "sofa", "bedroom", "declutter", "shelf", "lighting", "balcony", "closet", "tiles"],
             ["cozy", "minimalist", "tidy", "spacious", "nordic"]),
    "fishing": (["bait", "rod", "trout", "lake", "catch", "reel", "carp", "boat", "lure"],
                ["deep", "riverside", "record", "night", "patient"]),
    "beauty": (["skincare", "serum", "facemask", "nails", "eyeliner", "routine", "blush", "sunscreen", "toner"],
               ["glowing", "dewy", "matte", "gentle", "radiant"]),
    "history": (["dynasty", "emperor", "battle", "castle", "museum", "relic", "scroll", "warrior", "palace"],
                ["ancient", "imperial", "forgotten", "legendary", "medieval"]),
}

FLAVOURS = ["retro", "pro", "kids", "extreme", "night", "budget", "family", "urban"]
"""Extra word of topics past the base list (topic ``k`` uses base ``k % B`` and flavour ``k // B - 1``)."""

TITLE_PREFIXES = ["Review of the", "Best of", "My first", "How to nail the", "Top 10", "Watch:", "Unbelievable",
                  "Behind the scenes of", "Day 3 of", "Why everyone loves the", "Trying the", "", "", ""]
TITLE_SUFFIXES = ["highlights", "tutorial", "vlog", "challenge", "live", "moments", "compilation", "part 2",
                  "explained", "#shorts", "", "", ""]

COMMENT_OPENERS = ["this", "the", "love the", "who else loves the", "can't believe the", "finally a", "that",
                   "best", "omg the", "not the", "petition for more", "", "", ""]
SENTIMENT = ["so good", "amazing", "hilarious", "not convinced", "meh", "respect", "goals", "i'm crying",
             "underrated", "overrated", "wholesome", "need more", "came here from the feed", "first", "", "", "", ""]
EMOJI = ["[laugh]", "[heart]", "[clap]", "[fire]", "[cry]", "haha", "lol", "!!!", "666", "[thumbs_up]", "xD",
         "", "", "", ""]


def topic_words(num_topics: int) -> tuple[list[list[str]], list[list[str]]]:
    """Nouns and adjectives of each of ``num_topics`` topics.

    Returns:
        ``(nouns, adjs)``: lists of length ``num_topics`` of word lists.
    """
    bases = list(BASE_TOPICS.values())
    nouns, adjs = [], []
    for k in range(num_topics):
        n, a = bases[k % len(bases)]
        if k >= len(bases):
            flav = FLAVOURS[(k // len(bases) - 1) % len(FLAVOURS)]
            rep = k // (len(bases) * (len(FLAVOURS) + 1))  # still unique past every flavour: numbered variants
            flav = f"{flav}{rep + 1}" if rep else flav
            a = [flav] + [f"{flav} {w}" for w in a]
        nouns.append(list(n))
        adjs.append(list(a))
    return nouns, adjs
