"""Realistic MSR-VTT-style captions (10-20 words) drawn from a fixed vocabulary, seeded."""
from __future__ import annotations

import random

SUBJECTS = ["man", "woman", "girl", "boy", "chef", "dog", "cat", "player", "team", "singer", "reporter",
            "teacher", "child", "couple", "crowd", "driver", "dancer", "student", "baby", "guitarist",
            "presenter", "cartoon character", "group of people", "young man", "old woman"]
ADJECTIVES = ["young", "small", "happy", "red", "blue", "black", "white", "tall", "funny", "little", "old", "famous"]
VERBS = [("cooking", ["pasta", "a steak", "some vegetables", "a cake", "noodles", "soup"]),
         ("playing", ["a guitar", "the piano", "football", "tennis", "a video game", "basketball", "drums"]),
         ("singing", ["a song", "on stage", "into a microphone", "with a band"]),
         ("talking about", ["a new phone", "the weather", "a movie", "politics", "a recipe", "cars"]),
         ("driving", ["a car", "a truck", "a motorcycle", "down the road", "through the city"]),
         ("showing", ["how to fold paper", "a new dress", "makeup tips", "a magic trick", "the room"]),
         ("dancing", ["to music", "with a partner", "on the street", "in a studio"]),
         ("explaining", ["a math problem", "how a machine works", "the rules of the game"]),
         ("running", ["across a field", "on a track", "through the forest", "along the beach"]),
         ("riding", ["a horse", "a bike", "a skateboard", "a wave"]),
         ("watching", ["television", "a soccer match", "the sunset", "a fight"]),
         ("painting", ["a picture", "a wall", "a portrait"]),
         ("swimming", ["in a pool", "in the ocean", "across a lake"])]
PLACES = ["in a kitchen", "on a stage", "in a park", "on the beach", "in a classroom", "on a busy street",
          "in a living room", "at a stadium", "in a studio", "in the snow", "at night", "in front of a crowd",
          "on a boat", "in a garden", "inside a car", "at a concert", "in an office", "on television"]
EXTRAS = ["while people watch", "and smiles at the camera", "while music plays in the background",
          "and then walks away", "as the audience cheers", "while talking to the camera",
          "and laughs with friends", "for a cooking show", "during a news report", "in slow motion"]


def make_captions(n: int, seed: int = 0, min_words: int = 10, max_words: int = 20) -> list[str]:
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        subject = rng.choice(SUBJECTS)
        if rng.random() < 0.5:
            subject = f"{rng.choice(ADJECTIVES)} {subject}"
        verb, objects = rng.choice(VERBS)
        parts = [rng.choice(["a", "the"]), subject, "is", verb, rng.choice(objects), rng.choice(PLACES)]
        if rng.random() < 0.7:
            parts.append(rng.choice(EXTRAS))
        text = " ".join(parts)
        if min_words <= len(text.split()) <= max_words:
            out.append(text)
    return out
